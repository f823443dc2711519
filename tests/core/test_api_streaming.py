"""`quantize` on a safetensors folder: streamed in, written out layer by layer, resumable."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from qcore import api
from qcore.config import CalibrationConfig, RunConfig
from qcore.errors import ConfigError, OutputError
from qcore.interfaces import DataSpec


@pytest.fixture
def deep_folder(tmp_path, tiny_tokenizer):
    """tmp_path with ``tiny/`` (a 4-layer tiny Llama, float32) and ``calib.txt``."""
    from conftest import make_tiny_model

    make_tiny_model("llama", num_hidden_layers=4).save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    from pydoc_data.topics import topics

    (tmp_path / "calib.txt").write_text("\n\n".join(topics[k] for k in sorted(topics))[:60000])
    return tmp_path


def _config(folder, save="out", **overrides) -> RunConfig:
    fields = dict(model=str(folder / "tiny"), method="gptq", scheme="W4A16", group_size=32,
                  calibration=CalibrationConfig(data=DataSpec(source=str(folder / "calib.txt")),
                                                samples=8, seq_len=32, batch_size=2),
                  save=str(folder / save) if save else None)
    return RunConfig(**{**fields, **overrides})


def _manifest(path) -> dict:
    return json.loads((path / "qcore.json").read_text())["tensors"]


@pytest.mark.parametrize("method", ["gptq", "awq"])  # quantized and full propagation
def test_streaming_saves_the_model_the_in_memory_path_saves(deep_folder, method):
    streamed = api.quantize(_config(deep_folder, "streamed", method=method), progress=False)
    whole = api.quantize(_config(deep_folder, "whole", method=method, stream=False),
                         progress=False)
    assert streamed.in_memory is None and whole.in_memory is not None  # layers were dropped
    assert _manifest(streamed.saved) == _manifest(whole.saved)  # every tensor's SHA-256
    assert [x.relative_mse for x in streamed.report.layers] == \
        [x.relative_mse for x in whole.report.layers]
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # read back on first use
        assert torch.equal(streamed.model(ids).logits, whole.model(ids).logits)


@pytest.mark.parametrize("stream", [True, False])
def test_many_shards_get_an_index_and_load_back(deep_folder, stream):
    result = api.quantize(_config(deep_folder, max_shard_size="20KB", stream=stream),
                          progress=False)
    index = json.loads((result.saved / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 5 and shards[0].startswith("model-00001-of-")
    assert set(index["weight_map"]) == set(_manifest(result.saved))
    assert not list(deep_folder.glob(".out*"))  # no partial folder left
    mask = os.umask(0)
    os.umask(mask)
    assert {(result.saved / f).stat().st_mode & 0o777 for f in shards} == {0o666 & ~mask}
    model, _, meta = api.load_model(str(result.saved))
    assert meta["format_version"] == 3 and len(meta["quantized_layers"]) == 4 * 7


KILL_AT_LAYER = textwrap.dedent("""
    import os, signal, sys
    from qcore import api, hookimpl
    from qcore.config import RunConfig

    class Kill:
        @hookimpl
        def qcore_layer_quantized(self, report):
            if report.index == int(sys.argv[2]):
                os.kill(os.getpid(), signal.SIGKILL)

    api.quantize(RunConfig.model_validate_json(sys.argv[1]), listeners=[Kill()],
                 progress=False)
""")


def test_resume_after_a_kill_gives_the_uninterrupted_model(deep_folder, caplog):
    config = _config(deep_folder, max_shard_size="1KB")  # a shard per layer
    proc = subprocess.run([sys.executable, "-c", KILL_AT_LAYER, config.model_dump_json(), "2"],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    partial = deep_folder / ".out.partial"
    progress = json.loads((partial / "qcore-progress.json").read_text())
    assert sorted(progress["layers"]) == ["model.layers.0", "model.layers.1"]
    assert not (deep_folder / "out").exists()  # nothing that looks done

    with pytest.raises(OutputError, match=r"interrupted run left 2 finished layer\(s\).*"
                                          r"--resume"):
        api.quantize(config, progress=False)
    with pytest.raises(ConfigError, match=r"differs in run\.group_size \(32 there, 16 now\)"):
        api.quantize(config.model_copy(update={"resume": True, "group_size": 16}),
                     progress=False)

    caplog.set_level("INFO", logger="qcore")
    resumed = api.quantize(config.model_copy(update={"resume": True}), progress=False)
    assert "model.layers.1: finished by an earlier run" in caplog.text
    assert "model.layers.2: finished" not in caplog.text and not partial.exists()
    reference = api.quantize(_config(deep_folder, "reference"), progress=False)
    assert _manifest(resumed.saved) == _manifest(reference.saved)
    saved = [x.seconds for x in resumed.report.layers[:2]]
    assert saved == [progress["layers"][f"model.layers.{i}"]["report"]["seconds"]
                     for i in range(2)]  # reports of the resumed layers are the saved ones


def test_resume_needs_a_layer_by_layer_save(deep_folder):
    with pytest.raises(ConfigError, match="`resume` continues a layer-by-layer save"):
        api.quantize(_config(deep_folder, save=None, resume=True), progress=False)
    with pytest.raises(ConfigError, match="`resume` continues a layer-by-layer save"):
        api.quantize(_config(deep_folder, stream=False, resume=True), progress=False)


def test_a_full_disk_removes_the_partial_output_and_says_so(deep_folder, monkeypatch):
    from qcore_builtins.qcore_writer import write_tensor

    calls = []

    def fill_up(file, tensor):
        calls.append(file.name)
        if len(calls) == 20:  # a tensor of the second layer
            raise OSError(errno.ENOSPC, "No space left on device", file.name)
        return write_tensor(file, tensor)

    monkeypatch.setattr("qcore_builtins.qcore_writer.write_tensor", fill_up)
    with pytest.raises(OutputError, match=r"disk filled up while writing .*\.out\.partial.*"
                                          r"partial output was removed"):
        api.quantize(_config(deep_folder, max_shard_size="1KB"), progress=False)
    assert not list(deep_folder.glob(".out*")) and not (deep_folder / "out").exists()


@pytest.mark.parametrize("method,scheme,options", [
    ("rtn", "W4A16", {}), ("gptq", "W4A16", {}), ("awq", "W4A16", {}),
    ("smoothquant", "W8A8", {}), ("flatquant", "W4A4", {"epochs": 1})])
def test_a_bf16_checkpoint_stays_bf16_and_quantizes_like_float32(tmp_path, tiny_tokenizer,
                                                                 method, scheme, options):
    from conftest import make_tiny_model

    make_tiny_model("qwen2").to(torch.bfloat16).save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text("Some calibration prose about code.\n\n" * 400)
    errors = {}
    for dtype in ("auto", "float32"):
        config = _config(tmp_path, f"out-{dtype}", method=method, scheme=scheme,
                         method_config=options, dtype=dtype)
        result = api.quantize(config, progress=False)
        meta = json.loads((result.saved / "qcore.json").read_text())
        assert meta["dtype"] == ("bfloat16" if dtype == "auto" else "float32")
        errors[dtype] = [x.relative_mse for x in result.report.layers]
        assert all(math.isfinite(e) for e in errors[dtype])
        ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert torch.isfinite(result.model(ids).logits).all()
    for bf16, f32 in zip(errors["auto"], errors["float32"], strict=True):
        assert bf16 <= 1.5 * f32 + 1e-4  # bf16 rounding of weights and hidden states only


def test_error_windows_zero_runs_no_forward_for_rtn(deep_folder, monkeypatch):
    import qcore.engine.pipeline

    layer_calls = []
    real = qcore.engine.pipeline.LayerContext.forward

    def counting(self, *args, **kwargs):
        layer_calls.append(len(self.inputs))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(qcore.engine.pipeline.LayerContext, "forward", counting)
    result = api.quantize(_config(deep_folder, method="rtn", error_windows=0), progress=False)
    assert set(layer_calls) == {0}  # no batch ever went through a layer
    assert all(math.isnan(x.relative_mse) for x in result.report.layers)


def test_a_partial_folder_without_finished_layers_is_started_over(deep_folder):
    partial = deep_folder / ".out.partial"
    partial.mkdir()
    (partial / "qcore-progress.json").write_text(json.dumps(
        {"run": {"other": 1}, "shards": [], "layers": {}}))
    (partial / "shard-00001.safetensors").write_bytes(b"half-written")
    result = api.quantize(_config(deep_folder, method="rtn"), progress=False)
    assert result.saved.is_dir() and not partial.exists()
