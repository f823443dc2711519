"""Plugin discovery and the registries built from the registration hooks.

Plugins come from the ``qcore`` entry-point group (built-in ones too). A plugin that fails
to import or to register is recorded with its distribution and error, and the rest keep
working. ``QCORE_BLOCK_PLUGINS=name1,name2`` skips entry points by name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy
from pydantic import BaseModel, ConfigDict

from qcore import hookspecs

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "qcore"
BLOCK_ENV = "QCORE_BLOCK_PLUGINS"

#: registry kind -> registration hook name
KINDS: dict[str, str] = {
    "quantizer": "qcore_register_quantizers",
    "backend": "qcore_register_backends",
    "evaluator": "qcore_register_evaluators",
    "dataset": "qcore_register_datasets",
    "format": "qcore_register_formats",
    "architecture": "qcore_register_architectures",
    "module": "qcore_register_modules",
}


class PluginError(RuntimeError):
    pass


class DuplicateRegistration(PluginError):
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
    stage: str  # "import" or "register"


class Registration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    name: str
    plugin: str
    description: str = ""


def _dist_of(ep: EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


class PluginManager:
    """Loads plugins and exposes one registry per kind (name -> registered object)."""

    def __init__(
        self,
        load_entry_points: bool = True,
        blocked: Iterable[str] | None = None,
        extra_plugins: Iterable[tuple[str, Any]] = (),
    ) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        if blocked is None:
            blocked = [b.strip() for b in os.environ.get(BLOCK_ENV, "").split(",") if b.strip()]
        self.blocked = set(blocked)
        self.plugins: dict[str, PluginInfo] = {}
        self.failures: list[PluginFailure] = []
        self.registrations: list[Registration] = []
        self._registries: dict[str, dict[str, Any]] | None = None
        if load_entry_points:
            self._load_entry_points()
        for name, obj in extra_plugins:
            self.add_plugin(obj, name=name)

    # ------------------------------------------------------------------ loading
    def _load_entry_points(self) -> None:
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist_name, version = _dist_of(ep)
            if ep.name in self.blocked:
                log.info("plugin %s blocked by %s", ep.name, BLOCK_ENV)
                self.pm.set_blocked(ep.name)
                continue
            if ep.name in self.plugins:
                self.failures.append(PluginFailure(
                    name=ep.name, distribution=dist_name, stage="import",
                    error=f"entry point name {ep.name!r} is already used by "
                    f"{self.plugins[ep.name].distribution}",
                ))
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not take qcore down
                log.warning("plugin %s (%s) failed to import: %s", ep.name, dist_name, exc)
                self.failures.append(PluginFailure(
                    name=ep.name, distribution=dist_name, stage="import",
                    error=f"{type(exc).__name__}: {exc}",
                ))
                continue
            self.add_plugin(module, name=ep.name, distribution=dist_name, version=version)

    def add_plugin(
        self, obj: Any, name: str, distribution: str | None = None, version: str | None = None
    ) -> None:
        """Register a plugin object directly (tests, listeners passed to the API)."""
        self.pm.register(obj, name=name)
        hooks = sorted(
            caller.name for caller in self.pm.get_hookcallers(obj) or []
        )
        self.plugins[name] = PluginInfo(
            name=name, distribution=distribution, version=version,
            module=getattr(obj, "__name__", type(obj).__name__), hooks=hooks,
        )
        self._registries = None

    def remove_plugin(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.plugins.pop(name, None)
        self._registries = None

    # ------------------------------------------------------------------ registries
    def _build(self) -> dict[str, dict[str, Any]]:
        registries: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
        owners: dict[tuple[str, str], str] = {}
        self.registrations = []
        failed = {f.name for f in self.failures}
        for kind, hook_name in KINDS.items():
            caller = getattr(self.pm.hook, hook_name)
            for impl in reversed(caller.get_hookimpls()):  # registration order
                plugin = impl.plugin_name

                def register(*args: Any, _kind=kind, _plugin=plugin) -> None:
                    if _kind == "module":
                        reg_name, obj = args
                    else:
                        (obj,) = args
                        reg_name = getattr(obj, "name", None)
                        if not reg_name:
                            raise PluginError(f"{_kind} {obj!r} from plugin {_plugin} has no name")
                    key = (_kind, reg_name)
                    if key in owners:
                        raise DuplicateRegistration(
                            f"{_kind} {reg_name!r} is registered by both plugin "
                            f"{owners[key]!r} and plugin {_plugin!r}"
                        )
                    owners[key] = _plugin
                    registries[_kind][reg_name] = obj
                    self.registrations.append(Registration(
                        kind=_kind, name=reg_name, plugin=_plugin,
                        description=(getattr(obj, "description", "") or "").strip(),
                    ))

                if plugin in failed:
                    continue
                try:
                    impl.function(register=register)
                except DuplicateRegistration:
                    raise
                except Exception as exc:
                    info = self.plugins.get(plugin)
                    self.failures.append(PluginFailure(
                        name=plugin, distribution=info.distribution if info else None,
                        stage="register", error=f"{type(exc).__name__}: {exc}",
                    ))
                    failed.add(plugin)
        return registries

    def registry(self, kind: str) -> dict[str, Any]:
        if kind not in KINDS:
            raise KeyError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")
        if self._registries is None:
            self._registries = self._build()
        return self._registries[kind]

    def get(self, kind: str, name: str) -> Any:
        reg = self.registry(kind)
        if name not in reg:
            known = ", ".join(sorted(reg)) or "none"
            hint = ""
            broken = [f for f in self.failures]
            if broken:
                hint = " (plugins that failed to load: " + ", ".join(
                    f"{f.name}: {f.error}" for f in broken) + ")"
            raise UnknownName(f"no {kind} named {name!r}; available: {known}{hint}")
        return reg[name]

    @property
    def hook(self) -> Any:
        return self.pm.hook

    # ------------------------------------------------------------------ listing
    def listing(self) -> dict[str, Any]:
        """Everything ``qcore list-plugins`` shows, as plain data."""
        for kind in KINDS:
            self.registry(kind)
        rows = []
        for reg in self.registrations:
            info = self.plugins.get(reg.plugin)
            rows.append({
                "kind": reg.kind,
                "name": reg.name,
                "plugin": reg.plugin,
                "version": info.version if info else None,
                "distribution": info.distribution if info else None,
                "hooks": info.hooks if info else [],
                "description": reg.description,
            })
        return {
            "registrations": rows,
            "plugins": [p.model_dump() for p in self.plugins.values()],
            "failures": [f.model_dump() for f in self.failures],
            "blocked": sorted(self.blocked),
        }


_default: PluginManager | None = None


def get_plugin_manager(refresh: bool = False) -> PluginManager:
    """The process-wide plugin manager, loaded from entry points on first use."""
    global _default
    if _default is None or refresh:
        _default = PluginManager()
    return _default
