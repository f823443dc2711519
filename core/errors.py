"""The errors qcore raises on purpose. Each one carries a one-line message naming the input
(file, line, field, layer or tensor) so that the CLI can print it and exit with code 2."""

from __future__ import annotations

from pydantic import ValidationError


class QcoreError(Exception):
    """Base of every deliberate qcore error."""


class ConfigError(QcoreError, ValueError):
    """Invalid user input, detected before any work starts where the input allows it."""


class OutputError(ConfigError):
    """An output path qcore refuses to write (it would destroy something, or cannot work)."""


class SavedModelError(ConfigError):
    """A saved model whose files do not match what its metadata promises."""


class NonFiniteError(QcoreError, FloatingPointError):
    """A NaN or infinity in a weight, an activation, a solver or a training step."""


def validation_summary(exc: ValidationError) -> str:
    """A pydantic error as one line: ``field.path: message (got value)`` for each problem."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: "
        + ("unknown field" if e["type"] == "extra_forbidden" else e["msg"])
        + (f" (got {e['input']!r})" if "input" in e and e["type"] != "extra_forbidden"
           and not isinstance(e["input"], dict) else "")
        for e in exc.errors())
