"""The contracts plugins implement: Quantizer, Backend, Evaluator, Dataset, Format.

(Architecture adapters live in :mod:`qcore.models.adapter`.) Each kind has a class-level ``name``
under which it is registered and, where it takes options, a pydantic ``Config`` with
``extra="forbid"`` so that a misspelt option fails before any work is done."""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from qcore.reports import EvaluationResult
from qcore.schemes import QuantArgs, QuantScheme

if TYPE_CHECKING:
    from qcore.context import LayerContext
    from qcore.models.adapter import ArchitectureAdapter
    from qcore.plugins import PluginManager
    from qcore.quant.linear import Kernel, QuantLinear, SolvedWeight


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UnsupportedScheme(ValueError):
    pass


def missing_packages(requires: dict[str, str]) -> dict[str, str]:
    """Those of ``requires`` (import name -> install command) that cannot be imported."""
    return {name: how for name, how in requires.items() if importlib.util.find_spec(name) is None}


#: marks a config field that lists linears of a decoder layer by name (``mlp.down_proj``):
#: the API checks every entry against the model's adapter before any work, so a misspelt
#: name is an error instead of silently matching nothing
LAYER_NAMES = "qcore:layer-names"
LayerNameList = Annotated[list[str], LAYER_NAMES]


class Quantizer(ABC):
    """A PTQ method. The pipeline calls :meth:`quantize_layer` once per decoder layer."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]] = NoOptions
    description: ClassVar[str] = ""
    #: "quantized": each layer's inputs come from the already-quantized previous layers;
    #: "full": from the full-precision model (methods that train against fp targets).
    propagation: ClassVar[Literal["quantized", "full"]] = "quantized"
    #: roles of a decoder layer (:class:`qcore.models.adapter.LayerRoles` field names) the
    #: method reads; a model whose adapter lacks one is refused before any work
    required_roles: ClassVar[tuple[str, ...]] = ()
    #: True if :meth:`quantize_layer` reads ``ctx.fp_outputs`` (the float layer's outputs on
    #: every calibration batch); otherwise the pipeline computes them only for the windows
    #: it measures the layer's error on, which saves a full layer forward per layer.
    needs_fp_outputs: ClassVar[bool] = False
    #: the scheme preset a run of this method gets when it names none (its best measured
    #: use: W8A8 for SmoothQuant, W4A4 for FlatQuant); None: the global default, W4A16
    default_scheme: ClassVar[str | None] = None

    def __init__(self, config: BaseModel, scheme: QuantScheme) -> None:
        self.config = config
        self.scheme = scheme
        self.check_scheme(scheme)

    def check_scheme(self, scheme: QuantScheme) -> None:
        """Raise :class:`UnsupportedScheme` for a scheme this method cannot produce."""

    def bind(self, plugins: PluginManager) -> None:
        """Resolve the plugins this method composes (a weight solver, ...) from the run's
        plugin manager and validate their options; raise ValueError naming what is wrong.
        Called by :meth:`qcore.plugins.PluginManager.build_quantizer` before any work."""

    def uses_calibration(self) -> bool:
        """False when the quantized model depends on no activation (e.g. round-to-nearest
        weights with dynamic or no activation quantization): the run then forwards only
        the calibration windows each layer's error is measured on."""
        return True

    def online_transforms(self) -> bool:
        """Whether the quantized model computes transforms at run time (QuantLinear
        ``input_transform``, e.g. FlatQuant's): a save format that cannot store them
        refuses the run before any work."""
        return False

    def needed_roles(self) -> tuple[str, ...]:
        """The roles this configured method reads (``required_roles``, plus those of any
        method it composes)."""
        return self.required_roles

    def layer_options(self) -> dict[str, list[str]]:
        """Options naming linears of a decoder layer (``option -> names``), checked against
        the model before work. Default: the config's :data:`LayerNameList` fields."""
        fields = type(self.config).model_fields.items()
        return {field: list(getattr(self.config, field)) for field, info in fields
                if LAYER_NAMES in info.metadata}

    def prepare(self, model: nn.Module, adapter: ArchitectureAdapter) -> None:
        """Called once before the layer loop (e.g. to patch attention for KV quantization)."""

    def float_pass_hooks(self, ctx: LayerContext) -> dict[str, Callable[..., None]]:
        """Hooks ``fn(name, module, x, y)`` by submodule name for the pipeline's float pass, which
        then runs over every calibration batch (it also gives the reference outputs): where a method
        collects statistics of the float layer's activations instead of running a pass of its own.
        Default: none (the float pass covers only the batches the layer's error is measured on)."""
        return {}

    @abstractmethod
    def quantize_layer(self, ctx: LayerContext) -> dict[str, Any]:
        """Quantize ``ctx.layer`` in place: leave every quantized linear replaced by a
        :class:`qcore.quant.linear.QuantLinear` (or fold transforms into the float weights,
        for a method that only transforms); return statistics for the layer report."""

    def finalize(self, model: nn.Module, adapter: ArchitectureAdapter) -> None:
        """Called once after the layer loop."""


class WeightSolver(ABC):
    """Rounds one weight matrix to a weight scheme: the last step of a method.

    Transforming methods (:class:`ComposesSolver`) round with the solver their
    ``weight_method`` names, so one registered through ``qcore_register_solvers`` composes
    with them. A solver with ``needs_hessian`` receives the linear's input Hessian
    ``2/N sum x x^T`` (of the input the quantized linear really multiplies: transformed,
    clipped and fake-quantized where the method does so)."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]] = NoOptions
    description: ClassVar[str] = ""
    needs_hessian: ClassVar[bool] = False

    def __init__(self, config: BaseModel) -> None:
        self.config = config

    def check_args(self, args: QuantArgs) -> None:
        """Raise :class:`UnsupportedScheme` for weight arguments this solver cannot produce."""

    @abstractmethod
    def solve(self, weight: torch.Tensor, args: QuantArgs, hessian: torch.Tensor | None,
              backend: Backend, name: str) -> SolvedWeight:
        """Quantization parameters (and the weight values they round) for ``weight``
        (out, in); ``name`` is the linear's full name, for messages."""


class ComposesSolver(Quantizer):
    """A method that changes a layer's float weights (smoothing, learned transforms) and
    rounds them with the registered weight solver its config names: ``weight_method``
    (a solver's name) and ``weight_options`` (that solver's options). :meth:`bind`
    resolves the solver from the run's plugin manager before any work, so a misspelt name
    or option fails up front; :meth:`weight_solver` hands it to ``quantize_layer``."""

    solver: WeightSolver | None = None

    def rounds_weights(self) -> bool:
        """Whether this configuration rounds weights at all (False: transform only)."""
        return True

    def bind(self, plugins: PluginManager) -> None:
        if self.rounds_weights():
            self.solver = plugins.build_solver(
                self.config.weight_method, self.config.weight_options, self.scheme.weights,
                owner=f"{self.name} weight_method")

    def weight_solver(self) -> WeightSolver:
        if self.solver is None:
            raise RuntimeError(f"{self.name}: bind(plugins) resolves the weight solver before "
                               "the run (PluginManager.build_quantizer does)")
        return self.solver


class MemoryStats(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rss_mb: float
    peak_rss_mb: float
    device_allocated_mb: float | None = None
    device_peak_mb: float | None = None


class Backend(ABC):
    """Where a model runs and what the hardware can execute for real.

    The pipeline places each decoder layer on :attr:`device` while it is processed and moves it back
    to :attr:`offload_device`. Linear algebra that some hardware lacks (Cholesky on Ascend NPU) goes
    through :meth:`cholesky` and friends, so a backend can route it elsewhere."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: the accelerator one run on this backend occupies, as a cluster scheduler names it
    #: (``GPU``; ``NPU`` as vllm-ascend registers it in Ray); None: the CPU alone
    accelerator: ClassVar[str | None] = None
    #: packages it imports (import name -> install command), named when it is unavailable
    requires: ClassVar[dict[str, str]] = {}

    @classmethod
    def is_available(cls) -> bool:
        return True

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    def devices(self) -> list[torch.device]:
        """Every device this backend may place decoder layers on (:mod:`qcore.engine.placement`
        balances them with accelerate); :attr:`device` is the first."""
        return [self.device]

    def device_memory_bytes(self, device: torch.device) -> int | None:
        """Free memory of ``device`` for placing layers (None: unknown, split evenly)."""
        return None

    @property
    def offload_device(self) -> torch.device:
        return torch.device("cpu")

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a decoder layer of a ``dtype`` model runs in while the pipeline works
        on it (the model stays ``dtype`` in memory; hidden states are rounded to it between
        layers). A backend without fast half-precision matmuls answers float32."""
        return dtype

    def real_kernels(self) -> dict[str, str]:
        """Which schemes run on a real integer kernel: "scheme key" -> "kernel description"."""
        return {}

    def kernel_for(self, module: QuantLinear) -> Kernel | None:
        """A real kernel for this layer, or None to use the reference path."""
        return None

    def install_kernels(self, model: nn.Module) -> dict[str, int]:
        """Attach real kernels to every QuantLinear this backend can run; count by kernel."""
        from qcore.quant.linear import QuantLinear

        counts: dict[str, int] = {}
        for module in model.modules():
            if isinstance(module, QuantLinear):
                kernel = self.kernel_for(module)
                module.kernel = kernel
                key = getattr(kernel, "__name__", "reference") if kernel else "reference"
                counts[key] = counts.get(key, 0) + 1
        return counts

    # linear algebra; default: on this backend's device
    def cholesky(self, a: torch.Tensor, upper: bool = False) -> torch.Tensor:
        return torch.linalg.cholesky(a, upper=upper)

    def cholesky_inverse(self, factor: torch.Tensor, upper: bool = False) -> torch.Tensor:
        return torch.cholesky_inverse(factor, upper=upper)

    @abstractmethod
    def memory_stats(self) -> MemoryStats: ...

    def reset_peak_memory(self) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def release_host_memory(self, ranges: list[tuple[int, int]]) -> None:
        """Hint that these (address, bytes) ranges of host memory, where a layer's replaced
        float tensors lived, are not needed any more, so they can go back to the OS even
        while other tensors of the same memory-mapped checkpoint stay alive. A hint only:
        it must not change the contents of memory that is still in use."""


class Evaluator(ABC):
    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]] = NoOptions
    description: ClassVar[str] = ""
    #: the metrics a study's table shows (empty: all); files keep every metric
    summary_metrics: ClassVar[tuple[str, ...]] = ()
    #: optional packages it imports (import name -> install command), checked before any model loads
    requires: ClassVar[dict[str, str]] = {}

    def __init__(self, config: BaseModel) -> None:
        self.config = config

    def missing(self) -> dict[str, str]:
        """The packages this configured evaluator needs and cannot import (name -> install
        command); the default checks :attr:`requires`."""
        return missing_packages(self.requires)

    @abstractmethod
    def evaluate(self, model: nn.Module, tokenizer: Any, backend: Backend, texts: TextSource
                 ) -> EvaluationResult: ...


class DataSpec(BaseModel):
    """Where text comes from. ``part`` splits a text in two at an article/paragraph
    boundary near its middle, so that calibration and evaluation can be disjoint."""

    model_config = ConfigDict(extra="forbid")
    source: str
    dataset: str | None = None  # plugin name; None = detect from source
    part: Literal["all", "head", "tail"] = "all"
    field: str | None = None  # for JSONL / HF datasets


class Dataset(ABC):
    name: ClassVar[str]
    description: ClassVar[str] = ""

    @classmethod
    def matches(cls, source: str) -> bool:
        """Whether this dataset can read ``source`` when no dataset is named."""
        return False

    def check(self, spec: DataSpec) -> None:
        """Cheap checks before any work (e.g. that a file exists); raise ValueError naming
        the problem. Reading the whole source is :meth:`load_text`'s job."""

    @abstractmethod
    def load_text(self, spec: DataSpec) -> str:
        """The whole text of the source (documents joined by blank lines)."""


class TextSource(ABC):
    """What an evaluator reads: text resolved from a DataSpec by the datasets registry."""

    @abstractmethod
    def text(self, spec: DataSpec) -> str: ...


class EvaluationResources(TextSource):
    """What the core offers an evaluator besides the model (passed as ``evaluate``'s
    ``texts``): text from a DataSpec, the model placed on a backend's devices, another
    model (a float reference), an architecture adapter, another backend."""

    @abstractmethod
    def place(self, model: nn.Module, backend: Backend) -> nn.Module:
        """``model`` on the backend's device, or spread over its devices."""

    @abstractmethod
    def load_model(self, source: str) -> tuple[nn.Module, Any, dict[str, Any] | None]:
        """(model, tokenizer, qcore metadata or None for a float model) on the CPU."""

    @abstractmethod
    def adapter_for(self, model: nn.Module) -> ArchitectureAdapter: ...

    @abstractmethod
    def backend(self, name: str) -> Backend: ...


class SavedModel(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    path: Path
    metadata: dict[str, Any]


class LayerWriter(ABC):
    """Receives a quantized model one decoder layer at a time while the pipeline runs, so
    that the output never accumulates in memory; the folder appears, complete, only when
    :meth:`finish` succeeds. A killed run leaves the finished layers where a writer opened
    with ``resume=True`` for the same run finds them."""

    @abstractmethod
    def finished(self, prefix: str) -> dict[str, Any] | None:
        """The saved report of decoder layer ``prefix`` when an earlier run wrote it."""

    @abstractmethod
    def restore(self, model: nn.Module, prefix: str, modules: dict[str, type[nn.Module]]) -> None:
        """Put the saved quantized layer ``prefix`` back into ``model`` (a resumed run
        needs its outputs as the next layer's inputs)."""

    @abstractmethod
    def write(self, prefix: str, layer: nn.Module, report: dict[str, Any]) -> None:
        """Take a finished decoder layer (its tensors named ``prefix`` + local name)."""

    @abstractmethod
    def finish(self, model: nn.Module, tokenizer: Any, metadata: dict[str, Any]) -> SavedModel:
        """Write the rest (tensors outside the written layers, configs, tokenizer,
        metadata) and move the output into place."""

    @abstractmethod
    def discard(self) -> None:
        """Remove everything written so far."""


class Format(ABC):
    name: ClassVar[str]
    description: ClassVar[str] = ""

    def layer_writer(self, path: Path, run: dict[str, Any], resume: bool = False,
                     max_shard_size: str | None = None) -> LayerWriter | None:
        """A writer that saves layer by layer into ``path`` (``run``: what identifies the
        run, for resuming), or None when this format saves whole models only."""
        return None

    @classmethod
    def can_load(cls, path: Path) -> bool:
        return False

    @classmethod
    def check_run(cls, scheme: QuantScheme, online_transforms: bool) -> str | None:
        """Why this format cannot hold a model quantized with ``scheme`` (and online
        transforms, if any), or None; asked before a run whose output it will write."""
        return None

    @classmethod
    def diagnose(cls, path: Path) -> str | None:
        """Why a folder this format cannot load still looks like its output (e.g. its
        metadata file is gone), as a one-line message; None when it does not. Loading
        refuses such a folder instead of reading it as a float model."""
        return None

    @abstractmethod
    def save(self, model: nn.Module, tokenizer: Any, path: Path, metadata: dict[str, Any]
             ) -> SavedModel: ...

    @abstractmethod
    def load(self, path: Path, modules: dict[str, type[nn.Module]]) -> tuple[nn.Module, Any, dict]:
        """Return (model, tokenizer, metadata)."""
