"""Non-finite numbers are caught where they appear, named, with advice that fits the cause."""

import json

import pytest
import torch
from conftest import make_tiny_model

from qcore import api, hookimpl
from qcore.cli import main
from qcore.config import CalibrationConfig, RunConfig
from qcore.errors import NonFiniteError
from qcore.interfaces import DataSpec, Quantizer
from qcore.plugins import PluginManager


def _config(method="rtn", scheme="W4A16", save=None, **options):
    return RunConfig(model="tiny", method=method, scheme=scheme, group_size=32,
                     method_config=options, save=save,
                     calibration=CalibrationConfig(data=DataSpec(source="pydoc"), samples=4,
                                                   seq_len=32, batch_size=2))


def _nan_in_layer_3():
    model = make_tiny_model("llama", num_hidden_layers=5)
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight[7, 5] = float("nan")
    return model


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_nan_source_weight_is_named_before_quantizing(method, tiny_tokenizer, plugins,
                                                      tmp_path):
    with pytest.raises(NonFiniteError) as err:
        api.quantize(_config(method, save=str(tmp_path / "q")), model=_nan_in_layer_3(),
                     tokenizer=tiny_tokenizer, plugins=plugins, progress=False)
    message = str(err.value)
    assert "model.layers.3.mlp.down_proj.weight holds 1 NaN, 0 inf (first at [7, 5])" in message
    assert "nothing was quantized" in message and "damp" not in message
    assert not (tmp_path / "q").exists()


def test_nan_source_weight_through_the_cli_exits_2(tiny_folder, tiny_tokenizer, capsys):
    model = _nan_in_layer_3()
    model.save_pretrained(tiny_folder / "nan")
    tiny_tokenizer.save_pretrained(tiny_folder / "nan")
    rc = main(["quantize", "--model", str(tiny_folder / "nan"), "--method", "rtn",
               "--group-size", "32", "--calib", str(tiny_folder / "calib.txt"), "--samples",
               "2", "--seq-len", "16", "--save", str(tiny_folder / "q"), "--json"])
    assert rc == 2 and capsys.readouterr().out == ""
    assert not (tiny_folder / "q").exists()


class _Diverging(Quantizer):
    """A method whose solver writes NaN into one weight of layer 1."""

    name = "diverging"

    def quantize_layer(self, ctx):
        if ctx.index == 1:
            with torch.no_grad():
                ctx.submodule("mlp.up_proj").weight[0, 0] = float("nan")
        return {}


class _DivergingPlugin:
    @hookimpl
    def qcore_register_quantizers(self, register):
        register(_Diverging)


def test_nan_produced_by_a_method_stops_the_run_naming_layer_and_tensor(tiny_llama,
                                                                        tiny_tokenizer):
    plugins = PluginManager(extra_plugins=[("diverging", _DivergingPlugin())])
    with pytest.raises(NonFiniteError) as err:
        api.quantize(_config("diverging"), model=tiny_llama, tokenizer=tiny_tokenizer,
                     plugins=plugins, progress=False)
    message = str(err.value)
    assert message.startswith("model.layers.1: the quantized layer's outputs hold NaN/inf")
    assert "diverging wrote non-finite values into mlp.up_proj.weight" in message
    assert "solver diverged" in message


def test_gptq_hessian_of_non_finite_inputs_says_so():
    from qcore_gptq.solve import inverse_cholesky_upper

    H = torch.eye(8)
    H[2, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="k_proj: its Hessian .* holds 1 NaN/inf .* inputs "
                                             "were not finite"):
        inverse_cholesky_upper(H, 0.01, 0.01, 3, name="model.layers.4.self_attn.k_proj")


def test_gptq_cholesky_failure_of_a_finite_hessian_says_its_inputs_were_finite():
    from qcore_gptq.solve import CholeskyFailed, inverse_cholesky_upper

    H = -torch.eye(4)
    with pytest.raises(CholeskyFailed, match="finite, from finite inputs"):
        inverse_cholesky_upper(H, 0.01, 0.01, 2, name="lin")


def test_flatquant_non_finite_training_step_names_layer_epoch_and_step(
        tiny_llama, tiny_tokenizer, plugins, monkeypatch):
    import torch.nn.functional as F

    calls = {"n": 0}
    real = F.mse_loss

    def poisoned(a, b, *args, **kwargs):
        calls["n"] += 1
        loss = real(a, b, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr("qcore_flatquant.training.F.mse_loss", poisoned)
    with pytest.raises(NonFiniteError, match=r"model.layers.1, epoch 0, step 0: training loss "
                                             r"is nan \(started at .*lower lr"):
        api.quantize(_config("flatquant", scheme="W4A4", epochs=1), model=tiny_llama,
                     tokenizer=tiny_tokenizer, plugins=plugins, progress=False)


def test_json_report_of_the_cli_is_strict_json(tiny_folder, capsys):
    from conftest import rtn_args

    assert main(rtn_args(tiny_folder, "--json")) == 0
    text = capsys.readouterr().out
    json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
