"""A tiny study: the tiny Qwen2 folder, RTN at three schemes, perplexity, layer-error and
kernel-time, all on the fixture's calibration text."""

from __future__ import annotations

import pytest

from qcore.study import StudyGrid


def tiny_grid(folder, **overrides) -> StudyGrid:
    text = {"source": str(folder / "calib.txt")}
    data = {
        "title": "tiny study",
        "models": [{"path": str(folder / "tiny"), "name": "tiny"}],
        "methods": [{"method": "rtn", "schemes": ["W4A16", "W8A8", "W4A4"]}],
        "group_size": 32,
        "calibration": {"data": text, "samples": 2, "seq_len": 16, "batch_size": 1},
        "evaluators": [
            {"evaluator": "perplexity", "options": {"data": text, "seq_len": 16,
                                                    "windows": 2}},
            {"evaluator": "layer-error", "options": {"data": text, "seq_len": 16,
                                                     "windows": 1}},
            {"evaluator": "kernel-time", "schemes": ["fp", "W8A8"],
             "options": {"data": text, "seq_len": 16, "windows": 1}},
        ],
        "error_windows": 1,
    }
    data.update(overrides)
    return StudyGrid.model_validate(data)


@pytest.fixture
def make_grid(tiny_folder):
    """``make_grid(**fields)``: the tiny grid with some fields replaced."""
    return lambda **overrides: tiny_grid(tiny_folder, **overrides)
