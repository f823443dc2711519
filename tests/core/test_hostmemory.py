import platform
import re
import sys

import pytest
import torch

from qcore import hostmemory as memory


def _kernel_has_pageout() -> bool:
    match = re.match(r"(\d+)\.(\d+)", platform.release())
    return sys.platform.startswith("linux") and bool(match) and (
        int(match[1]), int(match[2])) >= (5, 4)


@pytest.mark.skipif(not _kernel_has_pageout(), reason="needs Linux >= 5.4 (MADV_PAGEOUT)")
def test_page_out_drops_file_pages_and_keeps_values(tmp_path):
    """A tensor memory-mapped from a file (as safetensors checkpoints are) is advised out;
    its values are re-read from the file on the next touch; heap tensors are left alone."""
    values = torch.randn(1 << 18)  # 1 MiB
    path = tmp_path / "weights.bin"
    path.write_bytes(values.numpy().tobytes())
    mapped = torch.from_file(str(path), shared=False, size=values.numel(), dtype=torch.float32)
    assert torch.equal(mapped, values)  # touched: resident now
    advised = memory.page_out_file_backed([(mapped.data_ptr(), values.numel() * 4)])
    assert advised >= values.numel() * 4 - 2 * 4096  # whole pages inside the range
    assert torch.equal(mapped, values)
    heap = values.clone()
    assert memory.page_out_file_backed([(heap.data_ptr(), heap.numel() * 4)]) == 0
    assert memory.page_out_file_backed([]) == 0
