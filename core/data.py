"""Text -> token windows for calibration and evaluation, plus the dataset registry lookup."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from qcore.hostmemory import release_freed_memory
from qcore.interfaces import Dataset, DataSpec, TextSource

_TITLE = re.compile(r"\n = [^=\n][^\n]* = *\n")


def read_utf8(path: str | Path) -> str:
    """A text file's contents; a file that is not UTF-8 is an error naming its line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at "
                         f"offset {exc.start}); convert the file to UTF-8") from exc


def split_point(text: str) -> int:
    """Where to cut a text in two near its middle: the first wikitext article title
    (`` = Title =``) past the middle character, else the next blank line, else the middle."""
    mid = len(text) // 2
    m = _TITLE.search(text, mid)
    if m:
        return m.start() + 1
    blank = text.find("\n\n", mid)
    return blank + 2 if blank >= 0 else mid


def select_part(text: str, part: str) -> str:
    if part == "all":
        return text
    cut = split_point(text)
    if part == "head":
        return text[:cut]
    if part == "tail":
        return text[cut:]
    raise ValueError(f"part must be 'all', 'head' or 'tail', not {part!r}")


class WindowSpec(BaseModel):
    """N windows of L tokens from a token stream."""

    model_config = ConfigDict(extra="forbid")
    samples: int = Field(gt=0)
    seq_len: int = Field(gt=1)
    sampling: Literal["consecutive", "random"] = "consecutive"
    seed: int = 0


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text tokenized at once, as a 1-D LongTensor."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0].long()
    release_freed_memory()  # the fast tokenizer's temporaries: ~400 MB for 3 MB of text
    return ids


def token_windows(ids: torch.Tensor, spec: WindowSpec) -> torch.Tensor:
    """(samples, seq_len) windows: consecutive from the start, or seeded random starts."""
    n, length = spec.samples, spec.seq_len
    available = ids.numel() // length if spec.sampling == "consecutive" else ids.numel() - length
    if spec.sampling == "consecutive":
        if n > available:
            raise ValueError(f"samples={n} windows of seq_len={length} need {n * length} "
                             f"tokens; the text has {ids.numel()}")
        return ids[: n * length].reshape(n, length).clone()
    if available <= 0:
        raise ValueError(f"seq_len={length} exceeds the text's {ids.numel()} tokens")
    gen = torch.Generator().manual_seed(spec.seed)
    starts = torch.randint(0, available + 1, (n,), generator=gen)
    return torch.stack([ids[s: s + length] for s in starts.tolist()])


class DatasetRegistry(TextSource):
    """Resolves a DataSpec to text through the registered dataset plugins."""

    def __init__(self, datasets: dict[str, type[Dataset]]) -> None:
        self.datasets = datasets

    def resolve(self, spec: DataSpec) -> Dataset:
        if spec.dataset is not None:
            if spec.dataset not in self.datasets:
                raise ValueError(f"dataset {spec.dataset!r} is not registered; "
                                 f"available: {', '.join(sorted(self.datasets))}")
            return self.datasets[spec.dataset]()
        for cls in self.datasets.values():
            if cls.matches(spec.source):
                return cls()
        raise ValueError(f"no dataset plugin can read source {spec.source!r} (registered: "
                         f"{', '.join(sorted(self.datasets))}); name one with dataset=")

    def text(self, spec: DataSpec) -> str:
        return select_part(self.resolve(spec).load_text(spec), spec.part)
