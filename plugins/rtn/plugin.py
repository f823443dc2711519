"""Registers the RTN quantizer with qcore."""

from qcore.hookspecs import hookimpl
from qcore_rtn.quantizer import RTNQuantizer


@hookimpl
def qcore_register_quantizers(register):
    register(RTNQuantizer)
