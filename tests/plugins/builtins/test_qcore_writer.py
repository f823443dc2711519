"""The shard writer: what it writes is safetensors (read back by the safetensors library
itself, bit for bit), cut at the size limit, and it keeps no tensor in memory."""

from __future__ import annotations

import gc
import hashlib
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qcore_builtins import qcore_writer
from qcore_builtins.qcore_writer import ShardedWriter


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(33, 17, generator=g).to(torch.bfloat16),
        "a.bias": torch.randn(33, generator=g, dtype=torch.float64),
        "b.packed": torch.randint(-2**31, 2**31 - 1, (5, 8), generator=g, dtype=torch.int32),
        "b.zero": torch.randint(0, 255, (7,), generator=g, dtype=torch.uint8),
        "b.mask": torch.rand(9, generator=g) > 0.5,
        "c.half": torch.randn(2, 3, 4, generator=g).half(),
        "c.scalar": torch.tensor(3.5),
        "c.empty": torch.zeros(0, 4, dtype=torch.int8),
        "c.fp8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
        "c.strided": torch.randn(6, 4, generator=g).t(),  # not contiguous
    }


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_a_shard_reads_back_bit_identical_through_the_safetensors_library(tmp_path):
    tensors = _tensors()
    writer = ShardedWriter(tmp_path, 10**9, {"format": "pt", "written_by": "qcore"})
    writer.add(dict(list(tensors.items())[:4]))
    writer.add(dict(list(tensors.items())[4:]))
    entries = writer.close()
    file = tmp_path / "model.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    loaded = load_file(str(file))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert _bits(loaded[name]) == _bits(t), name
        assert entries[name] == {"shape": list(t.shape),
                                 "dtype": str(t.dtype).removeprefix("torch."),
                                 "sha256": hashlib.sha256(_bits(t)).hexdigest()}
    with safe_open(str(file), "pt") as f:
        assert f.metadata() == {"format": "pt", "written_by": "qcore"}
    header_len = int.from_bytes(file.read_bytes()[:8], "little")
    assert header_len % 8 == 0  # the data starts aligned, as safetensors' own writer does


def test_shards_are_cut_before_a_unit_overflows_and_indexed(tmp_path):
    units = [{f"layer{i}.w": torch.full((100,), float(i))} for i in range(5)]  # 400 B each
    writer = ShardedWriter(tmp_path, 900, {"format": "pt"})
    closed = [writer.add(u) for u in units]
    assert closed == [False, False, True, False, True]  # two units fit in 900 bytes
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 400
    assert index["weight_map"]["layer0.w"] == "model-00001-of-00003.safetensors"
    assert index["weight_map"]["layer4.w"] == "model-00003-of-00003.safetensors"
    for name, file in index["weight_map"].items():
        assert torch.equal(load_file(str(tmp_path / file))[name],
                           torch.full((100,), float(name[5])))
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob("*.tmp"))


def test_the_writer_keeps_no_reference_to_what_it_wrote(tmp_path, monkeypatch):
    monkeypatch.setattr(qcore_writer, "DIGEST_CHUNK", 1000)  # written in several chunks
    writer = ShardedWriter(tmp_path, 10**9, {"format": "pt"})
    t = torch.randn(100, 50)
    expected = t.clone()
    alive = weakref.ref(t)
    writer.add({"w": t})
    del t
    gc.collect()
    assert alive() is None  # a streamed save can drop each layer once it is written
    writer.close()
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["w"], expected)


def test_a_dtype_safetensors_cannot_hold_is_refused_by_name(tmp_path):
    writer = ShardedWriter(tmp_path, 10**9, {"format": "pt"})
    with pytest.raises(TypeError, match="layer.q: safetensors cannot hold dtype"):
        writer.add({"layer.q": torch.zeros(2, dtype=torch.complex64)})


def test_empty_units_write_nothing_and_a_repeated_name_is_refused(tmp_path):
    writer = ShardedWriter(tmp_path, 10**9, {"format": "pt"})
    assert writer.add({}) is False
    writer.add({"w": torch.ones(3)})
    with pytest.raises(ValueError, match="w: written twice"):
        writer.add({"w": torch.zeros(3)})
    writer.close()
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["w"], torch.ones(3))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_abandoning_a_shard_on_a_full_disk_does_not_raise_again(tmp_path):
    """Bytes still buffered when the disk filled fail to flush at close as well; removing
    the partial output must not stop at that."""
    writer = ShardedWriter(tmp_path, 10**9, {"format": "pt"})
    writer._data = open("/dev/full", "wb")  # noqa: SIM115 - the writer closes it
    writer.add({"small": torch.ones(4)})  # buffered, not yet written
    writer.abandon()
    assert writer._data is None
