"""Registers the Ascend NPU backend (torch_npu is only imported when it is used)."""

from qcore.hookspecs import hookimpl
from qcore_backends.npu.backend import NPUBackend


@hookimpl
def qcore_register_backends(register):
    register(NPUBackend)
