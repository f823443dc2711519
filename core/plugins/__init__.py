"""Plugin discovery and the registries built from the registration hooks.

Plugins come from the ``qcore`` entry-point group (built-in ones too). One broken plugin
never takes the others down; each of these is recorded (``qcore list-plugins`` shows it
with the reason) and left out:

* a plugin that fails to import, or whose registration hook raises (the whole plugin);
* a hook implementation pluggy refuses (an argument the hook does not have) or a hook
  name no spec declares, e.g. a misspelling (the whole plugin);
* a registered object that does not implement its kind's contract (that registration);
* a name registered twice: qcore's own registration wins over a third party's, else the
  first one loaded (the later registration).

``QCORE_BLOCK_PLUGINS=name1,name2`` skips entry points by name; an unknown name warns.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import pluggy

from qcore import hookspecs
from qcore.plugins.discovery import BLOCK_ENV, ENTRY_POINT_GROUP, Discovery
from qcore.plugins.listeners import Listeners
from qcore.plugins.records import (
    PluginError,
    PluginFailure,
    PluginInfo,
    Registration,
    UnknownName,
)
from qcore.plugins.registries import KINDS, Registries, contract_problem, validate_options

__all__ = ["BLOCK_ENV", "ENTRY_POINT_GROUP", "KINDS", "PluginError", "PluginFailure",
           "PluginInfo", "PluginManager", "Registration", "UnknownName", "contract_problem",
           "get_plugin_manager", "validate_options"]


class PluginManager(Discovery, Registries, Listeners):
    """Loads plugins (:class:`Discovery`), exposes one typed registry per kind
    (:class:`Registries`) and makes per-run managers with listeners (:class:`Listeners`)."""

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
        self.unknown_blocked: list[str] = []
        if load_entry_points:
            self._load_entry_points()
        for name, obj in extra_plugins:
            self._add_isolated(obj, name=name)
        self.pm.check_pending()  # every hook implementation has a spec (unknown ones left out)

    @property
    def hook(self) -> Any:
        return self.pm.hook


_default: PluginManager | None = None


def get_plugin_manager(refresh: bool = False) -> PluginManager:
    """The process-wide plugin manager, loaded from entry points on first use."""
    global _default
    if _default is None or refresh:
        _default = PluginManager()
    return _default
