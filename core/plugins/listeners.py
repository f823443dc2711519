"""Per-run listeners: a run's own event listeners (custom evaluator hooks passed to the
API) join the plugins for that run only; hooks called plugin by plugin so that one that
raises is recorded instead of stopping the others."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qcore.plugins import PluginManager

log = logging.getLogger("qcore.plugins")


class Listeners:
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
        """A manager for one run: the same plugins, registries and failures, plus
        ``listeners`` (objects with ``@hookimpl`` event methods), leaving this manager as
        it is. Events of the run go through its ``hook`` to plugins and listeners alike;
        listeners are validated like plugins (a hook name no spec declares is an error).
        Without listeners the run needs nothing of its own: this manager serves it."""
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
