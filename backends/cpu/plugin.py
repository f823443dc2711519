"""Registers the CPU backend with qcore."""

from qcore.hookspecs import hookimpl
from qcore_backends.cpu.backend import CPUBackend


@hookimpl
def qcore_register_backends(register):
    register(CPUBackend)
