"""Ascend NPU backend through torch_npu (imported lazily: it is optional)."""
