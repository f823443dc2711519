"""The built-in grids on the embedded SmolLM2-135M (offline: Python's pydoc text,
calibrated on its first half, evaluated on its second).

``default_grid``: RTN, GPTQ and AWQ at W4A16 and W3A16 (group 64: SmolLM2's 576 features
need a divisor; AWQ's scale search scored on 4 of the 16 calibration windows), SmoothQuant
W8A8, FlatQuant W4A4 with a short training (2 epochs instead of the recipe's 15), RTN
W4A4; perplexity on every cell, the layer-wise error against the float model on the
quantized ones, and the INT8 kernel's time split on W8A8 (and the float model, for the
speed ratio). ``quick_grid``: five cells with tiny calibration and evaluation, a smoke run
of about two minutes.
"""

from __future__ import annotations

from qcore.config import CalibrationConfig
from qcore_study.grid import BASELINE, EvaluatorEntry, MethodEntry, ModelEntry, StudyGrid

CALIB = {"source": "pydoc", "part": "head"}
HELD_OUT = {"source": "pydoc", "part": "tail"}
SMOLLM2 = ModelEntry(path="smollm2", name="SmolLM2-135M")


def _evaluators(seq_len: int, windows: int, layer_windows: int) -> list[EvaluatorEntry]:
    return [
        EvaluatorEntry(evaluator="perplexity",
                       options={"data": HELD_OUT, "seq_len": seq_len, "windows": windows}),
        EvaluatorEntry(evaluator="layer-error",
                       options={"data": HELD_OUT, "seq_len": seq_len,
                                "windows": layer_windows}),
        EvaluatorEntry(evaluator="kernel-time", schemes=[BASELINE, "W8A8"],
                       options={"data": HELD_OUT, "seq_len": seq_len, "windows": 2}),
    ]


def default_grid() -> StudyGrid:
    weight_only = ["W4A16", "W3A16"]
    return StudyGrid(
        title="qcore default study: SmolLM2-135M",
        models=[SMOLLM2],
        methods=[
            MethodEntry(method="rtn", schemes=[*weight_only, "W4A4"]),
            MethodEntry(method="gptq", schemes=weight_only),
            # the scale search scores 4 of the 16 windows (llm-awq: all) to bound its time
            MethodEntry(method="awq", schemes=weight_only, options={"search_samples": 4}),
            MethodEntry(method="smoothquant", schemes=["W8A8"]),
            MethodEntry(method="flatquant", name="flatquant-2ep", schemes=["W4A4"],
                        options={"epochs": 2}),
        ],
        group_size=64,
        calibration=CalibrationConfig(data=CALIB, samples=16, seq_len=512),
        evaluators=_evaluators(seq_len=512, windows=16, layer_windows=2),
    )


def quick_grid() -> StudyGrid:
    return StudyGrid(
        title="qcore quick study: SmolLM2-135M (smoke run)",
        models=[SMOLLM2],
        methods=[
            MethodEntry(method="rtn", schemes=["W4A16", "W4A4"]),
            MethodEntry(method="gptq", schemes=["W4A16"]),
            MethodEntry(method="smoothquant", schemes=["W8A8"]),
        ],
        group_size=64,
        calibration=CalibrationConfig(data=CALIB, samples=4, seq_len=256),
        evaluators=_evaluators(seq_len=256, windows=4, layer_windows=1),
        error_windows=2,
    )
