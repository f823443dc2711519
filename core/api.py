"""The Python API: quantize, evaluate, save and load, all resolved through the plugins. What
a run needs is validated before the model loads, the rest before any work (the checks are
listed in docs/architecture.md, "What qcore promises")."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcore.config import RunConfig
from qcore.console import Steps
from qcore.data import DatasetRegistry, WindowSpec, token_windows, tokenize
from qcore.engine.activations import DEFAULT_BUDGET_FRACTION, available_memory_bytes
from qcore.engine.finite import check_source_weights
from qcore.engine.loading import (
    check_model_source,
    load_float_model,
    load_tokenizer,
    resolve_model_source,
)
from qcore.engine.pipeline import GroupSizeMismatch, LoopOptions, check_group_size, run_layerwise
from qcore.engine.placement import dispatch
from qcore.engine.streaming import (
    StreamedCheckpoint,
    can_stream,
    mapped_bytes,
    page_out_after_forward,
    resolve_dtype,
)
from qcore.errors import ConfigError, SavedModelError
from qcore.interfaces import (
    Backend,
    DataSpec,
    EvaluationResources,
    Evaluator,
    Format,
    LayerWriter,
    Quantizer,
    SavedModel,
)
from qcore.io import check_output_dir
from qcore.models.adapter import ArchitectureAdapter, resolve_adapter
from qcore.models.checkpoint import quantization_config
from qcore.plugins import PluginManager, get_plugin_manager
from qcore.reports import EvaluationResult, QuantizationReport
from qcore.schemes import QuantScheme
from qcore.versions import package_versions

log = logging.getLogger(__name__)


__all__ = ["ConfigError", "quantize", "evaluate", "load_model", "save_model", "export_model",
           "perplexity"]


def build_quantizer(method: str, scheme: QuantScheme, options: dict[str, Any] | None = None,
                    plugins: PluginManager | None = None) -> Quantizer:
    return (plugins or get_plugin_manager()).build_quantizer(method, scheme, options)


def build_backend(name: str, plugins: PluginManager | None = None) -> Backend:
    return (plugins or get_plugin_manager()).build_backend(name)


def build_evaluator(name: str, options: dict[str, Any], plugins: PluginManager | None = None
                    ) -> Evaluator:
    return (plugins or get_plugin_manager()).build_evaluator(name, options)


class RunResources(DatasetRegistry, EvaluationResources):
    """The evaluators' resources, resolved through the run's plugin manager."""

    def __init__(self, plugins: PluginManager) -> None:
        super().__init__(plugins.registry("dataset"))
        self.plugins = plugins

    def place(self, model: nn.Module, backend: Backend) -> nn.Module:
        return dispatch(model, backend)

    def load_model(self, source: str) -> tuple[nn.Module, Any, dict[str, Any] | None]:
        return load_model(source, self.plugins, backend=None)

    def adapter_for(self, model: nn.Module) -> ArchitectureAdapter:
        return adapter_for(model, self.plugins)

    def backend(self, name: str) -> Backend:
        return self.plugins.build_backend(name)


def datasets(plugins: PluginManager | None = None) -> DatasetRegistry:
    return DatasetRegistry((plugins or get_plugin_manager()).registry("dataset"))


def adapter_for(model: nn.Module, plugins: PluginManager | None = None) -> ArchitectureAdapter:
    return resolve_adapter(model, (plugins or get_plugin_manager()).registry("architecture"))


def calibration_ids(tokenizer: Any, config: RunConfig, plugins: PluginManager | None = None
                    ) -> torch.Tensor:
    cal = config.calibration
    text = datasets(plugins).text(cal.data)
    spec = WindowSpec(samples=cal.samples, seq_len=cal.seq_len, sampling=cal.sampling,
                      seed=cal.seed)
    try:
        return token_windows(tokenize(tokenizer, text), spec)
    except ValueError as exc:
        raise ConfigError(f"calibration data {cal.data.source} ({cal.data.part}): {exc}") from exc


def _expected_save_bytes(source: Path | None, config: RunConfig) -> int:
    """A rough size of the saved model, for the free-space check: the checkpoint's bytes
    scaled by the weight bits over the checkpoint's bits (a GGUF source counts as is)."""
    if source is None or not source.exists():
        return 0
    if source.is_file():
        return source.stat().st_size
    total = sum(f.stat().st_size for f in [*source.glob("*.safetensors"), *source.glob("*.bin")])
    try:
        text = (source / "config.json").read_text(encoding="utf-8")
        bits = config.resolved_scheme().weights.bits
    except (OSError, ValueError):
        return 0
    src_bits = 16 if '"bfloat16"' in text or '"float16"' in text else 32
    return int(total * min(1.0, (bits + 1) / src_bits))


def find_format(path: Path, plugins: PluginManager | None = None) -> type[Format] | None:
    formats = (plugins or get_plugin_manager()).registry("format").values()
    return next((cls for cls in formats if cls.can_load(path)), None)


def load_model(source: str, plugins: PluginManager | None = None,
               dtype: torch.dtype = torch.float32, backend: str | None = "cpu"
               ) -> tuple[nn.Module, Any, dict | None]:
    """(model, tokenizer, qcore metadata or None): a saved quantized model or a float one. A
    quantized model gets ``backend``'s real kernels installed (as ``quantize`` does), so it computes
    exactly what the saved model computed. Saved models and float safetensors folders already in
    ``dtype`` come memory-mapped from their shards (transformers maps them too), so evaluation can
    page their layers in and out (:func:`evaluate`)."""
    plugins = plugins or get_plugin_manager()
    path = Path(resolve_model_source(source))
    fmt = find_format(path, plugins) if path.is_dir() else None
    if fmt is not None:
        model, tokenizer, meta = fmt().load(path, plugins.registry("module"))
        if backend is not None:
            build_backend(backend, plugins).install_kernels(model)
        return model, tokenizer, meta
    if path.is_dir():
        for cls in plugins.registry("format").values():
            if problem := cls.diagnose(path):
                raise SavedModelError(problem)
        if (declared := quantization_config(path)) is not None:
            method = declared.get("quant_method", "unknown")
            raise SavedModelError(
                f"{path}: quantization_config.quant_method {method!r} is not read by any "
                f"installed format (formats: {', '.join(sorted(plugins.registry('format')))})")
    model, tokenizer = load_float_model(str(path) if path.exists() else source, dtype)
    model.eval()
    return model, tokenizer, None


def save_model(model: nn.Module, tokenizer: Any, path: str | Path, metadata: dict[str, Any],
               format: str = "qcore", plugins: PluginManager | None = None,
               overwrite: bool = False) -> Path:
    """Save atomically. An existing non-empty ``path`` is replaced only with ``overwrite``
    and only if it is a saved model folder (:func:`qcore.io.check_output_dir`)."""
    plugins = plugins or get_plugin_manager()
    fmt: type[Format] = plugins.get("format", format)
    check_output_dir(path, overwrite=overwrite)
    meta = {**metadata, "versions": package_versions()}
    return fmt().save(model, tokenizer, Path(path), meta).path


def export_model(source: str, format: str, out: str | Path, *, overwrite: bool = False,
                 max_shard_size: str | None = None, plugins: PluginManager | None = None,
                 progress: bool | None = None) -> SavedModel:
    """Write a quantized model (a qcore save, or a checkpoint a format plugin reads) in
    ``format`` at ``out``, atomically; the result's metadata holds the format's summary.
    A model the format cannot hold is refused with the layer and what is missing.
    ``progress``: its two steps (read, write) as :class:`qcore.console.Steps` shows them."""
    plugins = plugins or get_plugin_manager()
    fmt: type[Format] = plugins.get("format", format)
    path = Path(resolve_model_source(source))
    if not path.exists():
        raise ConfigError(f"`model` {source}: no such file or folder")
    check_output_dir(out, overwrite=overwrite, inputs=[path], option="`out`")
    with Steps(f"export to {format}", 2, progress) as steps:
        model, tokenizer, meta = load_model(source, plugins, backend=None)
        if meta is None:
            raise ConfigError(f"{source} is not a quantized model; quantize it with "
                              f"`qcore quantize --format {format}`")
        steps.advance(info=f"read {source}")
        details = {"source": str(source), "source_format": meta.get("format"),
                   "versions": package_versions()}
        if max_shard_size:
            details["max_shard_size"] = max_shard_size
        try:
            saved = fmt().save(model, tokenizer, Path(out), details)
        except ValueError as exc:
            raise ConfigError(f"`format` {format}: {exc}") from exc
        steps.advance(info=f"wrote {saved.path}")
    return saved


@dataclass
class QuantizeResult:
    """What :func:`quantize` produced. A model written layer by layer is no longer in
    memory: ``model`` reads it back from ``saved`` the first time it is asked for."""

    tokenizer: Any
    report: QuantizationReport
    saved: Path | None
    config: RunConfig
    in_memory: nn.Module | None = None

    @property
    def model(self) -> nn.Module:
        if self.in_memory is None:
            self.in_memory, _, _ = load_model(str(self.saved), backend=self.config.backend)
        return self.in_memory


def quantize(config: RunConfig, *, plugins: PluginManager | None = None,
             listeners: Iterable[Any] = (), progress: bool = True,
             model: nn.Module | None = None, tokenizer: Any = None) -> QuantizeResult:
    """Quantize ``config.model`` (or a given model) layer by layer and optionally save it.
    ``listeners`` are objects with ``@hookimpl`` event methods (custom evaluator hooks)."""
    plugins = plugins or get_plugin_manager()
    if config.scheme is None:  # the method's own default
        config = config.model_copy(update={"scheme": plugins.default_scheme(config.method)})
    try:
        scheme = config.resolved_scheme()
    except ValueError as exc:
        raise ConfigError(f"scheme: {exc}") from exc
    quantizer = build_quantizer(config.method, scheme, config.method_config, plugins)
    backend = build_backend(config.backend, plugins)
    run = plugins.for_run(listeners)  # a listener with an unknown hook fails here
    model_path = _check_inputs(config, quantizer, plugins, given_model=model is not None)
    if model is None:
        tokenizer = load_tokenizer(config.model)
    calib = calibration_ids(tokenizer, config, plugins)  # a short text fails before loading
    model, checkpoint = _load_float(config, model_path, plugins) if model is None else (model, None)
    if not quantizer.uses_calibration() and config.error_windows is not None \
            and len(calib) > config.error_windows:
        log.info("%s needs no calibration activations: forwarding %d of %d windows (the "
                 "per-layer error's)", quantizer.name, config.error_windows, len(calib))
        calib = calib[: config.error_windows]
    config, quantizer, notices = _fit_group_size(config, quantizer, model, plugins)
    adapter = _check_model(model, quantizer, checkpoint, plugins)
    writer = _layer_writer(config, plugins)
    options = LoopOptions(
        plugins=run, propagation=config.propagation, batch_size=config.calibration.batch_size,
        error_windows=config.error_windows, progress=progress, writer=writer,
        source=checkpoint.load_layer if checkpoint is not None else None,
        modules=plugins.registry("module"), activation_budget=config.activation_budget_bytes(),
        offload_dir=Path(config.offload_dir) if config.offload_dir else None)
    report = run_layerwise(model, quantizer, adapter, backend, calib, options)
    report.notices += notices
    metadata = {"run": config.model_dump(mode="json"),
                "scheme": quantizer.scheme.model_dump(mode="json"),
                "report": report.model_dump(mode="json"), "versions": package_versions()}
    if writer is not None:
        saved = writer.finish(model, tokenizer, metadata).path
        return QuantizeResult(tokenizer=tokenizer, report=report, saved=saved, config=config)
    backend.install_kernels(model)
    saved = _save_whole(model, tokenizer, config, metadata, plugins)
    return QuantizeResult(tokenizer=tokenizer, report=report, saved=saved, config=config,
                          in_memory=model)


def _fit_group_size(config: RunConfig, quantizer: Quantizer, model: nn.Module,
                    plugins: PluginManager) -> tuple[RunConfig, Quantizer, list[str]]:
    """A preset's group size that does not divide every quantized layer's input features
    falls back, with a notice, to the largest power of two that does; a group size the
    user chose (``group_size``, or a scheme of their own) stays an error."""
    if config.group_size is not None or not isinstance(config.scheme, str):
        return config, quantizer, []
    try:
        check_group_size(model, adapter_for(model, plugins), quantizer.scheme)
    except GroupSizeMismatch as exc:
        notice = (f"the {config.scheme} preset's group size "
                  f"{quantizer.scheme.weights.group_size} does not divide the input features "
                  f"of {exc.where}: using {exc.fits}, the largest power of two that divides "
                  "every quantized layer (recorded in the saved model's run configuration)")
        log.warning("%s", notice)
        config = config.model_copy(update={"group_size": exc.fits})
        return config, build_quantizer(config.method, config.resolved_scheme(),
                                       config.method_config, plugins), [notice]
    return config, quantizer, []


def _check_inputs(config: RunConfig, quantizer: Quantizer, plugins: PluginManager,
                  given_model: bool) -> Path | None:
    """Everything that can be checked before a model loads: the calibration source, the
    model source, the save format against the method, the output folder. Returns the
    model's local path (None for a hub id or a given model)."""
    try:
        datasets(plugins).resolve(config.calibration.data).check(config.calibration.data)
    except ValueError as exc:
        raise ConfigError(f"calibration.data: {exc}") from exc
    model_path = None
    if not given_model:
        model_path = check_model_source(config.model)
        if model_path is not None and model_path.is_dir() and find_format(model_path, plugins):
            raise ConfigError(f"{config.model} is already a quantized qcore model")
    if config.save is not None:
        problem = plugins.get("format", config.format).check_run(
            quantizer.scheme, quantizer.online_transforms())  # what the method produces
        if problem:
            raise ConfigError(f"`format` {config.format}: {problem}")
        inputs = [p for p in (model_path, Path(config.calibration.data.source)) if p is not None]
        check_output_dir(config.save, overwrite=config.overwrite, inputs=inputs,
                         expected_bytes=_expected_save_bytes(model_path, config))
    return model_path


def _load_float(config: RunConfig, model_path: Path | None, plugins: PluginManager
                ) -> tuple[nn.Module, StreamedCheckpoint | None]:
    """The float model: a skeleton whose layers stream from the checkpoint, or whole."""
    dtype = resolve_dtype(config.dtype, model_path)
    if config.stream and can_stream(model_path):
        checkpoint = StreamedCheckpoint(model_path, dtype)
        checkpoint.check()  # every tensor listed, before any work
        return checkpoint.model, checkpoint
    model, _, _ = load_model(config.model, plugins, dtype=dtype)
    return model, None


def _check_model(model: nn.Module, quantizer: Quantizer, checkpoint: StreamedCheckpoint | None,
                 plugins: PluginManager) -> ArchitectureAdapter:
    """Checks that need the model, before any work: group size, roles, layer names in
    options, finite weights. Returns the model's architecture adapter."""
    adapter = adapter_for(model, plugins)
    try:
        check_group_size(model, adapter, quantizer.scheme)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if missing := adapter.roles().missing(quantizer.needed_roles()):
        raise ConfigError(
            f"{quantizer.name} needs the decoder-layer role(s) {', '.join(missing)}, which the "
            f"{adapter.name!r} architecture adapter ({type(adapter).__name__}) does not name; "
            "its roles() must return them")
    known = adapter.linear_names()
    for option, names in quantizer.layer_options().items():
        for name in names:
            if name not in known:
                raise ConfigError(f"{quantizer.name} option {option}: {name!r} is not a linear "
                                  f"of this model's decoder layers ({', '.join(known)})")
    if checkpoint is not None:  # the decoder layers are checked as they load
        checkpoint.load_outside(adapter.decoder_layers())
    else:
        check_source_weights(model)
    return adapter


def _layer_writer(config: RunConfig, plugins: PluginManager) -> LayerWriter | None:
    """The format's layer-by-layer writer when the run streams its output."""
    writer = None
    if config.save is not None and config.stream:
        # what a resumed run must share with the interrupted one: every setting that changes
        # the quantized tensors, and the versions that compute them
        run = {"run": config.model_dump(mode="json", exclude=set(RunConfig.NOT_IDENTITY)),
               "versions": package_versions()}
        writer = plugins.get("format", config.format)().layer_writer(
            Path(config.save), run=run, resume=config.resume, max_shard_size=config.max_shard_size)
    elif config.resume:
        raise ConfigError("`resume` continues a layer-by-layer save: give `save` and leave "
                          "streaming on")
    if config.resume and writer is None:
        raise ConfigError(f"`resume` continues a layer-by-layer save: it needs `save`, "
                          f"streaming and a format that writes layer by layer (the "
                          f"{config.format!r} format saves whole models only)")
    return writer


def _save_whole(model: nn.Module, tokenizer: Any, config: RunConfig,
                metadata: dict[str, Any], plugins: PluginManager) -> Path | None:
    """Save a model quantized in memory; a format that refuses one of its layers still
    gets the work kept, in the qcore format beside the asked folder."""
    if config.save is None:
        return None
    if config.max_shard_size:  # as `qcore export` passes it to the format
        metadata["max_shard_size"] = config.max_shard_size
    try:
        return save_model(model, tokenizer, config.save, metadata, format=config.format,
                          plugins=plugins, overwrite=config.overwrite)
    except ValueError as exc:
        if config.format == "qcore":
            raise
        save, n = Path(config.save), 1  # the rescue: a new sibling of the asked folder
        while (rescue := save.with_name(f"{save.name}-qcore{n if n > 1 else ''}")).exists():
            n += 1
        save_model(model, tokenizer, rescue, metadata, plugins=plugins)
        raise ConfigError(f"`format` {config.format}: {exc}; the quantized model was "
                          f"saved in the qcore format at {rescue} instead") from exc


def evaluate(model: nn.Module, tokenizer: Any, evaluator: str, options: dict[str, Any], *,
             backend: str = "cpu", plugins: PluginManager | None = None,
             listeners: Iterable[Any] = (), page_layers: bool | None = None) -> EvaluationResult:
    """Run ``evaluator`` on ``model``. ``page_layers``: drop the memory-mapped pages of each
    decoder layer, of the embedding and of the head after each of their forwards, so
    memory holds about one of them (default: when they are mapped and larger than half the
    memory available); the numbers are the same either way."""
    plugins = plugins or get_plugin_manager()
    ev = build_evaluator(evaluator, options, plugins)
    be = build_backend(backend, plugins)
    be.install_kernels(model)
    # the decoder layers, and the embedding and head (as large as a few layers)
    modules = [model.get_input_embeddings(), *adapter_for(model, plugins).decoder_layers(),
               model.get_output_embeddings()]
    if page_layers is None:  # a model mapped from files and too big to keep resident
        page_layers = sum(mapped_bytes(m) for m in modules) > \
            available_memory_bytes() * DEFAULT_BUDGET_FRACTION
    paging = page_out_after_forward(modules, be.release_host_memory) if page_layers \
        else nullcontext(0)
    with paging as paged:
        if paged:
            log.info("evaluating with %d modules paged in and out of memory", paged)
        result = ev.evaluate(model, tokenizer, be, RunResources(plugins))
    plugins.for_run(listeners).hook.qcore_evaluation_finished(result=result)
    return result


def perplexity(model: nn.Module, tokenizer: Any, data: DataSpec | str, seq_len: int = 512,
               windows: int | None = None, **options: Any) -> float:
    """Convenience: perplexity of a model on a text source."""
    spec = data if isinstance(data, DataSpec) else DataSpec(source=data)
    result = evaluate(model, tokenizer, "perplexity",
                      {"data": spec, "seq_len": seq_len, "windows": windows, **options})
    return result.metrics["perplexity"]
