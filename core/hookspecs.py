"""Every hook a qcore plugin may implement.

A plugin is a module (or object) with functions decorated by :data:`hookimpl` and named as
below, made known through the ``qcore`` entry-point group::

    [project.entry-points.qcore]
    my_method = "my_package.plugin"

Registration hooks receive a ``register`` callback and call it once per thing they provide:
``register(cls)``, ``cls`` a subclass of the kind's contract with a unique class-level ``name``
(``qcore_register_modules`` differs, see there). Event hooks are called by the pipeline and the
evaluators; any plugin, including an object passed to :func:`qcore.api.quantize` as a listener, can
implement them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from qcore.reports import EvaluationResult, LayerReport, QuantizationReport

PROJECT = "qcore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., None]


@hookspec
def qcore_register_quantizers(register: Register) -> None:
    """Register each quantization method (:class:`qcore.interfaces.Quantizer`)."""


@hookspec
def qcore_register_solvers(register: Register) -> None:
    """Register each weight solver (:class:`qcore.interfaces.WeightSolver`): the last step
    that rounds one weight matrix, which transforming methods (SmoothQuant, FlatQuant)
    compose by name (``weight_method``)."""


@hookspec
def qcore_register_backends(register: Register) -> None:
    """Register each execution backend (:class:`qcore.interfaces.Backend`)."""


@hookspec
def qcore_register_evaluators(register: Register) -> None:
    """Register each evaluator (:class:`qcore.interfaces.Evaluator`)."""


@hookspec
def qcore_register_datasets(register: Register) -> None:
    """Register each text source (:class:`qcore.interfaces.Dataset`)."""


@hookspec
def qcore_register_formats(register: Register) -> None:
    """Register each save/load format (:class:`qcore.interfaces.Format`)."""


@hookspec
def qcore_register_architectures(register: Register) -> None:
    """Register each architecture adapter (:class:`qcore.models.adapter.ArchitectureAdapter`)."""


@hookspec
def qcore_register_modules(register: Register) -> None:
    """Call ``register(name, ModuleClass)`` for each custom ``nn.Module`` a saved model may
    contain (e.g. an online input transform), so that loading can rebuild it. The class
    must accept ``ModuleClass(**config)`` with the config its ``qcore_spec()`` returned."""


@hookspec
def qcore_register_commands(subparsers: Any) -> None:
    """Add ``qcore`` subcommands: ``p = subparsers.add_parser(name, help=...)``, its
    arguments, and ``p.set_defaults(func=run)`` where ``run(args) -> int`` is the exit
    code. (``subparsers`` is argparse's; a plugin whose hook raises is left out of the CLI
    and reported by ``qcore list-plugins``.)"""


@hookspec
def qcore_layer_quantized(report: LayerReport) -> None:
    """A decoder layer was quantized. ``report`` has its index, output reconstruction error
    (relative MSE against the full-precision layer), time and per-method statistics."""


@hookspec
def qcore_model_quantized(report: QuantizationReport, model: Any) -> None:
    """The whole model was quantized; ``report`` holds every layer's report."""


@hookspec
def qcore_evaluation_finished(result: EvaluationResult) -> None:
    """An evaluator finished; ``result`` holds its named metrics."""
