"""The ``reasoning`` evaluator: sampled pass@1 over seeds on math problems, plus the
collapse metrics of long reasoning (loops, missing answers, truncation, output length).

Items come from a JSONL file or ``hf:NAME[:CONFIG]:SPLIT`` (``question_field`` /
``answer_field``; the project's
``gsm8k_test100.jsonl`` works with the defaults, reading the gold answer from ``final``).
Each item is asked with the study's instruction, through the tokenizer's chat template when
it has one, once per seed; the final answer is extracted and compared with math-verify
(:mod:`qcore_builtins.answers`). Every finished item is appended and flushed to the
records file, so an interrupted run keeps its work and ``resume=true`` continues it.

Metrics: ``pass@1`` (mean accuracy over seeds), ``accuracy_seed<N>`` per seed,
``greedy_accuracy`` when temperature is 0, ``repetition_rate``, ``no_answer_rate``,
``truncated_rate``, ``mean_output_tokens``, ``p50_output_tokens``, ``p90_output_tokens``,
``tokens_per_second``.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import Field, StrictInt, field_validator
from torch import nn

from qcore.console import Steps, duration
from qcore.data import read_utf8
from qcore.hookspecs import hookimpl
from qcore.interfaces import Backend, DataSpec, Evaluator, TextSource
from qcore.reports import EvaluationResult
from qcore_builtins.answers import ends_in_loop, equivalent, extract_answer
from qcore_builtins.generation import SamplingConfig, Watch, format_prompt, generate

log = logging.getLogger(__name__)

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class ReasoningConfig(SamplingConfig):
    data: DataSpec = Field(description="JSONL file of problems")
    question_field: str = "question"
    answer_field: str = Field(default="final", description="the gold final answer")
    limit: int | None = Field(default=None, gt=0, description="first N items only")
    seeds: list[StrictInt] = Field(default_factory=lambda: [42, 43, 44], min_length=1)
    instruction: str = INSTRUCTION
    records: str | None = Field(default=None, description="per-item JSONL records "
                                "(default: reasoning-records-<time>.jsonl here)")
    resume: bool = Field(default=False, description="skip the items the records file has")
    progress: bool | None = Field(default=None, description="a live bar with the time left "
                                  "(None: on a terminal only; True: one line per batch "
                                  "elsewhere)")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds


def _hf_records(source: str) -> list[tuple[str, Any]]:
    """(where, record) of ``hf:NAME[:CONFIG]:SPLIT`` through the datasets package (online,
    or from its cache)."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("hf: sources need the datasets package (pip install datasets)"
                          ) from exc
    parts = source.removeprefix("hf:").split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"hf source must be hf:NAME[:CONFIG]:SPLIT, got {source!r}")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    data = datasets.load_dataset(name, config, split=split)
    return [(f"{source}[{i}]", dict(row)) for i, row in enumerate(data)]


def _jsonl_records(path: Path) -> list[tuple[str, Any]]:
    out = []
    for lineno, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
    return out


def load_items(spec: DataSpec, question: str, answer: str, limit: int | None
               ) -> list[dict[str, Any]]:
    """(index, question, gold) records of a JSONL file or an ``hf:`` dataset; errors name
    the file and line (or row) and the field."""
    if spec.source.startswith("hf:"):
        rows, where = _hf_records(spec.source), spec.source
    else:
        path = Path(spec.source)
        if not path.is_file():
            raise ValueError(f"reasoning data {spec.source!r} is not a file")
        rows, where = _jsonl_records(path), str(path)
    items = []
    for place, record in rows:
        for field in (question, answer):
            if not isinstance(record, dict) or field not in record:
                have = ", ".join(sorted(record)) if isinstance(record, dict) else "none"
                raise ValueError(f"{place}: no field {field!r} (fields: {have}); "
                                 "set question_field / answer_field")
        items.append({"index": len(items), "id": record.get("id", len(items)),
                      "question": str(record[question]), "gold": str(record[answer])})
        if limit is not None and len(items) == limit:
            break
    if not items:
        raise ValueError(f"{where}: no items")
    return items


def _percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)])


def summarize(records: list[dict[str, Any]], seeds: list[int], greedy: bool
              ) -> dict[str, float]:
    """The metrics of a set of per-item records (one per item and seed)."""
    metrics: dict[str, float] = {}
    per_seed = []
    for seed in seeds:
        mine = [r for r in records if r["seed"] == seed]
        acc = sum(r["correct"] for r in mine) / len(mine)
        metrics[f"accuracy_seed{seed}"] = acc
        per_seed.append(acc)
    metrics["pass@1"] = sum(per_seed) / len(per_seed)
    if greedy:
        metrics["greedy_accuracy"] = per_seed[0]
    n = len(records)
    lengths = [r["output_tokens"] for r in records]
    metrics["repetition_rate"] = sum(r["loop"] for r in records) / n
    metrics["no_answer_rate"] = sum(r["extracted"] is None for r in records) / n
    metrics["truncated_rate"] = sum(r["finish_reason"] == "length" for r in records) / n
    metrics["mean_output_tokens"] = sum(lengths) / n
    metrics["p50_output_tokens"] = _percentile(lengths, 0.5)
    metrics["p90_output_tokens"] = _percentile(lengths, 0.9)
    metrics["items"] = float(n // len(seeds))
    return metrics


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The complete records of an interrupted run; a last line a kill cut short is removed
    from the file (appending after it would corrupt the next record)."""
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        log.warning("%s: dropping the last, incomplete record line", path)
        with path.open("r+b") as f:
            f.truncate(cut)
    done = []
    for lineno, line in enumerate(data[:cut].decode("utf-8").splitlines(), 1):
        try:
            done.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not a record ({exc.msg}); is this the "
                             "records file of a reasoning run?") from exc
    return done


class Reasoning(Evaluator):
    name = "reasoning"
    Config = ReasoningConfig
    description = "pass@1 over seeds on math problems + collapse metrics (loops, no answer)"
    summary_metrics = ("pass@1", "repetition_rate", "truncated_rate", "no_answer_rate",
                       "mean_output_tokens")
    requires = {"math_verify": "pip install math-verify"}

    def evaluate(self, model: nn.Module, tokenizer: Any, backend: Backend, texts: TextSource
                 ) -> EvaluationResult:
        cfg: ReasoningConfig = self.config
        items = load_items(cfg.data, cfg.question_field, cfg.answer_field, cfg.limit)
        if not getattr(tokenizer, "chat_template", None):
            log.warning("the tokenizer has no chat template: prompts are plain text")
        prompts = [format_prompt(tokenizer, f"{it['question']}\n{cfg.instruction}")
                   for it in items]
        seeds = cfg.seeds[:1] if cfg.temperature == 0 else cfg.seeds
        path = Path(cfg.records or f"reasoning-records-{time.strftime('%Y%m%d-%H%M%S')}"
                                   f"-{uuid.uuid4().hex[:6]}.jsonl")
        done = _read_records(path) if cfg.resume and path.exists() else []
        if path.exists() and not cfg.resume:
            raise ValueError(f"records file {path} exists; pass resume=true to continue it "
                             "or name another file with records=")
        have = {(r["seed"], r["index"]) for r in done}
        # only this run's items and seeds count (a resume may narrow limit or seeds)
        records = [r for r in done if r["seed"] in seeds and r["index"] < len(items)]
        stats = {"generated_tokens": 0.0, "generation_seconds": 0.0}
        path.parent.mkdir(parents=True, exist_ok=True)
        todo_count = len(items) * len(seeds) - len(records)
        with path.open("a", encoding="utf-8") as sink, \
                Steps("reasoning generations", len(items) * len(seeds), cfg.progress) as steps:
            steps.skip(len(records))

            def estimate(tokens_per_second: float) -> None:
                steps.say(f"{todo_count} generations x up to {cfg.max_new_tokens} tokens: "
                          f"up to ~{duration(todo_count * cfg.max_new_tokens / tokens_per_second)}"
                          f" at {tokens_per_second:.0f} tokens/s (the first batch's pace)")

            for seed in seeds:
                todo = [it for it in items if (seed, it["index"]) not in have]
                if not todo:
                    continue

                def write(start: int, gens: list, seed: int = seed, todo: list = todo) -> None:
                    for it, gen in zip(todo[start:start + len(gens)], gens, strict=True):
                        record = _record(it, gen, seed, prompts[it["index"]])
                        sink.write(json.dumps(record) + "\n")
                        records.append(record)
                    sink.flush()
                    steps.advance(len(gens), info=f"seed {seed}")

                first = stats["generated_tokens"] == 0
                _, run = generate(model, tokenizer, [prompts[it["index"]] for it in todo],
                                  cfg, seed, backend.device, keys=[it["index"] for it in todo],
                                  watch=Watch(batch=write, speed=estimate if first else None))
                stats["generated_tokens"] += run["generated_tokens"]
                stats["generation_seconds"] += run["generation_seconds"]
        metrics = summarize(records, seeds, greedy=cfg.temperature == 0)
        if stats["generation_seconds"]:
            metrics["tokens_per_second"] = (stats["generated_tokens"]
                                            / stats["generation_seconds"])
        return EvaluationResult(evaluator=self.name, metrics=metrics,
                                details={"records": str(path), "seeds": seeds,
                                         "resumed_records": len(done)})


def _record(item: dict[str, Any], gen: Any, seed: int, prompt: str) -> dict[str, Any]:
    """One generation as its line of the records file."""
    answer = extract_answer(gen.text)
    return {"seed": seed, "index": item["index"], "id": item["id"], "prompt": prompt,
            "output": gen.text, "extracted": answer, "gold": item["gold"],
            "correct": equivalent(item["gold"], answer), "output_tokens": len(gen.tokens),
            "finish_reason": gen.finish_reason, "loop": ends_in_loop(gen.tokens)}


@hookimpl
def qcore_register_evaluators(register):
    register(Reasoning)
