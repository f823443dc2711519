import gc

import pytest
import torch

from qcore import api
from qcore.cli import main
from qcore.engine.activations import DiskActivations, plan_activations
from qcore.engine.pipeline import run_layerwise
from qcore.errors import ConfigError
from qcore.schemes import get_scheme


def test_offloaded_batches_read_back_bit_identical_in_their_own_dtype(tmp_path):
    store = DiskActivations(tmp_path, torch.device("cpu"))
    batches = [torch.randn(2, 3, 5), torch.randn(1, 3, 5).to(torch.bfloat16),
               torch.arange(6).reshape(2, 3), torch.empty(0, 4)]
    for b in batches:
        store.append(b)
    assert len(store) == 4 and store.nbytes() == 30 * 4 + 15 * 2 + 6 * 8
    for got, want in zip(store, batches, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert [t.shape for t in store[1:3]] == [(1, 3, 5), (2, 3)]
    # casts apply in order, as eager casts would round
    view = store.cast(torch.bfloat16).cast(torch.float32)
    assert torch.equal(view[0], batches[0].to(torch.bfloat16).float())
    with pytest.raises(RuntimeError, match="read-only"):
        view.append(batches[0])
    path = store.path
    del store, view, got, want
    gc.collect()
    assert not path.exists()


def test_the_plan_offloads_beyond_the_budget_and_refuses_less_than_one_batch(tmp_path):
    args = dict(windows=128, seq_len=512, hidden=1536, batch_size=4,
                dtypes=(torch.bfloat16, torch.float32), all_fp_outputs=False, directory=tmp_path)
    per_window = 512 * 1536
    plan = plan_activations(**args, budget_bytes=2**40)
    assert not plan.offload and plan.in_memory_bytes == 128 * per_window * (4 + 2)
    assert plan_activations(**{**args, "all_fp_outputs": True}, budget_bytes=2**40
                            ).in_memory_bytes == 128 * per_window * (4 + 4 + 2)
    plan = plan_activations(**args, budget_bytes=100 * 2**20)
    assert plan.offload and plan.directory == tmp_path
    assert plan.batch_bytes == 4 * per_window * (2 * 4 + 2)
    with pytest.raises(ConfigError, match=r"1\.0 MiB cannot hold one layer's activations for "
                                          r"one batch: 30\.0 MiB are needed"):
        plan_activations(**args, budget_bytes=2**20)


def test_offloading_needs_the_disk_space_and_says_how_much(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(1, 1, 1))
    with pytest.raises(ConfigError, match=f"{tmp_path} has only 1 B free"):
        plan_activations(128, 512, 1536, 4, (torch.float32, torch.float32), True,
                         budget_bytes=100 * 2**20, directory=tmp_path)


@pytest.mark.parametrize("method,scheme,dtype", [
    ("gptq", "W4A16", torch.float32),        # quantized propagation, Hessians
    ("smoothquant", "W8A8", torch.float32),  # full propagation, float-pass statistics
    ("awq", "W4A16", torch.bfloat16),        # full propagation, bf16 storage, f32 work
])
def test_offloaded_activations_give_bit_identical_results(method, scheme, dtype, plugins,
                                                          calib_ids, tmp_path, caplog):
    from conftest import make_tiny_model

    def run(budget):
        model = make_tiny_model("llama").to(dtype)
        quantizer = api.build_quantizer(method, get_scheme(scheme, 32), {}, plugins)
        report = run_layerwise(model, quantizer, api.adapter_for(model, plugins),
                               api.build_backend("cpu", plugins), calib_ids, batch_size=2,
                               progress=False, activation_budget=budget, offload_dir=tmp_path)
        return model, report

    ref_model, ref = run(None)
    caplog.clear()
    model, offloaded = run(2 * 32 * 64 * 16)  # more than one batch, less than 8 windows
    assert "offloaded to" in caplog.text
    assert [r.relative_mse for r in offloaded.layers] == [r.relative_mse for r in ref.layers]
    for (name, a), (_, b) in zip(ref_model.state_dict().items(),
                                 model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert list(tmp_path.iterdir()) == []  # the scratch folder is gone


def test_a_budget_too_small_is_refused_before_any_work(tiny_folder, capsys):
    from conftest import rtn_args

    assert main(rtn_args(tiny_folder, "--activation-budget", "1KB")) == 2
    err = capsys.readouterr().err
    assert "--activation-budget 1000 B cannot hold one layer's activations" in err
    assert main(rtn_args(tiny_folder, "--activation-budget", "lots")) == 2
    assert "--activation-budget 'lots': expected a size" in capsys.readouterr().err
