"""Discovery and isolation: loading the ``qcore`` entry points, recording each plugin that
fails to import or that pluggy refuses and leaving it out (see :mod:`qcore.plugins`)."""

from __future__ import annotations

import logging
from importlib import metadata
from importlib.metadata import EntryPoint
from typing import Any

import pluggy

from qcore.plugins.records import PluginError, PluginFailure, PluginInfo

log = logging.getLogger("qcore.plugins")

ENTRY_POINT_GROUP = "qcore"
BLOCK_ENV = "QCORE_BLOCK_PLUGINS"


def entry_points(group: str) -> list[EntryPoint]:
    """The installed entry points of ``group`` (a seam tests replace)."""
    return list(metadata.entry_points(group=group))


class Discovery:
    """Loading plugins into ``self.pm`` (a pluggy manager) and recording what each one is."""

    pm: pluggy.PluginManager
    blocked: set[str]
    plugins: dict[str, PluginInfo]
    failures: list[PluginFailure]
    unknown_blocked: list[str]
    _registries: Any

    def _load_entry_points(self) -> None:
        eps = sorted(entry_points(ENTRY_POINT_GROUP), key=lambda e: e.name)
        self.unknown_blocked = sorted(self.blocked - {ep.name for ep in eps})
        for name in self.unknown_blocked:
            log.warning("%s names %r, but no installed plugin has that name (installed: %s)",
                        BLOCK_ENV, name, ", ".join(ep.name for ep in eps))
        for ep in eps:
            dist = getattr(ep, "dist", None)
            dist_name, version = (dist.metadata["Name"], dist.version) if dist else (None, None)
            if ep.name in self.blocked:
                log.info("plugin %s blocked by %s", ep.name, BLOCK_ENV)
                self.pm.set_blocked(ep.name)
                continue
            if ep.name in self.plugins:
                self.failures.append(PluginFailure(
                    name=ep.name, distribution=dist_name, stage="import",
                    error=f"entry point name {ep.name!r} is already used by "
                          f"{self.plugins[ep.name].distribution}"))
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not take qcore down
                log.warning("plugin %s (%s) failed to import: %s", ep.name, dist_name, exc)
                self.failures.append(PluginFailure(name=ep.name, distribution=dist_name,
                                                   stage="import",
                                                   error=f"{type(exc).__name__}: {exc}"))
                continue
            self._add_isolated(module, name=ep.name, distribution=dist_name, version=version)

    def _add_isolated(self, obj: Any, name: str, distribution: str | None = None,
                      version: str | None = None) -> None:
        """:meth:`add_plugin`, recording a refused plugin as a failure instead of raising."""
        try:
            self.add_plugin(obj, name=name, distribution=distribution, version=version)
        except PluginError as exc:
            log.warning("plugin %s (%s) left out: %s", name, distribution, exc)
            self.failures.append(PluginFailure(name=name, distribution=distribution,
                                               stage="validate", error=str(exc)))

    def add_plugin(self, obj: Any, name: str, distribution: str | None = None,
                   version: str | None = None) -> None:
        """Register a plugin object directly (tests, listeners passed to the API). A hook
        implementation pluggy refuses, or a hook no spec declares, is a PluginError and
        leaves nothing registered."""
        try:
            self.pm.register(obj, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name}: {exc}") from None
        callers = self.pm.get_hookcallers(obj) or []
        unknown = sorted(c.name for c in callers if not c.has_spec())
        if unknown:
            self.pm.unregister(obj, name=name)
            raise PluginError(f"plugin {name}: no hook named {', '.join(unknown)} (misspelt? "
                              "the hooks are listed in qcore.hookspecs)")
        self.plugins[name] = PluginInfo(name=name, distribution=distribution, version=version,
                                        module=getattr(obj, "__name__", type(obj).__name__),
                                        hooks=sorted(caller.name for caller in callers))
        self._registries = None

    def remove_plugin(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.plugins.pop(name, None)
        self._registries = None
