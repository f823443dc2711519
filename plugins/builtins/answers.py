"""Final answers of reasoning outputs: extraction, equivalence, and collapse detection.

Extraction, in order (the study's prompt asks for ``\\boxed{}``): the last ``\\boxed{...}``
(braces balanced), else the text after the last ``####``, else what follows the last
"the answer is", else the last number in the text. Equivalence is math-verify's
(``1,000`` = ``1000``, fractions, LaTeX), never hand-written parsing.

A *loop* (the collapse mode of 4-bit weight+activation models in long reasoning): the
output ends in at least :data:`LOOP_REPEATS` back-to-back copies of one n-gram of tokens
(any n up to :data:`LOOP_MAX_N`) that together span at least :data:`LOOP_MIN_TOKENS`
tokens, so that a genuine short repetition ("1, 1, 1") does not count.
"""

from __future__ import annotations

import logging
import re

LOOP_REPEATS = 3
LOOP_MAX_N = 64
LOOP_MIN_TOKENS = 24

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ANSWER_IS = re.compile(r"answer is[:\s]*\$?([^\n$]+)", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces allowed."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1].strip() if depth == 0 else None


def extract_answer(text: str) -> str | None:
    """The final answer of a reasoning output, or None when there is none."""
    boxed = last_boxed(text)
    if boxed:
        return boxed
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip().splitlines()
        if tail and tail[0].strip():
            return tail[0].strip()
    found = _ANSWER_IS.findall(text)
    if found:
        answer = found[-1].strip().rstrip(".").strip()
        if answer:
            return answer
    numbers = _NUMBER.findall(text)
    return numbers[-1].rstrip(",") if numbers else None


def _math_verify():
    try:
        import math_verify
    except ImportError as exc:  # an optional extra
        raise ImportError("the reasoning evaluator needs math-verify: "
                          "pip install math-verify (a dependency of qcore: reinstall it)") from exc
    return math_verify


def equivalent(gold: str, answer: str | None) -> bool:
    """Whether ``answer`` equals ``gold`` mathematically (math-verify)."""
    if answer is None:
        return False
    mv = _math_verify()
    # math-verify's timeouts use signal.alarm, which only works on the main thread; it
    # warns on every call without them
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold_parsed = mv.parse(_latex(gold), parsing_timeout=None)
    pred_parsed = mv.parse(_latex(answer), parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return gold.strip() == answer.strip()
    return bool(mv.verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _latex(text: str) -> str:
    """Wrap an expression in $...$ (unless it is already) so that LaTeX in it, ``\\$``
    included, is parsed as such."""
    text = text.strip()
    return text if len(text) > 1 and text.startswith("$") and text.endswith("$") \
        else f"${text}$"


def ends_in_loop(tokens: list[int], repeats: int = LOOP_REPEATS, max_n: int = LOOP_MAX_N,
                 min_tokens: int = LOOP_MIN_TOKENS) -> bool:
    """Whether ``tokens`` end in ``repeats``+ copies of one n-gram spanning ``min_tokens``+."""
    size = len(tokens)
    for n in range(1, min(max_n, size // repeats) + 1):
        unit = tokens[size - n:]
        copies = 1
        while (copies + 1) * n <= size and tokens[size - (copies + 1) * n:
                                                 size - copies * n] == unit:
            copies += 1
        if copies >= repeats and copies * n >= min_tokens:
            return True
    return False
