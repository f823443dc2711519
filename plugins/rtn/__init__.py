"""Round-to-nearest (RTN) baseline quantizer."""
