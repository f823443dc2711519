"""Quantization primitives shared by every method: qparams, RTN, packing, QuantLinear."""
