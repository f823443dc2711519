"""Plugin discovery and the registries built from the registration hooks. Plugins come from the
``qcore`` entry-point group (built-in ones too). A broken one never takes the others down: it is
recorded with the reason (``qcore list-plugins``) and left out, the whole plugin when it fails to
import, a registration hook raises or pluggy refuses it (an argument the hook does not have, a hook
name no spec declares), only the registration when that does not implement its kind's contract or
repeats a name (qcore's own registration wins over a third party's, else the first one loaded).
``QCORE_BLOCK_PLUGINS=name1,name2`` skips entry points by name; an unknown name warns."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import pluggy

from qcore import hookspecs
from qcore.plugins.discovery import BLOCK_ENV, ENTRY_POINT_GROUP, Discovery
from qcore.plugins.records import PluginError, PluginFailure, PluginInfo, Registration, UnknownName
from qcore.plugins.registries import KINDS, Registries, contract_problem, validate_options

__all__ = ["BLOCK_ENV", "ENTRY_POINT_GROUP", "KINDS", "PluginError", "PluginFailure",
           "PluginInfo", "PluginManager", "Registration", "UnknownName", "contract_problem",
           "get_plugin_manager", "validate_options"]


class PluginManager(Discovery, Registries):
    """Loads plugins (:class:`Discovery`), exposes one typed registry per kind
    (:class:`Registries`) and makes per-run managers with listeners (:meth:`for_run`)."""

    def __init__(self, load_entry_points: bool = True, blocked: Iterable[str] | None = None,
                 extra_plugins: Iterable[tuple[str, Any]] = ()) -> None:
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

    def call_isolated(self, hook_name: str, **kwargs: Any) -> None:
        """Call a hook plugin by plugin; one that raises is recorded as a failure (and
        logged) instead of stopping the others (e.g. CLI commands added by plugins)."""
        for impl in list(getattr(self.pm.hook, hook_name).get_hookimpls()):
            try:
                self._call_one(hook_name, impl.plugin_name, **kwargs)
            except Exception as exc:
                self._fail(impl.plugin_name, "register", f"{hook_name}: "
                                                         f"{type(exc).__name__}: {exc}")

    def for_run(self, listeners: Iterable[Any] = ()) -> PluginManager:
        """A manager for one run, leaving this one as it is: the same plugins, registries and
        failures, plus ``listeners`` (objects with ``@hookimpl`` event methods, e.g. custom
        evaluator hooks passed to the API), validated like plugins; the run's events reach
        both through its ``hook``. Without listeners this manager serves."""
        listeners = list(listeners)
        if not listeners:
            return self
        self.listing()  # build the registries once, shared with the run
        run = type(self)(load_entry_points=False, blocked=self.blocked)
        for name, obj in self.pm.list_name_plugin():
            if obj is not None and name in self.plugins:
                run.pm.register(obj, name=name)
        run.plugins = dict(self.plugins)
        for i, obj in enumerate(listeners):
            run.add_plugin(obj, name=f"listener-{i}-{type(obj).__name__}")
        run.failures = list(self.failures)
        run.registrations = list(self.registrations)
        run.unknown_blocked = list(self.unknown_blocked)
        run._registries = self._registries
        return run


_default: PluginManager | None = None


def get_plugin_manager(refresh: bool = False) -> PluginManager:
    """The process-wide plugin manager, loaded from entry points on first use."""
    global _default
    if _default is None or refresh:
        _default = PluginManager()
    return _default
