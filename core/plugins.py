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

import inspect
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
    "solver": "qcore_register_solvers",
    "backend": "qcore_register_backends",
    "evaluator": "qcore_register_evaluators",
    "dataset": "qcore_register_datasets",
    "format": "qcore_register_formats",
    "architecture": "qcore_register_architectures",
    "module": "qcore_register_modules",
}


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


def _contracts() -> dict[str, type]:
    from qcore.interfaces import Backend, Dataset, Evaluator, Format, Quantizer, WeightSolver
    from qcore.models.adapter import ArchitectureAdapter

    return {"quantizer": Quantizer, "solver": WeightSolver, "backend": Backend,
            "evaluator": Evaluator,
            "dataset": Dataset, "format": Format, "architecture": ArchitectureAdapter}


def contract_problem(kind: str, obj: Any) -> str | None:
    """Why ``obj`` cannot serve as a ``kind`` registration, or None if it can."""
    if kind == "module":
        return None if inspect.isclass(obj) else f"{obj!r} is not a class"
    base = _contracts()[kind]
    if not inspect.isclass(obj) or not issubclass(obj, base):
        return f"{obj!r} is not a subclass of {base.__module__}.{base.__name__}"
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
        return f"{obj.__name__} does not implement {missing}"
    config = getattr(obj, "Config", None)
    if kind in ("quantizer", "solver", "evaluator") and not (
            inspect.isclass(config) and issubclass(config, BaseModel)):
        return f"{obj.__name__}.Config is not a pydantic model"
    return None


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
        self.unknown_blocked: list[str] = []
        if load_entry_points:
            self._load_entry_points()
        for name, obj in extra_plugins:
            self._add_isolated(obj, name=name)
        self.pm.check_pending()  # every hook implementation has a spec (unknown ones left out)

    # ------------------------------------------------------------------ loading
    def _load_entry_points(self) -> None:
        eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
        self.unknown_blocked = sorted(self.blocked - {ep.name for ep in eps})
        for name in self.unknown_blocked:
            log.warning("%s names %r, but no installed plugin has that name (installed: %s)",
                        BLOCK_ENV, name, ", ".join(ep.name for ep in eps))
        for ep in eps:
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

    def add_plugin(
        self, obj: Any, name: str, distribution: str | None = None, version: str | None = None
    ) -> None:
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
        hooks = sorted(caller.name for caller in callers)
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
        self.failures = [f for f in self.failures if f.stage in ("import", "validate")]
        failed = {f.name for f in self.failures}
        for kind, hook_name in KINDS.items():
            caller = getattr(self.pm.hook, hook_name)
            impls = list(caller.get_hookimpls())  # registration order
            impls.sort(key=lambda impl: not self._is_builtin(impl.plugin_name))  # stable
            for impl in impls:
                plugin = impl.plugin_name
                if plugin in failed:
                    continue
                offered: list[tuple[str, Any]] = []

                def register(*args: Any, _kind=kind, _offered=offered) -> None:
                    if _kind == "module":
                        reg_name, obj = args
                    else:
                        (obj,) = args
                        reg_name = getattr(obj, "name", None)
                    _offered.append((reg_name, obj))

                try:  # through pluggy (tracing, monitoring), one plugin at a time
                    self._call_one(hook_name, plugin, register=register)
                except Exception as exc:
                    self._fail(plugin, "register", f"{type(exc).__name__}: {exc}")
                    failed.add(plugin)
                    continue
                for reg_name, obj in offered:
                    problem = None
                    if not isinstance(reg_name, str) or not reg_name:
                        problem = f"{kind} {obj!r} has no name"
                    elif (kind, reg_name) in owners:
                        problem = (f"{kind} {reg_name!r} is already registered by plugin "
                                   f"{owners[kind, reg_name]!r}; this one is left out")
                    else:
                        problem = contract_problem(kind, obj)
                        if problem:
                            problem = f"{kind} {reg_name!r}: {problem}; left out"
                    if problem:
                        self._fail(plugin, "contract", problem)
                        continue
                    owners[kind, reg_name] = plugin
                    registries[kind][reg_name] = obj
                    self.registrations.append(Registration(
                        kind=kind, name=reg_name, plugin=plugin,
                        description=(getattr(obj, "description", "") or "").strip(),
                    ))
        return registries

    def _call_one(self, hook_name: str, plugin: str, **kwargs: Any) -> Any:
        """Call ``hook_name`` of one plugin only, through pluggy."""
        keep = self.pm.get_plugin(plugin)
        others = [p for p in self.pm.get_plugins() if p is not keep]
        return self.pm.subset_hook_caller(hook_name, remove_plugins=others)(**kwargs)

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
        run = PluginManager(load_entry_points=False, blocked=self.blocked)
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

    def _is_builtin(self, plugin: str) -> bool:
        info = self.plugins.get(plugin)
        return info is not None and info.distribution == "qcore"

    def _fail(self, plugin: str, stage: str, error: str) -> None:
        info = self.plugins.get(plugin)
        log.warning("plugin %s: %s", plugin, error)
        self.failures.append(PluginFailure(
            name=plugin, distribution=info.distribution if info else None, stage=stage,
            error=error))

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
    def version_of(self, kind: str, name: str) -> str | None:
        """The version of the distribution that registered ``name`` as a ``kind``."""
        self.registry(kind)
        for reg in self.registrations:
            if reg.kind == kind and reg.name == name:
                info = self.plugins.get(reg.plugin)
                return info.version if info else None
        return None

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
                "module": info.module if info else None,
                "hooks": info.hooks if info else [],
                "description": reg.description,
            })
        return {
            "registrations": rows,
            "plugins": [p.model_dump() for p in self.plugins.values()],
            "failures": [f.model_dump() for f in self.failures],
            "blocked": sorted(self.blocked),
            "unknown_blocked": self.unknown_blocked,
        }


_default: PluginManager | None = None


def get_plugin_manager(refresh: bool = False) -> PluginManager:
    """The process-wide plugin manager, loaded from entry points on first use."""
    global _default
    if _default is None or refresh:
        _default = PluginManager()
    return _default
