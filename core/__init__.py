"""qcore: post-training quantization for decoder-only LLMs, built from plugins. The core
(contracts, schemes, plugin manager, engine, quantization primitives, API: see
docs/architecture.md) imports no plugin: methods, backends, evaluators, datasets, formats
and architecture adapters are all found through the ``qcore`` entry-point group."""

from qcore.hookspecs import hookimpl
from qcore.schemes import PRESETS, QuantArgs, QuantScheme, get_scheme

__all__ = ["hookimpl", "PRESETS", "QuantArgs", "QuantScheme", "get_scheme"]
__version__ = "0.1.0"
