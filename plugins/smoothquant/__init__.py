"""SmoothQuant quantizer plugin."""
