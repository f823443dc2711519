"""Placement over several devices (qcore.engine.placement). No machine here has two accelerators:
the device maps are checked as decisions (accelerate's balanced map over the devices'
memory), and the pipeline's path through them runs on CPU devices."""

import subprocess
import sys
import textwrap

import torch

from qcore import api
from qcore.context import LayerContext
from qcore.engine.pipeline import run_layerwise
from qcore.engine.placement import layer_devices, model_device_map
from qcore.interfaces import MemoryStats
from qcore.schemes import get_scheme
from qcore_backends.cpu.backend import CPUBackend


class TwoDevices(CPUBackend):
    """A CPU backend that says it has two devices (both the CPU) with given free memory."""

    def __init__(self, memory=(None, None)):
        super().__init__()
        self.memory = dict(zip(("first", "second"), memory, strict=True))

    @property
    def devices(self):
        return [torch.device("cpu"), torch.device("cpu", 0)]

    def device_memory_bytes(self, device):
        return self.memory["first" if device.index is None else "second"]

    def memory_stats(self):
        return MemoryStats(rss_mb=0, peak_rss_mb=0)


def test_one_device_takes_every_layer(plugins):
    from conftest import make_tiny_model

    layers = make_tiny_model("llama", num_hidden_layers=4).model.layers
    assert layer_devices(layers, CPUBackend()) == [torch.device("cpu")] * 4


def test_layers_are_balanced_over_the_devices_memory(plugins):
    from conftest import make_tiny_model

    layers = make_tiny_model("llama", num_hidden_layers=6).model.layers
    one = sum(p.numel() * 4 for p in layers[0].parameters())
    first, second = torch.device("cpu"), torch.device("cpu", 0)
    # unknown memory: an even split, in order
    assert layer_devices(layers, TwoDevices()) == [first] * 3 + [second] * 3
    # room for two layers on the first device (accelerate keeps one layer's room free on
    # it for buffers): the rest go to the second, in order
    placed = layer_devices(layers, TwoDevices((2 * one + 1, 100 * one)))
    k = placed.count(first)
    assert 1 <= k <= 2 and placed == [first] * k + [second] * (6 - k)


def test_the_pipeline_runs_each_layer_on_its_device_with_the_same_result(plugins, calib_ids,
                                                                         monkeypatch):
    from conftest import make_tiny_model

    seen = []
    original = LayerContext.__post_init__

    def record(ctx):
        original(ctx)
        seen.append(ctx.device)

    monkeypatch.setattr(LayerContext, "__post_init__", record)

    def run(backend):
        model = make_tiny_model("llama", num_hidden_layers=4)
        quantizer = api.build_quantizer("gptq", get_scheme("W4A16", 32), {}, plugins)
        report = run_layerwise(model, quantizer, api.adapter_for(model, plugins), backend,
                               calib_ids, progress=False)
        return model, report

    one, one_report = run(CPUBackend())
    seen.clear()
    two, two_report = run(TwoDevices())
    assert seen == [torch.device("cpu")] * 2 + [torch.device("cpu", 0)] * 2
    assert [r.relative_mse for r in two_report.layers] == \
        [r.relative_mse for r in one_report.layers]
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_the_npu_backend_offers_every_visible_device_unless_given_one():
    """In a child process: "npu" registered as PyTorch's private device name, and a
    torch.npu that reports two devices (no tensor is ever placed on them)."""
    code = textwrap.dedent("""
        import sys, types, torch
        sys.path.insert(0, "tests")
        from conftest import fake_torch_npu, make_tiny_model
        from qcore.engine.placement import layer_devices, model_device_map
        from qcore_backends.npu.backend import NPUBackend
        layers = make_tiny_model("llama", num_hidden_layers=4).model.layers
        torch.utils.rename_privateuse1_backend("npu")
        import importlib.machinery
        fake = fake_torch_npu()
        fake.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
        sys.modules["torch_npu"] = fake
        free = {0: 10**12, 1: 10**12}
        torch.npu = types.SimpleNamespace(device_count=lambda: 2, current_device=lambda: 1,
                                          is_available=lambda: True,
                                          mem_get_info=lambda d: (free[d.index], 0))
        backend = NPUBackend()
        assert backend.devices == [torch.device("npu", 1), torch.device("npu", 0)]
        assert NPUBackend("npu:0").devices == [torch.device("npu", 0)]
        assert backend.device_memory_bytes(torch.device("npu", 0)) == 10**12
        placed = layer_devices(layers, backend)
        assert placed == [torch.device("npu", 1)] * 2 + [torch.device("npu", 0)] * 2, placed
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_evaluation_splits_the_whole_model_over_the_devices(plugins):
    """What `dispatch` hands accelerate's dispatch_model for evaluation (dispatch_model
    itself treats "cpu" as offload, so it cannot run here on two CPU "devices")."""
    from conftest import make_tiny_model

    model = make_tiny_model("qwen2", num_hidden_layers=4)
    device_map = model_device_map(model, TwoDevices())
    first, second = torch.device("cpu"), torch.device("cpu", 0)
    layers = [device_map[f"model.layers.{i}"] for i in range(4)]
    assert device_map["model.embed_tokens"] == first and device_map["lm_head"] == second
    assert layers[0] == first and layers[-1] == second and sorted(
        set(device_map.values()), key=str) == [first, second]
