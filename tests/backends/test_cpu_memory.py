import torch

from qcore_backends.cpu import memory


def test_page_out_drops_file_pages_and_keeps_values(tmp_path):
    """A tensor memory-mapped from a file (as safetensors checkpoints are) is advised out;
    its values are re-read from the file on the next touch; heap tensors are left alone."""
    values = torch.randn(1 << 18)  # 1 MiB
    path = tmp_path / "weights.bin"
    path.write_bytes(values.numpy().tobytes())
    mapped = torch.from_file(str(path), shared=False, size=values.numel(), dtype=torch.float32)
    assert torch.equal(mapped, values)  # touched: resident now
    advised = memory.page_out_file_backed([mapped])
    assert advised >= values.numel() * 4 - 2 * 4096  # whole pages inside the tensor
    assert torch.equal(mapped, values)
    assert memory.page_out_file_backed([values.clone()]) == 0
    assert memory.page_out_file_backed([]) == 0
