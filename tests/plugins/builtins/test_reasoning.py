"""The reasoning evaluator on a tiny model: metrics, records, reproducibility, resume after a
real kill, bad input, the CLI with --reference, and generation on saved quantized schemes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model

from qcore import api
from qcore.cli import main

pytest.importorskip("math_verify")
pytestmark = pytest.mark.usefixtures("one_thread")

ITEMS = [{"id": i, "question": f"What is {i} plus {i}?", "answer": f"{i}+{i}={2 * i}",
          "final": str(2 * i)} for i in range(5)]


@pytest.fixture
def problems(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    return path


def _options(problems, tmp_path, name="records.jsonl", **extra):
    return {"data": {"source": str(problems)}, "limit": 3, "max_new_tokens": 6,
            "seeds": [1, 2], "batch_size": 2, "records": str(tmp_path / name), **extra}


def _evaluate(model, tokenizer, options, plugins):
    return api.evaluate(model, tokenizer, "reasoning", options, plugins=plugins)


def test_metrics_records_and_reproducibility(tiny_llama, tiny_tokenizer, problems, tmp_path,
                                             plugins, caplog):
    result = _evaluate(tiny_llama, tiny_tokenizer, _options(problems, tmp_path), plugins)
    m = result.metrics
    for key in ("pass@1", "accuracy_seed1", "accuracy_seed2", "repetition_rate",
                "no_answer_rate", "truncated_rate", "mean_output_tokens",
                "p50_output_tokens", "p90_output_tokens", "tokens_per_second"):
        assert key in m, key
    assert m["items"] == 3 and 0 <= m["pass@1"] <= 1
    assert "no chat template" in caplog.text
    records = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(records) == 6 and {r["seed"] for r in records} == {1, 2}
    for r in records:
        assert set(r) >= {"prompt", "output", "extracted", "correct", "output_tokens",
                          "finish_reason", "gold"}
        assert r["finish_reason"] in ("stop", "length") and r["output_tokens"] <= 6
        assert "Please reason step by step" in r["prompt"]
    assert m["truncated_rate"] == sum(r["finish_reason"] == "length" for r in records) / 6
    assert m["mean_output_tokens"] == sum(r["output_tokens"] for r in records) / 6
    again = _evaluate(tiny_llama, tiny_tokenizer, _options(problems, tmp_path, "again.jsonl"),
                      plugins)
    second = [json.loads(x) for x in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert [r["output"] for r in second] == [r["output"] for r in records]  # same seeds
    assert again.metrics["pass@1"] == m["pass@1"]
    other = _evaluate(tiny_llama, tiny_tokenizer,
                      _options(problems, tmp_path, "other.jsonl", seeds=[3, 4]), plugins)
    third = [json.loads(x) for x in (tmp_path / "other.jsonl").read_text().splitlines()]
    assert [r["output"] for r in third] != [r["output"] for r in records]
    assert other.details["seeds"] == [3, 4]


def test_greedy_runs_one_seed_and_reports_greedy_accuracy(tiny_llama, tiny_tokenizer,
                                                          problems, tmp_path, plugins):
    result = _evaluate(tiny_llama, tiny_tokenizer,
                       _options(problems, tmp_path, temperature=0.0), plugins)
    assert result.details["seeds"] == [1]
    assert result.metrics["greedy_accuracy"] == result.metrics["pass@1"]


def test_scoring_on_scripted_outputs(tiny_llama, tiny_tokenizer, problems, tmp_path, plugins,
                                     monkeypatch):
    """The metrics from known outputs: right, wrong, no answer, a loop that hit the limit."""
    from qcore_builtins import reasoning
    from qcore_builtins.generation import Generation

    scripted = [Generation("so \\boxed{0}", [1] * 5, "stop"),
                Generation("#### 3", [1] * 2, "stop"),                       # wrong (gold 4)
                Generation("I am not sure", [1] * 3, "stop"),                # no answer
                Generation("loop " * 40, [7, 8] * 20, "length")]             # loop, cut

    def fake_generate(model, tokenizer, prompts, cfg, seed, device, keys=None, watch=None):
        gens = scripted[:len(prompts)]
        watch.batch(0, gens)
        return gens, {"generated_tokens": 50.0, "generation_seconds": 1.0}

    monkeypatch.setattr(reasoning, "generate", fake_generate)
    opts = _options(problems, tmp_path, seeds=[5], limit=4, batch_size=4)
    m = _evaluate(tiny_llama, tiny_tokenizer, opts, plugins).metrics
    # item 2's gold is "4": "I am not sure" has no answer; the loop's last number: none
    assert m["pass@1"] == 0.25 and m["accuracy_seed5"] == 0.25
    assert m["no_answer_rate"] == 0.5 and m["repetition_rate"] == 0.25
    assert m["truncated_rate"] == 0.25 and m["mean_output_tokens"] == (5 + 2 + 3 + 40) / 4
    assert m["p50_output_tokens"] == 3 and m["p90_output_tokens"] == 40
    assert m["tokens_per_second"] == 50.0


_CHILD = textwrap.dedent("""
    import sys, time, json
    sys.path.insert(0, sys.argv[1])
    from conftest import make_tiny_model
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer
    from qcore import api
    from qcore_builtins import generation, reasoning

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(open(sys.argv[2]).read()),
                                  eos_token="</s>")
    real = reasoning.generate

    def slow(*args, watch=None, **kwargs):
        def hook(start, gens):
            watch.batch(start, gens)
            if start >= 1:
                print("two batches written", flush=True)
                time.sleep(600)
        return real(*args, watch=generation.Watch(hook, watch.speed), **kwargs)

    reasoning.generate = slow
    api.evaluate(make_tiny_model("llama"), tok, "reasoning", json.loads(sys.argv[3]))
""")


def test_resume_after_a_kill_finishes_only_the_rest(tiny_tokenizer, problems, tmp_path,
                                                    plugins):
    (tmp_path / "tok.json").write_text(tiny_tokenizer.backend_tokenizer.to_str())
    options = _options(problems, tmp_path, limit=4, seeds=[1], batch_size=1)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(Path(__file__).parents[2]),
         str(tmp_path / "tok.json"), json.dumps(options)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert child.stdout.readline().strip() == "two batches written"
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(killed) == 2
    with (tmp_path / "records.jsonl").open("a") as f:
        f.write('{"seed": 1, "ind')  # a line the kill cut short
    with pytest.raises(ValueError, match="resume=true"):
        _evaluate(make_tiny_model("llama"), tiny_tokenizer, options, plugins)
    result = _evaluate(make_tiny_model("llama"), tiny_tokenizer, {**options, "resume": True},
                       plugins)
    assert result.details["resumed_records"] == 2 and result.metrics["items"] == 4
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert lines[:2] == killed
    done = [json.loads(x) for x in lines if x.startswith('{"seed": 1, "index"')]
    assert sorted(r["index"] for r in done) == [0, 1, 2, 3]
    fresh = _evaluate(make_tiny_model("llama"), tiny_tokenizer,
                      {**options, "records": str(tmp_path / "fresh.jsonl")}, plugins)
    assert [json.loads(x)["output"] for x in
            (tmp_path / "fresh.jsonl").read_text().splitlines()] == [r["output"] for r in done]
    assert fresh.metrics["pass@1"] == result.metrics["pass@1"]
    assert fresh.metrics["mean_output_tokens"] == result.metrics["mean_output_tokens"]
    # resuming with a narrower limit counts only the items of this run
    narrower = _evaluate(make_tiny_model("llama"), tiny_tokenizer,
                         {**options, "resume": True, "limit": 2}, plugins)
    assert narrower.metrics["items"] == 2 and narrower.details["resumed_records"] == 4


@pytest.mark.parametrize("content, options, message", [
    ('{"question": "q"}\n', {}, "problems.jsonl:1: no field 'final'"),
    ("", {}, "problems.jsonl: no items"),
    (None, {"max_new_tokens": 0}, "max_new_tokens"),
    (None, {"seeds": ["a"]}, "seeds.0"),
    (None, {"seeds": [1.5]}, "seeds.0"),
    (None, {"seeds": [1, 1]}, "distinct"),
], ids=["missing-field", "empty", "no-tokens", "seed-string", "seed-float", "seed-twice"])
def test_bad_input_is_named(tiny_llama, tiny_tokenizer, problems, tmp_path, plugins, content,
                            options, message):
    if content is not None:
        problems.write_text(content)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        _evaluate(tiny_llama, tiny_tokenizer, _options(problems, tmp_path, **options), plugins)
    assert not (tmp_path / "records.jsonl").exists() or content is not None


def test_cli_with_a_saved_w4a16_model_and_a_reference(tiny_folder, problems, tmp_path,
                                                      capsys):
    from conftest import rtn_args

    assert main(rtn_args(tiny_folder, "--save", str(tiny_folder / "q"), "--json")) == 0
    capsys.readouterr()
    rc = main(["evaluate", "--model", str(tiny_folder / "q"), "--evaluator", "reasoning",
               "--data", str(problems), "--set", "limit=2", "--set", "max_new_tokens=4",
               "--set", "seeds=[42]", "--set", f"records={tmp_path / 'q.jsonl'}",
               "--reference", str(tiny_folder / "tiny"), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("pass@1", "repetition_rate", "no_answer_rate", "truncated_rate",
                "mean_output_tokens"):
        assert key in out and key in out["reference"] and key in out["change"]
        assert out["change"][key] == pytest.approx(out[key] - out["reference"][key])
    assert out["quantized"] is True and out["details"]["records"] == str(tmp_path / "q.jsonl")
    assert (tmp_path / "q.reference.jsonl").exists()


def _on_grid(model, args):
    """Put every linear weight of the decoder on the quantization grid already."""
    from qcore.quant.qparams import fake_quantize_weight

    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(fake_quantize_weight(module.weight, args))


@pytest.mark.parametrize("scheme, method, options", [
    ("W4A16", "rtn", {}), ("W3A16", "rtn", {}),
    ("W4A16", "gptq", {"act_order": True, "static_groups": True})])
def test_generation_on_a_saved_scheme_matches_the_float_model_where_quantization_is_off(
        scheme, method, options, tiny_tokenizer, plugins, tmp_path):
    """Weights already on the grid: the saved quantized model (packed codes, g_idx) must
    generate the float model's greedy tokens exactly."""
    from qcore.config import CalibrationConfig, RunConfig
    from qcore.interfaces import DataSpec
    from qcore_builtins.generation import SamplingConfig, generate

    cfg = RunConfig(model="tiny", method=method, scheme=scheme, group_size=16,
                    method_config=options, save=str(tmp_path / "q"),
                    calibration=CalibrationConfig(data=DataSpec(source="pydoc"), samples=4,
                                                  seq_len=32))
    float_model = make_tiny_model("llama")
    _on_grid(float_model, cfg.resolved_scheme().weights)
    import copy

    api.quantize(cfg, model=copy.deepcopy(float_model), tokenizer=tiny_tokenizer,
                 plugins=plugins, progress=False)
    loaded, _, _ = api.load_model(str(tmp_path / "q"), plugins)
    prompts = ["def main():", "The quick brown fox", "Python lists are"]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8, batch_size=3)
    ref, _ = generate(float_model, tiny_tokenizer, prompts, greedy, seed=0)
    got, _ = generate(loaded, tiny_tokenizer, prompts, greedy, seed=0)
    assert [g.tokens for g in got] == [r.tokens for r in ref]


@pytest.mark.parametrize("method, scheme, options", [
    ("smoothquant", "W8A8", {}), ("flatquant", "W4A4KV4", {"epochs": 0})])
def test_generation_runs_on_activation_and_kv_schemes(method, scheme, options, tiny_tokenizer,
                                                      plugins, tmp_path):
    from qcore.config import CalibrationConfig, RunConfig
    from qcore.interfaces import DataSpec
    from qcore_builtins.generation import SamplingConfig, generate

    cfg = RunConfig(model="tiny", method=method, scheme=scheme, method_config=options,
                    save=str(tmp_path / "q"),
                    calibration=CalibrationConfig(data=DataSpec(source="pydoc"), samples=4,
                                                  seq_len=32))
    api.quantize(cfg, model=make_tiny_model("llama"), tokenizer=tiny_tokenizer,
                 plugins=plugins, progress=False)
    loaded, _, _ = api.load_model(str(tmp_path / "q"), plugins)
    sampling = SamplingConfig(temperature=0.6, max_new_tokens=6, batch_size=2)
    a, stats = generate(loaded, tiny_tokenizer, ["a b c", "def f(x):"], sampling, seed=7)
    b, _ = generate(loaded, tiny_tokenizer, ["a b c", "def f(x):"], sampling, seed=7)
    assert [g.tokens for g in a] == [g.tokens for g in b] and stats["generated_tokens"] > 0


def test_items_from_a_hugging_face_dataset(monkeypatch):
    """hf:NAME:CONFIG:SPLIT goes through datasets.load_dataset (stubbed: no network)."""
    import types

    from qcore.interfaces import DataSpec
    from qcore_builtins.reasoning import load_items

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"problem": "1+1?", "solution": "2"}, {"problem": "2+2?", "solution": "4"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=load_dataset))
    items = load_items(DataSpec(source="hf:openai/gsm8k:main:test"), "problem", "solution",
                       None)
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [(it["question"], it["gold"]) for it in items] == [("1+1?", "2"), ("2+2?", "4")]
    with pytest.raises(ValueError, match=r"hf:x:test\[0\]: no field 'question'"):
        load_items(DataSpec(source="hf:x:test"), "question", "solution", None)


def _in_a_terminal(argv: list[str], timeout: float = 240) -> str:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal; everything it printed."""
    import pty
    import select
    import time

    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL,
                            env={**os.environ, "COLUMNS": "160", "TERM": "xterm"})
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(leader)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")[-2000:]
    return b"".join(chunks).decode(errors="replace")


def test_a_terminal_sees_the_estimate_then_a_live_bar_with_the_time_left(tiny_folder, problems,
                                                                        tmp_path):
    out = _in_a_terminal([sys.executable, "-m", "qcore.cli", "evaluate", "--model",
                          str(tiny_folder / "tiny"), "--evaluator", "reasoning",
                          "--data", str(problems), "--set", "limit=4", "--set", "seeds=[1]",
                          "--set", "max_new_tokens=8", "--set", "batch_size=2",
                          "--set", f"records={tmp_path / 'r.jsonl'}"])
    estimate = out.index("4 generations x up to 8 tokens: up to ~")
    assert "tokens/s (the first batch's pace)" in out
    bar = out.index("reasoning generations")
    assert "eta" in out[bar:] and "4/4" in out[bar:]  # the bar redraws at its own pace
    assert estimate < out.index("4/4")  # (the events test pins "before the first batch")


def test_progress_lines_off_a_terminal_and_the_estimate_before_the_first_batch(
        tiny_llama, tiny_tokenizer, problems, tmp_path, plugins, capfd):
    from qcore_builtins import generation

    events = []
    real = generation.generate

    def spy(*args, watch=None, **kwargs):
        def batch(start, gens):
            events.append(("batch", start))
            watch.batch(start, gens)

        def speed(tps):
            events.append(("speed", tps))
            watch.speed(tps)

        return real(*args, watch=generation.Watch(batch, speed if watch.speed else None),
                    **kwargs)

    import qcore_builtins.reasoning as reasoning
    original = reasoning.generate
    reasoning.generate = spy
    try:
        _evaluate(tiny_llama, tiny_tokenizer,
                  _options(problems, tmp_path, seeds=[1], progress=True), plugins)
    finally:
        reasoning.generate = original
    assert events[0][0] == "speed" and events[0][1] > 0 and events[1] == ("batch", 0)
    err = capfd.readouterr().err
    assert "3 generations x up to 6 tokens" in err
    assert "[2/3] seed 1 (~" in err and "left)" in err and "[3/3] seed 1" in err
