"""AWQ quantizer plugin."""
