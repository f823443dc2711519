"""The typed registries: what each plugin registered through the ``qcore_register_*``
hooks, checked against its kind's contract, one registry per kind (name -> object); and
the typed builders that turn a name and options into a validated instance."""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any

import pluggy
from pydantic import BaseModel, ValidationError

from qcore.config import DEFAULT_SCHEME
from qcore.data import DatasetRegistry
from qcore.errors import ConfigError, validation_summary
from qcore.interfaces import DataSpec, missing_packages
from qcore.plugins.records import PluginError, PluginFailure, PluginInfo, Registration, UnknownName
from qcore.schemes import QuantArgs, QuantScheme

log = logging.getLogger("qcore.plugins")

if TYPE_CHECKING:
    from qcore.interfaces import Backend, Evaluator, Quantizer, WeightSolver

#: registry kind -> registration hook name (``qcore_register_quantizers``, ...)
KINDS: dict[str, str] = {kind: f"qcore_register_{kind}s" for kind in (
    "quantizer", "solver", "backend", "evaluator", "dataset", "format", "architecture", "module")}


def contract_problem(kind: str, obj: Any) -> str | None:
    """Why ``obj`` cannot serve as a ``kind`` registration, or None if it can."""
    from qcore.interfaces import Backend, Dataset, Evaluator, Format, Quantizer, WeightSolver
    from qcore.models.adapter import ArchitectureAdapter

    if kind == "module":
        return None if inspect.isclass(obj) else f"{obj!r} is not a class"
    base = {"quantizer": Quantizer, "solver": WeightSolver, "backend": Backend,
            "evaluator": Evaluator, "dataset": Dataset, "format": Format,
            "architecture": ArchitectureAdapter}[kind]
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


def validate_options(kind: str, name: str, config_cls: type[BaseModel], options: dict) -> BaseModel:
    """``options`` as the plugin's pydantic ``Config``; a ConfigError naming the field."""
    try:
        return config_cls.model_validate(options)
    except ValidationError as exc:
        raise ConfigError(f"invalid options for {kind} {name!r}: "
                          f"{validation_summary(exc)}") from exc


class Registries:
    """One registry per kind, built on first use from the registration hooks."""

    pm: pluggy.PluginManager
    plugins: dict[str, PluginInfo]
    failures: list[PluginFailure]
    registrations: list[Registration]
    _registries: dict[str, dict[str, Any]] | None

    def _build(self) -> dict[str, dict[str, Any]]:
        registries: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
        owners: dict[tuple[str, str], str] = {}
        self.registrations = []
        self.failures = [f for f in self.failures if f.stage in ("import", "validate")]
        failed = {f.name for f in self.failures}
        for kind, hook_name in KINDS.items():
            impls = list(getattr(self.pm.hook, hook_name).get_hookimpls())  # registration order
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
                    description = (getattr(obj, "description", "") or "").strip()
                    self.registrations.append(Registration(kind=kind, name=reg_name, plugin=plugin,
                                                           description=description))
        return registries

    def _call_one(self, hook_name: str, plugin: str, **kwargs: Any) -> Any:
        """Call ``hook_name`` of one plugin only, through pluggy."""
        keep = self.pm.get_plugin(plugin)
        others = [p for p in self.pm.get_plugins() if p is not keep]
        return self.pm.subset_hook_caller(hook_name, remove_plugins=others)(**kwargs)

    def _is_builtin(self, plugin: str) -> bool:
        info = self.plugins.get(plugin)
        return info is not None and info.distribution == "qcore"

    def _fail(self, plugin: str, stage: str, error: str) -> None:
        info = self.plugins.get(plugin)
        log.warning("plugin %s: %s", plugin, error)
        self.failures.append(PluginFailure(name=plugin, stage=stage, error=error,
                                           distribution=info.distribution if info else None))

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
            broken = ", ".join(f"{f.name}: {f.error}" for f in self.failures)
            hint = f" (plugins that failed to load: {broken})" if broken else ""
            raise UnknownName(f"no {kind} named {name!r}; available: {known}{hint}")
        return reg[name]

    def build_quantizer(self, method: str, scheme: QuantScheme,
                        options: dict[str, Any] | None = None) -> Quantizer:
        """The registered method ``method`` with validated options, bound to this manager
        (the solver it composes resolved)."""
        cls: type[Quantizer] = self.get("quantizer", method)
        config = validate_options("quantizer", method, cls.Config, options or {})
        try:
            quantizer = cls(config, scheme)
            quantizer.bind(self)
        except ValueError as exc:
            raise ConfigError(f"{method}: {exc}") from exc
        return quantizer

    def default_scheme(self, method: str) -> str:
        """The scheme preset a run of ``method`` gets when it names none."""
        return self.get("quantizer", method).default_scheme or DEFAULT_SCHEME

    def build_solver(self, name: str, options: dict[str, Any], weights: QuantArgs,
                     owner: str = "weight_method") -> WeightSolver:
        """A registered weight solver with validated options, checked against the weight
        arguments it must produce; errors name ``owner`` (the option that chose it)."""
        try:
            cls: type[WeightSolver] = self.get("solver", name)
        except PluginError as exc:
            raise ConfigError(f"{owner} {name!r}: {exc}") from exc
        solver = cls(validate_options("solver", name, cls.Config, options))
        try:
            solver.check_args(weights)
        except ValueError as exc:
            raise ConfigError(f"{owner} {name!r}: {exc}") from exc
        return solver

    def build_backend(self, name: str) -> Backend:
        cls: type[Backend] = self.get("backend", name)
        if not cls.is_available():
            missing = missing_packages(cls.requires)
            raise ConfigError(f"backend {name!r} is not available on this machine"
                              + "".join(f"; it needs {p}: {how}" for p, how in missing.items()))
        return cls()

    def build_evaluator(self, name: str, options: dict[str, Any]) -> Evaluator:
        """The evaluator with validated options; a missing optional package it needs is
        named with its install command here, before any model loads."""
        cls: type[Evaluator] = self.get("evaluator", name)
        evaluator = cls(validate_options("evaluator", name, cls.Config, options))
        missing = evaluator.missing()
        if missing:
            raise ConfigError(f"evaluator {name!r} needs " + "; ".join(
                f"the {p} package: {how}" for p, how in missing.items()))
        texts = DatasetRegistry(self.registry("dataset"))
        for field, value in evaluator.config:  # its text sources: file there, package in
            if isinstance(value, DataSpec):
                try:
                    texts.resolve(value).check(value)
                except ValueError as exc:
                    raise ConfigError(f"evaluator {name!r} {field}: {exc}") from exc
        return evaluator

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
            info = self.plugins.get(reg.plugin)  # getattr(None, ...) gives None
            about = {key: getattr(info, key, None) for key in ("version", "distribution", "module")}
            rows.append({"kind": reg.kind, "name": reg.name, "plugin": reg.plugin, **about,
                         "hooks": info.hooks if info else [], "description": reg.description,
                         "default_scheme": getattr(self.registry(reg.kind)[reg.name],
                                                   "default_scheme", None)})
        return {"registrations": rows,
                "plugins": [p.model_dump() for p in self.plugins.values()],
                "failures": [f.model_dump() for f in self.failures],
                "blocked": sorted(self.blocked), "unknown_blocked": self.unknown_blocked}
