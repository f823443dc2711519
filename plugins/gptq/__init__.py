"""GPTQ quantizer plugin."""
