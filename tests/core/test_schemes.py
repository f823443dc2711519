import pytest
from pydantic import ValidationError

from qcore.config import RunConfig, parse_assignments
from qcore.errors import ConfigError
from qcore.schemes import PRESETS, QuantArgs, QuantScheme, get_scheme


def test_presets_have_literature_names_and_shapes():
    assert set(PRESETS) == {"W4A16", "W3A16", "W8A16", "W8A8", "W4A4", "W8A8KV8", "W4A4KV4",
                            "W8A8C8", "W8A8C8-TENSOR"}
    w4 = PRESETS["W4A16"]
    assert (w4.weights.bits, w4.weights.symmetric, w4.weights.group_size) == (4, False, 128)
    assert w4.activations is None and w4.kv_cache is None
    w8a8 = PRESETS["W8A8"]
    assert w8a8.activations.granularity == "token" and w8a8.activations.dynamic
    assert PRESETS["W4A4KV4"].kv_cache.bits == 4
    assert PRESETS["W8A8KV8"].kv_cache.group_size == 128
    c8, c8t = PRESETS["W8A8C8"].kv_cache, PRESETS["W8A8C8-TENSOR"].kv_cache
    assert (c8.granularity, c8.symmetric, c8.dynamic, c8.symmetric_range) == (
        "channel", True, False, "signed")  # msModelSlim's C8: max |x| / 127 per channel
    assert (c8t.granularity, c8t.dynamic, c8t.symmetric_range) == ("tensor", False, "full")


def test_group_size_override_and_case_insensitive_lookup():
    s = get_scheme("w4a16", group_size=64)
    assert s.weights.group_size == 64 and s.weights.granularity == "group"
    per_channel = get_scheme("W8A16", group_size=32)
    assert per_channel.weights.granularity == "group" and per_channel.weights.group_size == 32


@pytest.mark.parametrize("kwargs, fragment", [
    ({"bits": 1}, "bits"),
    ({"bits": 4, "granularity": "group"}, "group_size"),
    ({"bits": 4, "granularity": "channel", "group_size": 64}, "group_size=64"),
    ({"bits": 4, "granularity": "rows"}, "granularity"),
    ({"bits": 4, "colour": "red"}, "colour"),
])
def test_invalid_quant_args_name_the_field(kwargs, fragment):
    with pytest.raises(ValidationError) as err:
        QuantArgs(**kwargs)
    assert fragment in str(err.value)


def test_scheme_rejects_token_weights_and_static_token_activations():
    with pytest.raises(ValidationError, match="weights.granularity"):
        QuantScheme(weights=QuantArgs(bits=4, granularity="token"))
    with pytest.raises(ValidationError, match="dynamic"):
        QuantScheme(weights=QuantArgs(bits=8),
                    activations=QuantArgs(bits=8, granularity="token", dynamic=False))


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="W4A16"):
        get_scheme("W5A5")


def test_run_config_from_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: smollm2\nmethod: rtn\nscheme: W4A16\ngroup_size: 64\n"
        "calibration:\n  data: {source: pydoc, part: head}\n  samples: 8\n  seq_len: 128\n"
    )
    cfg = RunConfig.from_file(path)
    assert cfg.resolved_scheme().weights.group_size == 64
    assert cfg.calibration.data.part == "head" and cfg.calibration.samples == 8


def test_run_config_rejects_bad_values_with_field_names(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ncalibration: {samples: 0}\n")
    with pytest.raises(ConfigError, match="run.yaml: calibration.samples: Input should be "
                                         "greater than 0 .got 0."):
        RunConfig.from_file(path)
    with pytest.raises(ValidationError, match="sampels"):
        RunConfig.model_validate({"model": "m", "calibration": {"sampels": 3}})


def test_parse_assignments_types():
    assert parse_assignments(["a=1", "b=0.5", "c=true", "d=[1, 2]", "e=text"]) == {
        "a": 1, "b": 0.5, "c": True, "d": [1, 2], "e": "text"}
    with pytest.raises(ValueError, match="key=value"):
        parse_assignments(["novalue"])
