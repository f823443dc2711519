"""The study's cache: one folder per cell, keyed by a hash of everything that changes its
numbers, and the lock that keeps two studies out of one directory.

Layout under the study directory::

    study.lock                          held (flock) by the running study
    cells/<key>/quantize.json           the quantization record (baseline: the float model)
    cells/<key>/model/                  the saved quantized model (keep_models)
    cells/<key>/eval-<label>-<ekey>.json   one evaluator's result
    cells/<key>/*.failed.json           why a stage failed (removed when it succeeds)

Every record is written atomically, so a kill leaves either the old state or the new one;
a record that does not parse is reported, set aside and recomputed.
"""

from __future__ import annotations

import logging
import os
import re
import traceback
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qcore.errors import ConfigError
from qcore.io import atomic_write_json

log = logging.getLogger(__name__)
Record = TypeVar("Record", bound=BaseModel)


class QuantRecord(BaseModel):
    """What quantizing a cell produced (for the baseline: what the float model weighs)."""

    model_config = ConfigDict(extra="forbid")
    key: str
    cell: str
    seconds: float = Field(description="quantization time (0 for the baseline)")
    peak_rss_mb: float
    model_bytes: int = Field(description="bytes of the model's tensors (tied ones once)")
    parameters: int = Field(description="parameters of the float model (baseline only: 0)")
    layers: list[dict[str, Any]] = Field(default_factory=list,
                                         description="per layer: name, relative_mse")
    saved: str | None = Field(default=None, description="the saved model folder, relative "
                                                        "to the cell's folder")


class EvalRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str
    label: str
    evaluator: str
    metrics: dict[str, float | None]
    details: dict[str, Any] = Field(default_factory=dict)
    seconds: float


class FailureRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage: str
    error: str
    traceback: str


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


class CellFolder:
    """One cell's folder in the cache."""

    def __init__(self, root: Path, key: str) -> None:
        self.key = key
        self.path = root / "cells" / key

    @property
    def quantize_file(self) -> Path:
        return self.path / "quantize.json"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    def eval_file(self, label: str, ekey: str) -> Path:
        return self.path / f"eval-{_safe(label)}-{ekey}.json"

    def failure_file(self, stage: str) -> Path:
        return self.path / f"{_safe(stage)}.failed.json"

    def read_quant(self) -> QuantRecord | None:
        return read_record(self.quantize_file, QuantRecord)

    def read_eval(self, label: str, ekey: str) -> EvalRecord | None:
        return read_record(self.eval_file(label, ekey), EvalRecord)

    def read_failure(self, stage: str) -> FailureRecord | None:
        return read_record(self.failure_file(stage), FailureRecord, quiet=True)

    def write(self, path: Path, record: BaseModel) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, record.model_dump(mode="json"))

    def record_failure(self, stage: str, exc: BaseException) -> FailureRecord:
        failure = FailureRecord(stage=stage, error=" ".join(str(exc).split()) or
                                type(exc).__name__,
                                traceback="".join(traceback.format_exception(exc)))
        self.write(self.failure_file(stage), failure)
        return failure

    def clear_failure(self, stage: str) -> None:
        self.failure_file(stage).unlink(missing_ok=True)


def read_record(path: Path, cls: type[Record], quiet: bool = False) -> Record | None:
    """A cached record, or None when absent. A record that does not parse (a disk fault,
    a hand edit, an older qcore) is renamed ``*.corrupt`` with a warning and recomputed."""
    if not path.exists():
        return None
    try:
        return cls.model_validate_json(path.read_bytes())
    except (ValidationError, ValueError, OSError) as exc:
        aside = path.with_name(path.name + ".corrupt")
        if not quiet:
            log.warning("cache entry %s is unreadable (%s); recomputing it (kept as %s)",
                        path, " ".join(str(exc).split())[:200], aside.name)
        path.replace(aside)
        return None


class StudyLock:
    """An exclusive ``flock`` on ``DIR/study.lock``: a second study writing to the same
    directory is refused, naming the lock and the PID holding it. The kernel drops the
    lock when its process dies, so a killed study never leaves a stale lock."""

    def __init__(self, root: Path) -> None:
        self.path = root / "study.lock"
        self._fd: int | None = None

    def __enter__(self) -> StudyLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"another qcore study (PID {holder}) is writing to "
                              f"{self.path.parent}: it holds {self.path}; wait for it or "
                              "choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock; the file stays (harmless, reused)
            self._fd = None
