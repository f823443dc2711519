"""Text sources: plain text files, JSONL, Python's pydoc topics, Hugging Face datasets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from qcore.data import read_utf8
from qcore.hookspecs import hookimpl
from qcore.interfaces import Dataset, DataSpec


def _existing(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data source {path!r} is not a file")
    return p


class TextFile(Dataset):
    name = "text"
    description = "a UTF-8 text file, used whole"

    @classmethod
    def matches(cls, source: str) -> bool:
        return Path(source).suffix.lower() in (".txt", ".md", ".raw", ".text")

    def check(self, spec: DataSpec) -> None:
        _existing(spec.source)

    def load_text(self, spec: DataSpec) -> str:
        return read_utf8(_existing(spec.source))


class JSONLines(Dataset):
    name = "jsonl"
    description = "JSON lines; 'field' (default text, or question + answer) per record"

    @classmethod
    def matches(cls, source: str) -> bool:
        return Path(source).suffix.lower() == ".jsonl"

    def check(self, spec: DataSpec) -> None:
        _existing(spec.source)

    def load_text(self, spec: DataSpec) -> str:
        docs = []
        path = _existing(spec.source)
        for lineno, line in enumerate(read_utf8(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column "
                                 f"{exc.colno})") from exc
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got "
                                 f"{type(record).__name__}")
            if spec.field is not None:
                if spec.field not in record:
                    raise ValueError(f"{path}:{lineno}: no field {spec.field!r} (fields: "
                                     f"{', '.join(sorted(record)) or 'none'})")
                docs.append(str(record[spec.field]))
            elif "text" in record:
                docs.append(str(record["text"]))
            elif "question" in record and "answer" in record:
                docs.append(f"{record['question']}\n{record['answer']}")
            else:
                raise ValueError(f"{path}:{lineno}: no 'text' field (fields: "
                                 f"{', '.join(sorted(record)) or 'none'}); name the text "
                                 "field with --calib-field / field=")
        if not docs:
            raise ValueError(f"{path}: no records")
        return "\n\n".join(docs)


class PydocTopics(Dataset):
    name = "pydoc"
    description = "Python's own pydoc_data.topics: English prose present on every machine"

    @classmethod
    def matches(cls, source: str) -> bool:
        return source in ("pydoc", "pydoc_data", "pydoc_data.topics")

    def load_text(self, spec: DataSpec) -> str:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key].strip() for key in sorted(topics))


class HFDataset(Dataset):
    name = "hf"
    description = "hf:NAME[:CONFIG]:SPLIT through the datasets package (needs it, and a cache)"

    @classmethod
    def matches(cls, source: str) -> bool:
        return source.startswith("hf:")

    def check(self, spec: DataSpec) -> None:
        if importlib.util.find_spec("datasets") is None:
            raise ValueError(f"{spec.source}: hf: sources need the datasets package: "
                             "pip install 'qcore[datasets]'")

    def load_text(self, spec: DataSpec) -> str:
        try:
            import datasets
        except ImportError as exc:
            raise ImportError("hf: sources need the datasets package (pip install datasets)"
                              ) from exc
        parts = spec.source.removeprefix("hf:").split(":")
        if len(parts) == 2:
            name, config, split = parts[0], None, parts[1]
        elif len(parts) == 3:
            name, config, split = parts
        else:
            raise ValueError(f"hf source must be hf:NAME[:CONFIG]:SPLIT, got {spec.source!r}")
        data = datasets.load_dataset(name, config, split=split)
        field = spec.field or "text"
        return "\n\n".join(str(t) for t in data[field])


@hookimpl
def qcore_register_datasets(register):
    for cls in (TextFile, JSONLines, PydocTopics, HFDataset):
        register(cls)
