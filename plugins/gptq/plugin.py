"""Registers the GPTQ quantizer and the GPTQ weight solver with qcore."""

from qcore.hookspecs import hookimpl
from qcore_gptq.quantizer import GPTQQuantizer
from qcore_gptq.solver import GPTQSolver


@hookimpl
def qcore_register_quantizers(register):
    register(GPTQQuantizer)


@hookimpl
def qcore_register_solvers(register):
    register(GPTQSolver)
