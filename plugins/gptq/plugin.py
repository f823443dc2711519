"""Registers the GPTQ quantizer with qcore."""

from qcore.hookspecs import hookimpl
from qcore_gptq.quantizer import GPTQQuantizer


@hookimpl
def qcore_register_quantizers(register):
    register(GPTQQuantizer)
