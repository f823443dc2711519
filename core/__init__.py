"""qcore: post-training quantization for decoder-only LLMs, built from plugins.

The core defines contracts (:mod:`qcore.interfaces`), schemes (:mod:`qcore.schemes`), the
plugin manager (:mod:`qcore.plugins`), the layer-wise pipeline (:mod:`qcore.engine.pipeline`),
shared quantization primitives (:mod:`qcore.quant`) and the API (:mod:`qcore.api`). It
imports no plugin: methods, backends, evaluators, datasets, formats and architecture
adapters are all found through the ``qcore`` entry-point group.
"""

from qcore.hookspecs import hookimpl
from qcore.schemes import PRESETS, QuantArgs, QuantScheme, get_scheme

__all__ = ["hookimpl", "PRESETS", "QuantArgs", "QuantScheme", "get_scheme"]
__version__ = "0.1.0"
