"""Answer extraction, math equivalence and the loop detector on scripted outputs."""

import pytest

from qcore_builtins.answers import (
    LOOP_MIN_TOKENS,
    ends_in_loop,
    equivalent,
    extract_answer,
    last_boxed,
)


@pytest.mark.parametrize("text, answer", [
    ("so x = 3, and \\boxed{42}.", "42"),
    ("first \\boxed{1} then corrected: \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("nested \\boxed{\\sqrt{x^{2}}} done", "\\sqrt{x^{2}}"),
    ("she pays 3 + 4 = 7\n#### 7", "7"),
    ("The answer is 1,000 dollars.", "1,000 dollars"),
    ("after 12 days and 30 minutes we are done", "30"),
    ("12 apples, 5 pears, total 17,", "17"),
    ("no digits here at all", None),
    ("unbalanced \\boxed{12", "12"),
])
def test_extraction_handles_messy_outputs(text, answer):
    assert extract_answer(text) == answer


def test_last_boxed_takes_the_last_box():
    assert last_boxed("\\boxed{a} \\boxed{b}") == "b"
    assert last_boxed("none") is None


@pytest.mark.parametrize("gold, answer, same", [
    ("1000", "1,000", True),
    ("42", "42.0", True),
    ("0.5", "\\frac{1}{2}", True),
    ("18", "\\$18", True),
    ("7", "8", False),
    ("7", None, False),
    ("3", "3 apples", True),
])
def test_equivalence_goes_through_math_verify(gold, answer, same):
    pytest.importorskip("math_verify")
    assert equivalent(gold, answer) is same


def test_loop_detector_on_constructed_loops():
    reasoning = list(range(100))
    loop = [7, 8, 9, 10] * 8  # 32 tokens, 8 copies of a 4-gram
    assert ends_in_loop(reasoning + loop)
    assert ends_in_loop(reasoning + [5] * LOOP_MIN_TOKENS)  # one token repeated
    assert not ends_in_loop(reasoning + [5] * (LOOP_MIN_TOKENS - 1))  # too short a span
    assert not ends_in_loop(reasoning + [1, 2, 3] * 2)  # two copies only
    assert not ends_in_loop(loop + reasoning)  # a loop that the model left again
    assert not ends_in_loop([])
