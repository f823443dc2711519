"""The matrices file: identity checks and unreadable files."""

import pytest
import torch
from safetensors.torch import save_file

from qcore.errors import ConfigError
from qcore.schemes import get_scheme
from qcore_flatquant.config import FlatQuantConfig
from qcore_flatquant.matrices import (
    fingerprint,
    identity,
    load_matrices,
    matrix_file,
    save_matrices,
)


def _ident(**config):
    tensors = [torch.arange(6.0).reshape(2, 3), -torch.ones(4)]
    return identity(get_scheme("W4A4"), FlatQuantConfig(**config), "model.layers.3",
                    weights=fingerprint(tensors), inputs=fingerprint(tensors[:1]))


def test_fingerprint_sums_positive_terms_in_float64():
    fp = fingerprint([torch.tensor([[1.0, -2.0]]), torch.tensor([3.0])])
    assert fp == {"shapes": [[1, 2], [1]], "sum_abs": 6.0, "sum_sq": 14.0}


def test_round_trip_keeps_tensors_and_stats(tmp_path):
    path = matrix_file(tmp_path, "model.layers.3")
    state = {"ln.left": torch.randn(3, 3), "wclip_max.q": torch.full((4, 1), 4.0)}
    save_matrices(path, state, _ident(), {"loss_end": 0.25, "epoch_losses": [1.0, 0.5]})
    loaded, stats = load_matrices(path, _ident())
    assert stats == {"loss_end": 0.25, "epoch_losses": [1.0, 0.5]}
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


def test_options_that_act_after_training_may_differ(tmp_path):
    path = matrix_file(tmp_path, "model.layers.3")
    save_matrices(path, {"x": torch.zeros(1)}, _ident(), {})
    load_matrices(path, _ident(fuse=True, weight_method="gptq", matrices="elsewhere"))
    with pytest.raises(ConfigError, match=r"training\.lr: saved 0\.005, now 0\.001"):
        load_matrices(path, _ident(lr=1e-3))


def test_fingerprints_agree_within_rounding_only(tmp_path):
    path = matrix_file(tmp_path, "model.layers.3")
    save_matrices(path, {"x": torch.zeros(1)}, _ident(), {})
    near = _ident()
    near["inputs"]["sum_sq"] *= 1 + 1e-7
    load_matrices(path, near)
    near["inputs"]["sum_sq"] *= 1 + 1e-3
    with pytest.raises(ConfigError, match=r"inputs\.sum_sq"):
        load_matrices(path, near)


def test_unreadable_and_foreign_files_are_named(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="cannot read .*broken.safetensors"):
        load_matrices(broken, _ident())
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    with pytest.raises(ConfigError, match="no qcore_flatquant metadata"):
        load_matrices(foreign, _ident())
