"""Registers the SmoothQuant quantizer with qcore."""

from qcore.hookspecs import hookimpl
from qcore_smoothquant.quantizer import SmoothQuantQuantizer


@hookimpl
def qcore_register_quantizers(register):
    register(SmoothQuantQuantizer)
