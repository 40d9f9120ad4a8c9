"""Binary math rewards: extraction, equivalence via math-verify, truncation, timeouts, threads."""

import subprocess
import sys
import threading
import time

import pytest

from kdrl import rewards
from kdrl.rewards import (
    answers_match,
    extract_answer,
    is_numeric_answer,
    reference_answer,
    score_batch,
    score_response,
)

# (response text, gold, finish_reason, expected reward). Expectations are what a careful grader
# would give; the comment says why wherever that is not obvious.
CASES = [
    # GSM8K "####" answers
    ("3 * 24 = 72\n#### 72", "72", "stop", 1.0),
    ("#### 72   \nThanks for asking!", "72", "stop", 1.0),  # trailing spaces and text below
    ("#### 72 dollars.", "72", "stop", 1.0),  # units and a full stop after the answer
    ("#### $72", "72", "stop", 1.0),  # a currency sign, not a LaTeX delimiter
    ("#### 73", "72", "stop", 0.0),
    ("#### \nThe answer is 72", "72", "stop", 1.0),  # empty hash line: falls back to last number
    # thousands separators
    ("#### 1,234", "1234", "stop", 1.0),
    ("The total is 1,234 apples.", "1234", "stop", 1.0),
    ("#### 1,000,000", "1000000", "stop", 1.0),
    (r"So the answer is \boxed{1{,}234}.", "1234", "stop", 1.0),
    # math-verify alone reads 1\,234 as 1 + 234 = 235; the thin space is stripped before parsing
    (r"$1\,234$ in total", "1234", "stop", 1.0),
    # fractions in every spelling
    (r"\boxed{\frac{1}{2}}", "0.5", "stop", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", "stop", 1.0),
    ("The answer is 1/2.", r"\frac{1}{2}", "stop", 1.0),
    (r"The answer is $\frac{1}{2}$.", "0.5", "stop", 1.0),  # no box: \frac counts as a number
    (r"The answer is $-\dfrac{3}{4}$.", "-0.75", "stop", 1.0),
    # math-verify rounds to 6 decimals before comparing: 0.333333 is 1/3, 0.33 is not
    ("#### 0.333333", r"\frac{1}{3}", "stop", 1.0),
    ("#### 0.33", r"\frac{1}{3}", "stop", 0.0),
    # boxed LaTeX, nested braces
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}", "stop", 1.0),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{2}}{2}", "stop", 0.0),
    (r"\boxed{\dfrac{2}{\sqrt{2}}}", r"\sqrt{2}", "stop", 1.0),  # equal after simplifying
    (r"\boxed{3\sqrt{2}}", "3", "stop", 0.0),  # unwrapped, math-verify would see only the 3
    (r"\boxed{2^{10}}", "1024", "stop", 1.0),
    (r"\boxed{x^2+1}", "1+x^2", "stop", 1.0),
    (r"\boxed{\{1,2\}}", r"\{2,1\}", "stop", 1.0),  # sets ignore order
    (r"\boxed{5} is wrong, actually \boxed{6}", "6", "stop", 1.0),  # last box wins
    (r"\boxed{6} and then \boxed{7", "6", "stop", 1.0),  # an unclosed box is skipped
    (r"\boxed{\$18.00}", "18", "stop", 1.0),
    (r"\boxed{\frac{1}{2} \text{ cup}}", "1/2", "stop", 1.0),
    # negatives and decimals
    ("The temperature fell to -5 degrees.", "-5", "stop", 1.0),
    ("The temperature fell to -5 degrees.", "5", "stop", 0.0),
    ("The answer is −3.", "-3", "stop", 1.0),  # unicode minus
    ("10-3 = 7", "7", "stop", 1.0),  # subtraction, not a negative number
    ("It costs $2.50.", "2.5", "stop", 1.0),
    ("#### 10.0", "10", "stop", 1.0),
    ("#### 007", "7", "stop", 1.0),  # leading zeros
    ("#### 18", "18.000001", "stop", 0.0),  # differ at the 6th decimal, which is kept
    # several numbers: the last one is the answer
    ("First 12, then 30, finally 42.", "42", "stop", 1.0),
    ("First 42, then 12.", "42", "stop", 0.0),
    # units
    ("He has 72 dollars left.", "72", "stop", 1.0),
    ("x = 5", "5", "stop", 1.0),
    # percent: math-verify reads 50% as 50/100 and accepts it for a gold of 50 or of 0.5;
    # a bare 0.5 against a gold of 50 is a different number
    ("#### 50%", "50", "stop", 1.0),
    (r"\boxed{50\%}", "50", "stop", 1.0),
    ("#### 50%", "0.5", "stop", 1.0),
    ("#### 0.5", "50", "stop", 0.0),
    # nothing to grade
    ("I am not sure.", "42", "stop", 0.0),
    ("", "42", "stop", 0.0),
    (r"\boxed{}", "5", "stop", 0.0),
    # truncated: right answer, still 0
    ("3 * 24 = 72\n#### 72", "72", "length", 0.0),
    (r"\boxed{6} and then \boxed{7", "6", "length", 0.0),
]


@pytest.mark.parametrize(("text", "gold", "finish_reason", "expected"), CASES)
def test_score_response(text, gold, finish_reason, expected):
    _, reward = score_response(text, gold, finish_reason=finish_reason)
    assert reward == expected


@pytest.mark.parametrize(
    ("text", "mode", "expected"),
    [
        ("work\n#### 72 ", "hash", "72"),
        ("#### 1\n#### 2\nbye", "hash", "2"),
        ("####   ", "hash", None),
        (r"\boxed{72}", "hash", None),
        (r"\boxed{\frac{1}{2}}", "boxed", r"\frac{1}{2}"),
        (r"\boxed{a} then \boxed{\sqrt{\frac{1}{2}}}", "boxed", r"\sqrt{\frac{1}{2}}"),
        (r"\boxed{1} \boxed{2", "boxed", "1"),
        ("no box", "boxed", None),
        ("1,234 and 5,678", "last_number", "5678"),
        ("from -3 to -4.25", "last_number", "-4.25"),
        ("3/4 of the cake", "last_number", "3/4"),
        (r"$-\frac{1}{2}$", "last_number", "-1/2"),
        ("10-3", "last_number", "3"),
        ("costs .5 units", "last_number", ".5"),
        ("no digits", "last_number", None),
        (r"\boxed{8} 7" "\n#### 9", "auto", "9"),  # hash before boxed before last number
        (r"\boxed{8} and 7", "auto", "8"),
        ("8 and 7", "auto", "7"),
        ("", "auto", None),
    ],
)
def test_extract_answer(text, mode, expected):
    assert extract_answer(text, mode=mode) == expected


def test_extract_answer_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown extraction mode"):
        extract_answer("42", mode="first_number")


@pytest.mark.parametrize(
    ("answer_field", "expected"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\n48+24 = 72\n#### 72", "72"),
        ("#### 1,000", "1,000"),
        ("72", "72"),
        ("  72\n", "72"),
        (r"Thus $\boxed{\frac{\sqrt{3}}{2}}$.", r"\frac{\sqrt{3}}{2}"),
        ("x+1", "x+1"),  # a bare symbolic gold keeps its form, not its last number
    ],
)
def test_reference_answer(answer_field, expected):
    assert reference_answer(answer_field) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("72", True), ("-7", True), ("1,550", True), ("5/8", True), ("12.50", True), ("$72", True),
        (r"\frac{1}{2}", True), (r"$-\dfrac{3}{4}$", True), ("50%", True), ("72.", True),
        ("x+1", False), (r"\sqrt{2}", False), ("seven", False), ("72 dollars", False),
        ("1, 2", False), ("", False), ("  ", False), ("10-3", False),
    ],
)
def test_is_numeric_answer(answer, expected):
    assert is_numeric_answer(answer) is expected


def test_reference_answer_feeds_answers_match():
    gold = reference_answer("She has 3 * 24 = 72 dollars.\n#### 72")
    assert answers_match("72.0", gold)


def test_equal_plain_numbers_skip_math_verify(monkeypatch):
    def fail(*_):
        raise AssertionError("math-verify should not run for equal plain numbers")

    monkeypatch.setattr(rewards, "_math_verify_match", fail)
    assert answers_match("1,234", "1234")
    assert answers_match("2.50", "$2.5$")
    assert answers_match("-6/8", "-0.75")  # Fraction(-6, 8) == Fraction(-3, 4) exactly


def test_math_verify_error_means_no_reward(monkeypatch):
    def boom(*_):
        raise RuntimeError("sympy blew up")

    monkeypatch.setattr(rewards, "_math_verify_match", boom)
    assert answers_match(r"\frac{1}{2}", "0.5") is False


def test_slow_check_times_out_quickly_and_scores_zero(monkeypatch):
    release = threading.Event()

    def hang(*_):
        release.wait(timeout=10.0)  # stands in for a runaway sympy simplification
        return True

    monkeypatch.setattr(rewards, "_math_verify_match", hang)
    start = time.perf_counter()
    try:
        assert answers_match(r"\frac{1}{2}", "0.5", timeout_s=0.05) is False
        text = r"\boxed{\frac{1}{2}}"  # not "1/2": equal plain numbers never reach math-verify
        scored = score_response(text, "0.5", finish_reason="stop", timeout_s=0.05)
        assert scored == (r"\frac{1}{2}", 0.0)
    finally:
        release.set()
    # two checks of 0.05 s each; the hung threads are left behind, not waited for
    assert time.perf_counter() - start < 1.0


def test_timeouts_do_not_starve_later_checks(monkeypatch):
    # A fixed pool with stuck workers would time out every later check: all-zero rewards.
    release = threading.Event()
    monkeypatch.setattr(rewards, "_math_verify_match", lambda *_: release.wait(timeout=10.0))
    try:
        assert not any(answers_match("x", "y", timeout_s=0.01) for _ in range(8))
    finally:
        release.set()
    monkeypatch.undo()
    assert answers_match(r"\frac{1}{2}", "0.5")


def test_score_batch_keeps_order_and_matches_one_by_one():
    texts, golds, finish_reasons, expected = map(list, zip(*CASES))
    scored = score_batch(texts, golds, finish_reasons, max_workers=4)
    assert [reward for _, reward in scored] == expected
    assert [answer for answer, _ in scored] == [extract_answer(t) for t in texts]


def test_score_batch_off_the_main_thread():
    # signal.alarm-based timeouts raise off the main thread; math-verify swallows the error and
    # every reward becomes 0 (the "all-zero rewards in Ray workers" bug). Not here.
    texts, golds, finish_reasons, expected = map(list, zip(*CASES))
    result = {}

    def worker():
        assert threading.current_thread() is not threading.main_thread()
        result["scored"] = score_batch(texts, golds, finish_reasons, max_workers=4)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=30.0)
    assert [reward for _, reward in result["scored"]] == expected
    assert sum(expected) > 0  # the bug would show as all zeros


def test_score_batch_empty_and_mismatched_lengths():
    assert score_batch([], [], []) == []
    with pytest.raises(ValueError, match="differ in length"):
        score_batch(["#### 1"], ["1", "2"], ["stop"])


def test_import_does_not_load_math_verify():
    code = "import sys, kdrl.rewards; assert 'math_verify' not in sys.modules, 'eager import'"
    subprocess.run([sys.executable, "-c", code], check=True)
