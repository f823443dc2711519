"""What the plugin manager records: plugins loaded, plugins left out and why, and each
registration (kind, name, owning plugin)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class PluginError(RuntimeError):
    pass


class UnknownName(PluginError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class PluginInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    distribution: str | None
    version: str | None
    module: str
    hooks: list[str]


class PluginFailure(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    distribution: str | None
    error: str
    stage: str  # "import", "validate", "register" or "contract"


class Registration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    name: str
    plugin: str
    description: str = ""
