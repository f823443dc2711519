"""Registers the RTN quantizer and the RTN weight solver with qcore."""

from qcore.hookspecs import hookimpl
from qcore_rtn.quantizer import RTNQuantizer
from qcore_rtn.solver import RTNSolver


@hookimpl
def qcore_register_quantizers(register):
    register(RTNQuantizer)


@hookimpl
def qcore_register_solvers(register):
    register(RTNSolver)
