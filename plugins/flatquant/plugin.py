"""Registers the FlatQuant quantizer and its online transform modules with qcore."""

from qcore.hookspecs import hookimpl
from qcore_flatquant.quantizer import FlatQuantQuantizer
from qcore_flatquant.transforms import (
    KEY_TYPE,
    KRON_TYPE,
    FlatQuantKeyTransform,
    FlatQuantTransform,
)


@hookimpl
def qcore_register_quantizers(register):
    register(FlatQuantQuantizer)


@hookimpl
def qcore_register_modules(register):
    register(KRON_TYPE, FlatQuantTransform)
    register(KEY_TYPE, FlatQuantKeyTransform)
