"""A safetensors checkpoint folder read tensor by tensor, memory-mapped: ``model.safetensors``,
or shards named in ``model.safetensors.index.json`` (transformers' layout, and what vLLM
reads); pickled ``.bin`` checkpoints are never read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from qcore.errors import ConfigError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsFolder:
    """The tensors of a folder's single file or indexed shards, with errors (of class
    ``error``) naming the tensor or the missing shard."""

    def __init__(self, path: Path, single: str = SINGLE_FILE, index_file: str = INDEX_FILE,
                 error: type[ConfigError] = ConfigError) -> None:
        self.path = Path(path)
        self.error = error
        index = self.path / index_file
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise ValueError("weight_map is not a mapping")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise error(f"{index}: not a safetensors index ({exc})") from exc
            self.listing = index_file
        elif (self.path / single).is_file():
            try:
                with safe_open(str(self.path / single), "pt") as f:
                    weight_map = dict.fromkeys(f.keys(), single)
            except (SafetensorError, OSError) as exc:
                raise error(f"{self.path / single}: unreadable ({exc})") from exc
            self.listing = single
        else:
            raise error(f"{self.path}: no {single} or {index_file} (pickled .bin "
                        "checkpoints are never loaded)")
        for shard in sorted(set(weight_map.values())):
            if not (self.path / shard).is_file():
                first = next(k for k, v in weight_map.items() if v == shard)
                raise error(f"{self.path}: shard {shard} (holding {first}) is missing")
        self.weight_map: dict[str, str] = weight_map

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        """The tensor, memory-mapped from its shard."""
        shard = self.weight_map.get(name)
        if shard is None:
            raise self.error(f"{self.path}: tensor {name} is missing (not in {self.listing})")
        try:
            with safe_open(str(self.path / shard), "pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise self.error(f"{self.path / shard}: cannot read {name} ({exc})") from exc


def folder_config(path: str | Path) -> dict[str, Any]:
    """A model folder's config.json; {} when it is missing, unreadable or not a mapping."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def quantization_config(path: str | Path) -> dict[str, Any] | None:
    """The ``quantization_config`` a model folder's config.json declares (how a
    quantization tool stored its tensors), or None for a plain folder."""
    qconfig = folder_config(path).get("quantization_config")
    return qconfig if isinstance(qconfig, dict) else None
