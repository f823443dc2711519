"""Package versions recorded with every saved model and report."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("qcore", "torch", "transformers", "accelerate", "pluggy", "pydantic",
                 "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
