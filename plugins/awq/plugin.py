"""Registers the AWQ quantizer with qcore."""

from qcore.hookspecs import hookimpl
from qcore_awq.quantizer import AWQQuantizer


@hookimpl
def qcore_register_quantizers(register):
    register(AWQQuantizer)
