"""FlatQuant quantizer plugin."""
