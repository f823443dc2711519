"""The lm-eval adapter, offline, on a task defined from a local JSONL file."""

import json

import pytest

from qcore import api

pytest.importorskip("lm_eval")

TASK = """task: qcore_local_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{final}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def local_task(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    data = tmp_path / "arith.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i} + {i}", "final": str(2 * i)}) + "\n"
                            for i in range(3)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "arith.yaml").write_text(TASK.format(data=data))
    return tasks


def test_local_task_runs_on_the_in_memory_quantized_model(tiny_llama, tiny_tokenizer,
                                                          local_task, plugins, one_thread):
    from qcore.config import CalibrationConfig, RunConfig
    from qcore.interfaces import DataSpec

    cfg = RunConfig(model="tiny", method="rtn", scheme="W4A16", group_size=32,
                    calibration=CalibrationConfig(data=DataSpec(source="pydoc"), samples=2,
                                                  seq_len=16))
    q = api.quantize(cfg, model=tiny_llama, tokenizer=tiny_tokenizer, plugins=plugins,
                     progress=False)
    result = api.evaluate(q.model, tiny_tokenizer, "lm-eval",
                          {"tasks": ["qcore_local_arith"], "include_path": str(local_task),
                           "max_length": 128}, plugins=plugins)
    assert result.metrics["qcore_local_arith/exact_match"] == 0.0  # a random model
    assert "qcore_local_arith" in result.details["results"]


def test_unknown_task_and_bad_folder_are_named(tiny_llama, tiny_tokenizer, local_task,
                                               plugins):
    with pytest.raises(ValueError, match="no task nope"):
        api.evaluate(tiny_llama, tiny_tokenizer, "lm-eval",
                     {"tasks": ["nope"], "include_path": str(local_task)}, plugins=plugins)
    with pytest.raises(ValueError, match="is not a folder"):
        api.evaluate(tiny_llama, tiny_tokenizer, "lm-eval",
                     {"tasks": ["x"], "include_path": str(local_task / "missing")},
                     plugins=plugins)


def test_missing_lm_eval_is_a_clear_message(tiny_llama, tiny_tokenizer, plugins, monkeypatch):
    from conftest import hide_package

    hide_package(monkeypatch, "lm_eval")
    with pytest.raises(ImportError, match="pip install 'qcore\\[lm-eval\\]'"):
        api.evaluate(tiny_llama, tiny_tokenizer, "lm-eval", {"tasks": ["x"]}, plugins=plugins)


def test_flatten_keeps_numbers_only():
    from qcore_builtins.lm_eval_tasks import flatten

    assert flatten({"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A",
                          "exact_match,strict": 1}}) == {"t/acc": 0.5,
                                                          "t/exact_match[strict]": 1.0}
