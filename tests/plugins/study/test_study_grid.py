import pytest

from qcore.errors import ConfigError
from qcore.plugins import get_plugin_manager
from qcore_study import StudyGrid, check_grid
from qcore_study.grid import BASELINE, cell_group_size, expand


def test_expansion_baselines_schemes_and_evaluators(make_grid):
    grid = make_grid(methods=[{"method": "rtn", "schemes": ["W4A16", "W8A8"]},
                              {"method": "gptq", "name": "gptq-ao",
                               "options": {"act_order": True}}])
    cells = check_grid(grid, get_plugin_manager())
    assert [(c.method.label if c.method else BASELINE, c.scheme) for c in cells] == [
        (BASELINE, BASELINE), ("rtn", "W4A16"), ("rtn", "W8A8"), ("gptq-ao", "W4A16")]
    by = {(c.method.label if c.method else BASELINE, c.scheme): c for c in cells}
    # layer-error compares with the float model: never on the baseline
    assert [e.label for e in by[BASELINE, BASELINE].evaluators] == ["perplexity",
                                                                     "kernel-time"]
    assert [e.label for e in by["rtn", "W4A16"].evaluators] == ["perplexity", "layer-error"]
    assert [e.label for e in by["rtn", "W8A8"].evaluators] == ["perplexity", "layer-error",
                                                               "kernel-time"]
    # the grid's group size applies to grouped presets only; W8A8 stays per channel
    assert by["rtn", "W4A16"].run.resolved_scheme().weights.group_size == 32
    assert by["rtn", "W8A8"].run.resolved_scheme().weights.granularity == "channel"
    assert by["gptq-ao", "W4A16"].run.method_config == {"act_order": True}


def test_every_problem_is_listed_before_any_work(make_grid, tiny_folder):
    grid = make_grid(
        models=[{"path": str(tiny_folder / "tiny")}, {"path": str(tiny_folder / "nope")}],
        methods=[{"method": "rtm"}, {"method": "rtn", "schemes": ["W5A16"]},
                 {"method": "gptq", "options": {"blocksize": 0, "colour": 1}}],
        evaluators=[{"evaluator": "perplexy"},
                    {"evaluator": "layer-error", "schemes": ["fp"],
                     "options": {"data": {"source": "pydoc"}}}],
        backends=["cpu", "tpu"])
    with pytest.raises(ConfigError) as info:
        check_grid(grid, get_plugin_manager())
    text = str(info.value)
    for fragment in ("models[1]", "nope", "rtm", "W5A16", "perplexy", "tpu", "colour",
                     "cannot run on the 'fp' baseline"):
        assert fragment in text, fragment
    assert "problem(s)" in text


def test_a_method_that_cannot_produce_a_scheme_is_a_grid_problem(make_grid):
    grid = make_grid(methods=[{"method": "awq", "schemes": ["W8A8"]}])
    with pytest.raises(ConfigError, match=r"methods\[0\] \(awq, W8A8\)"):
        check_grid(grid, get_plugin_manager())


def test_labels_must_be_distinct(make_grid):
    with pytest.raises(ValueError, match="share the label"):
        make_grid(methods=[{"method": "rtn"}, {"method": "rtn"}])
    grid = make_grid(methods=[{"method": "rtn"}, {"method": "rtn", "name": "rtn-mse"}])
    assert len(expand(grid)) == 3


def test_group_size_of_a_method_overrides_the_grids(make_grid):
    grid = make_grid(methods=[{"method": "rtn", "group_size": 16}])
    method = grid.methods[0]
    assert cell_group_size(grid, method, "W4A16") == 16
    assert cell_group_size(grid, method, "W3A16") == 16
    assert cell_group_size(grid, method, "W4A4") is None


def test_grid_file_errors_name_the_field(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("models: []\nmethods: [{method: rtn}]\nevaluators: [{evaluator: x}]\n"
                    "shemes: [W4A16]\n")
    with pytest.raises(ConfigError) as info:
        StudyGrid.from_file(path)
    assert "models" in str(info.value) and "shemes: unknown field" in str(info.value)


def test_the_example_grid_of_the_study_is_valid(tiny_folder):
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "examples" / "study-r1-distill.yaml"
    grid = StudyGrid.from_file(path)
    assert [m.label for m in grid.models] == ["R1-Distill-Qwen-1.5B", "R1-Distill-Qwen-7B",
                                              "QwQ-32B"]
    # the model and calibration paths are placeholders; point them at the tiny model
    local = grid.model_copy(update={
        "models": [m.model_copy(update={"path": str(tiny_folder / "tiny")})
                   for m in grid.models],
        "calibration": grid.calibration.model_copy(update={"data": grid.calibration.data.
                                                           model_copy(update={
                                                               "source": str(tiny_folder /
                                                                             "calib.txt")})}),
        "group_size": 32})
    cells = check_grid(local, get_plugin_manager())
    per_model = 1 + 2 + 2 + 1 + 2 + 3
    assert len(cells) == 3 * per_model
    gptq = next(c for c in cells if c.method and c.method.method == "gptq")
    assert gptq.run.resolved_scheme().weights.observer == "mse"
    assert {e.label for e in cells[0].evaluators} == {"perplexity", "gsm8k", "kernel-time"}
