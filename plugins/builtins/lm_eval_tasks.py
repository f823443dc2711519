"""The ``lm-eval`` evaluator: lm-evaluation-harness tasks on the in-memory model.

lm-eval's ``HFLM`` wraps the model object itself (quantized layers, kernels, online
transforms and all); ``simple_evaluate`` runs the tasks. Tasks of your own (e.g. a local
JSONL file, offline) come from YAML files in ``include_path``. lm-eval is an optional
extra (``pip install 'qcore[lm-eval]'``), imported only when this evaluator runs.

Metrics: every numeric result as ``<task>/<metric>`` (lm-eval's ``metric,filter`` keys with
the filter dropped when it is ``none``); the raw results are in the details.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from qcore.hookspecs import hookimpl
from qcore.interfaces import Backend, Evaluator, TextSource
from qcore.reports import EvaluationResult


class LMEvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[str] = Field(min_length=1, description="lm-eval task names")
    include_path: str | None = Field(default=None, description="folder of task YAML files")
    limit: int | None = Field(default=None, gt=0, description="first N documents per task")
    num_fewshot: int | None = Field(default=None, ge=0)
    batch_size: int = Field(default=1, gt=0)
    max_length: int | None = Field(default=None, gt=0, description="context length for lm-eval")


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError("the lm-eval evaluator needs lm-evaluation-harness: "
                          "pip install 'qcore[lm-eval]' (or lm-eval)") from exc
    return lm_eval, HFLM, TaskManager


def flatten(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{task: {"acc,none": 0.5, "alias": ...}}`` -> ``{"task/acc": 0.5}``."""
    metrics = {}
    for task, values in results.items():
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name, _, filt = key.partition(",")
            metrics[f"{task}/{name}" + (f"[{filt}]" if filt and filt != "none" else "")] = \
                float(value)
    return metrics


class LMEval(Evaluator):
    name = "lm-eval"
    Config = LMEvalConfig
    description = "lm-evaluation-harness tasks on the in-memory model (optional extra)"
    requires = {"lm_eval": "pip install 'qcore[lm-eval]'"}

    def evaluate(self, model: nn.Module, tokenizer: Any, backend: Backend, texts: TextSource
                 ) -> EvaluationResult:
        cfg: LMEvalConfig = self.config
        lm_eval, HFLM, TaskManager = _lm_eval()
        if cfg.include_path is not None and not Path(cfg.include_path).is_dir():
            raise ValueError(f"lm-eval include_path {cfg.include_path!r} is not a folder")
        if tokenizer.pad_token is None:  # lm-eval batches with padding
            tokenizer.pad_token = tokenizer.eos_token
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size,
                  device=str(backend.device), max_length=cfg.max_length)
        manager = TaskManager(include_path=cfg.include_path)
        unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
        if unknown:
            raise ValueError(f"lm-eval knows no task {', '.join(unknown)}"
                             + ("" if cfg.include_path else " (local tasks need include_path)"))
        out = lm_eval.simple_evaluate(model=lm, tasks=cfg.tasks, task_manager=manager,
                                      limit=cfg.limit, num_fewshot=cfg.num_fewshot,
                                      log_samples=False)
        return EvaluationResult(evaluator=self.name, metrics=flatten(out["results"]),
                                details={"results": out["results"], "tasks": cfg.tasks})


@hookimpl
def qcore_register_evaluators(register):
    register(LMEval)
