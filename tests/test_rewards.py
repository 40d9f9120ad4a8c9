"""Binary math rewards: extraction, equivalence via math-verify, truncation, timeouts, threads."""

import inspect
import json
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kdrl import rewards
from kdrl.data import worked_answer
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
    # a number after the answer, mixed numbers, space-grouped thousands (issue 12)
    ("The answer is 12. Step 2 used 20 apples.", "12", "stop", 1.0),
    ("The answer is 12. Step 2 used 20 apples.", "20", "stop", 0.0),
    ("She needs 3 1/2 cups of flour.", "3.5", "stop", 1.0),
    ("#### 3 1/2", "7/2", "stop", 1.0),  # math-verify alone reads "3 1/2" as 2
    ("The town has 1 234 people.", "1234", "stop", 1.0),
    ("#### 1 234", "1234", "stop", 1.0),  # math-verify alone reads "1 234" as 235
    ("It weighs 2\u202f500 kg.", "2500", "stop", 1.0),  # a narrow no-break space
    # a marker counts only when the answer follows it; else the last number, as before issue 12
    ("Answer: Janet sells 16 - 3 - 4 = 9 duck eggs a day, making 9 * 2 = $18.", "18", "stop", 1.0),
    ("The answer is the sum of 3, 4 and 5, which is 12.", "12", "stop", 1.0),
    ("The answer is not 10, it is 12.", "12", "stop", 1.0),
    ("My answer is based on 3 steps. First 4*3 = 12.", "12", "stop", 1.0),
    ("The answer is 12 apples and 3 pears", "12", "stop", 1.0),  # the leading number
    ("The answer is 12 apples and 3 pears", "3", "stop", 0.0),
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


# (text, what mode="auto" extracts): the documented order is ####, \boxed{}, "the answer is",
# last number. The last rows are the formats that must read exactly as before issue 12.
EXTRACTION_CASES = [
    ("The answer is 12. Step 2 used 20 apples.", "12"),
    ("So the answer is 3 + 4 = 7, because we counted 20 apples.", "7"),  # the clause's last number
    ("The answer is 1,234.5. Then 7.", "1234.5"),  # a decimal point does not end the clause
    ("The final answer is $-\\frac{3}{4}$. Check: 9", "-3/4"),
    ("I think the answer is 10. Wait: 12 + 3 = 15, so the answer is 15. Done in 2 steps.", "15"),
    ("**Final Answer:** 42\nThat took 7 steps.", "42"),
    ("Answer: -5\n8 more to go", "-5"),  # "Answer:" opening a line
    ("To find the answer: first 3, then 5", "5"),  # "answer:" mid-sentence is no marker
    ("The answer is below. We get 8 and then 9", "9"),  # a marker without a number: last number
    ("The answer is 4\n#### 5", "5"),  # #### before the marker
    ("The answer is 4, not \\boxed{6}", "6"),  # \boxed before the marker
    ("She needs 3 1/2 cups.", "3 1/2"),
    ("It fell to -3 1/2 degrees.", "-3 1/2"),
    ("It took 2 3/2 hours.", "3/2"),  # no proper fraction part: not a mixed number
    ("The town has 1 234 people.", "1234"),
    ("A ship of 12 345 678 tons", "12345678"),
    ("It weighs 2\u00a0500 kg, or 2\u2009500 000 g.", "2500000"),
    ("In 2019 100 people came.", "100"),  # a 4-digit group is no thousands group
    ("12 apples and 34 pears", "34"),
    # the marker is trusted only when its clause starts with the answer: a number (after spaces,
    # markdown, a colon, $, \(, \boxed{ or a hedge), then the leading number or the equation's
    # result; anything else falls through to the last number (the review of issue 12)
    ("Answer: Janet sells 16 - 3 - 4 = 9 duck eggs a day, making 9 * 2 = $18.", "18"),
    ("The answer is the sum of 3, 4 and 5, which is 12.", "12"),
    ("The answer is not 10, it is 12.", "12"),
    ("My answer is based on 3 steps. First 4*3 = 12.", "12"),  # "my answer is": no marker
    ("The answer is 7. My answer is based on 3 steps.", "7"),  # ... so it hides no real one
    ("The answer is 12 apples and 3 pears", "12"),
    ("The final answer is: 42", "42"),
    ("**Answer:** 7", "7"),
    ("Answer: $1,234", "1234"),
    ("the answer is \\frac{3}{4}", "3/4"),
    ("The answer is \\(18\\). It took 3 steps.", "18"),
    ("The answer is \\$18. It took 3 steps.", "18"),
    ("the answer is \\boxed{12 (cut off, 3 left", "12"),  # an unclosed box: no \boxed answer
    ("The answer is 12, because 3 groups of 4 make 12 and 2 are left over.", "12"),
    ("The answer is approximately 3.14. It took 2 steps.", "3.14"),
    ("The answer is -5 degrees, up from 3", "-5"),
    ("The answer is 3 1/2 cups, 2 are left", "3 1/2"),
    ("The answer is 3*4 = 12, not 13", "12"),  # an equation: its result
    ("The answer is $3 \\times 4 = 12$ apples. 5 were eaten.", "12"),
    ("The answer is 12 = 3*4 apples", "12"),  # the side that is one number
    ("The answer is 3 + 4, which is 7", "7"),  # an expression without result: the last number
    ("The answer is 2^{10}", "10"),  # not a number: the last number, as before
    ("The answer is 12 - the rest were 3", "3"),  # a dash: no marker is trusted, as before
    # as before: GSM8K, the embedded task's worked answers, LaTeX, subtraction
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72", "72"),
    ("7+5=12;4+8+1=13;#### 132", "132"),
    ("7+5=12;4+8+1=13;13", "13"),
    ("7+5=12;4+8+1=13;###9 132", "132"),  # a mistyped '#': glued to a symbol, no 9132
    ("So $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("10-3 = 7", "7"),
    ("First 1,000, then 2,500.", "2500"),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACTION_CASES)
def test_extract_answer_table(text, expected):
    assert extract_answer(text) == expected


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
        ("3 1/2", True), ("1 234", True),
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


# --- the exact fast path against math-verify (issue 12) ---------------------------------------


def _spell_integer(n: int, rng: random.Random) -> str:
    """n in one of the spellings responses and golds use; some are plain, some not."""
    sign, digits, grouped, d = "-" * (n < 0), str(abs(n)), f"{abs(n):,}", rng.randint(2, 9)
    return rng.choice([
        sign + digits, sign + digits, sign + grouped, sign + grouped.replace(",", " "),
        sign + grouped.replace(",", "{,}"), sign + digits + "." + "0" * rng.randint(1, 3),
        f"{n * d}/{d}", rf"\${sign}{digits}", f"${sign}{digits}$", sign + "0" + digits,
        rf"{sign}\frac{{{abs(n) * d}}}{{{d}}}", f"{sign}{digits} dollars", f"{sign}{digits}%",
    ])


def _integer_pair(rng: random.Random) -> tuple[str, str]:
    gold = int(10 ** rng.uniform(0, 14)) * rng.choice([1, 1, 1, -1])
    delta = rng.choice([0, 0, 1, -1, rng.randint(2, 100), -rng.randint(2, 100), -2 * gold,
                        rng.randint(1, 10 ** rng.randint(1, 13))])
    return _spell_integer(gold + delta, rng), _spell_integer(gold, rng)


def _decimal(units: int, places: int) -> str:
    """units / 10**places written with exactly `places` decimals."""
    whole, frac = divmod(abs(units), 10**places)
    return "-" * (units < 0) + f"{whole}.{frac:0{places}d}"


def _decimal_pair(rng: random.Random) -> tuple[str, str]:
    places = rng.randint(1, 7)
    g = rng.randint(-(10 ** (places + 4)), 10 ** (places + 4))
    k = rng.randint(1, places)
    return rng.choice([
        (_decimal(g * 10**k, places + k), _decimal(g, places)),  # equal, padded with zeros
        (_decimal(g + rng.choice([1, -1]), places), _decimal(g, places)),  # one in the last place
        (_decimal(round(g / 10**k), places - k) if places > k else str(round(g / 10**k)), _decimal(g, places)),
        (_decimal(g, places), str(round(g / 10**places))),  # against the nearest integer
        (_decimal(g, places), _decimal(rng.randint(-(10 ** (places + 4)), 10 ** (places + 4)), places)),
    ])


def _fraction_pair(rng: random.Random) -> tuple[str, str]:
    a, b, k = rng.randint(-50, 50), rng.randint(1, 30), rng.randint(2, 9)
    gold = rng.choice([f"{a}/{b}", rf"\frac{{{a}}}{{{b}}}" if a >= 0 else rf"-\frac{{{-a}}}{{{b}}}"])
    places = rng.randint(5, 9)
    return rng.choice([
        (f"{a * k}/{b * k}", gold),
        (f"{a / b:.{rng.randint(1, 9)}f}", gold),  # rounded: math-verify's 6-decimal rule decides
        (f"{int(a / b * 10**places) / 10**places:.{places}f}", gold),  # truncated
        (f"{rng.randint(1, 9)} {abs(a)}/{b}", gold),  # a mixed number (when |a| < b)
        (f"{rng.randint(-50, 50)}/{rng.randint(1, 30)}", gold),
    ])


AGREEMENT_EDGES = [
    ("0.3333333", "1/3"), ("0.333333", r"\frac{1}{3}"), ("0.33", "1/3"), ("12.0", "12"),
    ("12", "12.0"), ("12.00", "13"), ("24/2", "12"), ("24/2", "13"), ("007", "7"), ("-0", "0"),
    ("2.", "2"), (".5", "0.5"), ("18", "18.000001"), ("18", "18.0000001"), ("0.5", "50"),
    ("50", "0.5"), ("50%", "50"), (r"50\%", "0.5"), ("1{,}234", "1234"), (r"1\,234", "1235"),
    ("3 1/2", "3.5"), ("3 1/2", "4"), (r"\frac{7}{2}", "3.5"), (r"\dfrac{3}{4}", "0.75"),
    (r"\$12", "12"), ("12 dollars", "12"), ("12 dollars", "13"), ("x+1", "1+x"), (r"\sqrt{4}", "2"),
    ("2^{3}", "8"), ("2^{3}", "9"), ("10^{12}", "1000000000000"), ("-5", "5"), ("1,234", "1234"),
    ("1 234", "1234"), ("1e3", "1000"), ("1/0", "1"), ("0/5", "0"),
] + [
    # around the bound of the unequal-integer rule, and far above it (where it defers)
    (spell(base + d), spell2(base))
    for base in (10**12 - 2, 10**12, 10**15, 10**16, 12345678901234567, 10**20)
    for d in (0, 1, -1, 2)
    for spell, spell2 in ((str, str), ("{}.0".format, str), (str, "{}.0".format), ("{}/1".format, str))
]


def agreement_pairs(n: int, *, seed: int = 0) -> list[tuple[str, str]]:
    """(pred, gold) pairs: the edges above, then `n` drawn 60% integers, 20% decimals, 20% fractions."""
    rng = random.Random(seed)
    makers = [_integer_pair] * 6 + [_decimal_pair] * 2 + [_fraction_pair] * 2
    return AGREEMENT_EDGES + [rng.choice(makers)(rng) for _ in range(n)]


@pytest.mark.slow  # 10-20 s: 2,000 math-verify checks
def test_exact_verdict_agrees_with_math_verify():
    # The fast path may only decide where its verdict is math-verify's; it defers otherwise.
    decided, disagreements = 0, []
    for pred, gold in agreement_pairs(2000):
        pred_s, gold_s = rewards._normalise(pred), rewards._normalise(gold)
        fast = rewards._exact_verdict(pred_s, gold_s)
        slow = rewards._math_verify_match(rewards._as_latex(pred_s), rewards._as_latex(gold_s))
        if fast is not None:
            decided += 1
            if fast != slow:
                disagreements.append((pred, gold, fast, slow))
    assert disagreements == []
    assert decided > 800  # it does decide: ~40% of the pairs (the plain integers and equal values)


def test_exact_verdict_decides_unequal_integers_only():
    assert rewards._exact_verdict("73", "72") is False
    assert rewards._exact_verdict("-5", "5") is False
    assert rewards._exact_verdict("12.00", "13") is False  # an integer written as a decimal
    assert rewards._exact_verdict("0.3333333", "1/3") is None  # math-verify says equal
    assert rewards._exact_verdict("12.5", "12") is None
    assert rewards._exact_verdict(str(10**12 + 1), str(10**12)) is None  # above the bound
    assert rewards._exact_verdict("x+1", "2") is None
    assert rewards._exact_verdict("73", "72", unequal=False) is None


def test_wrong_integer_answers_skip_math_verify(monkeypatch):
    calls = []
    real = rewards._math_verify_match
    monkeypatch.setattr(rewards, "_math_verify_match", lambda *a: calls.append(a) or real(*a))
    golds = ["132", "72", "-7", "1,550"]
    texts = ["7+5=12;4+8+1=13;#### 131", "#### 73", "The answer is 7.", "1 551 pages"]
    expected = [("131", 0.0), ("73", 0.0), ("7", 0.0), ("1551", 0.0)]
    assert score_batch(texts, golds, ["stop"] * 4) == expected
    assert not answers_match("12.0", "13")
    assert calls == []
    # the path before issue 12, kept private for the benchmark: the same verdicts, via math-verify
    monkeypatch.setattr(rewards, "_FAST_PATH", False)
    assert score_batch(texts, golds, ["stop"] * 4) == expected
    assert len(calls) == 4


def test_fast_and_slow_paths_score_alike(monkeypatch):
    # End to end through score_batch: the same rewards with and without the fast path.
    pairs = agreement_pairs(150, seed=1)
    texts = [f"Some work.\n#### {pred}" for pred, _ in pairs]
    golds = [gold for _, gold in pairs]
    finish_reasons = ["stop"] * len(pairs)
    fast = score_batch(texts, golds, finish_reasons)
    monkeypatch.setattr(rewards, "_FAST_PATH", False)
    assert score_batch(texts, golds, finish_reasons) == fast


def test_fast_path_is_no_public_option():
    # The switch is for scripts/bench_rewards.py and the test above, not for users.
    for fn in (answers_match, score_response, score_batch):
        assert "fast" not in inspect.signature(fn).parameters, fn.__name__


# --- the formats that must score exactly as before ---------------------------------------------

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"


def test_gsm8k_graded_solutions_score_one():
    rows = [json.loads(line) for line in (FIXTURES / "gsm8k_sample.jsonl").read_text().splitlines()]
    golds = [reference_answer(row["answer"]) for row in rows]
    scored = score_batch([row["answer"] for row in rows], golds, ["stop"] * len(rows))
    assert [reward for _, reward in scored] == [1.0] * len(rows)
    # and every solution scores 0 against the other rows' (different) golds
    shifted = golds[1:] + golds[:1]
    assert {float(a != b) for a, b in zip(golds, shifted)} == {1.0}
    scored = score_batch([row["answer"] for row in rows], shifted, ["stop"] * len(rows))
    assert [reward for _, reward in scored] == [0.0] * len(rows)


def test_embedded_worked_answers_score_as_before():
    # The embedded task's responses: worked answers with the right or a wrong final number, and
    # cut-off ones without "####" or with a '#' mistyped as a digit, read by their last number
    # (its digits only, as before).
    rng = random.Random(0)
    texts, golds, expected = [], [], []
    for _ in range(300):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        work = worked_answer(a, b)
        final = a + b + rng.choice([0, 0, 1, -1, 10, rng.randint(-50, 50)])
        cut = rng.randint(1, len(work))
        typo = work.replace("####", "###" + str(rng.randint(0, 9)))
        for text in (work.replace(f"#### {a + b}", f"#### {final}"), work[:cut], typo):
            last = re.findall(r"[0-9]+", text)
            texts.append(text)
            golds.append(reference_answer(work))
            expected.append(float(bool(last) and int(last[-1]) == a + b))
    scored = score_batch(texts, golds, ["stop"] * len(texts))
    assert [reward for _, reward in scored] == expected
    assert 0 < sum(expected) < len(expected)


# Reasoning models: the answer is read after the thinking block, never inside it.
THINKING_CASES = [
    # (response, answer with thinking="strip", answer with thinking="keep")
    ("<think>Maybe 12? 3*4 = 12. No: 3*5.</think>\nSo the answer is \\boxed{15}.", "15", "15"),
    ("<think>Maybe\n#### 12\nNo.</think> 3*5 = 15", "15", "12"),  # a marker inside the thinking is not the answer
    ("3 apples and 4 more: 7? wait, 8.</think>The answer is 8.", "8", "8"),  # R1 templates open <think> in the prompt
    ("<think>Let me count 3, 4, 5 and then", None, "5"),  # stopped while thinking: no answer
    ("<think>first</think> 2 <think>second 9</think> Final answer: 3", "3", "3"),  # the last block ends the thinking
    ("<think>12</think>", None, "12"),  # thought, then said nothing
    ("No tags at all: #### 42", "42", "42"),
]


@pytest.mark.parametrize("text,stripped,kept", THINKING_CASES)
def test_answers_are_read_after_the_thinking_block(text, stripped, kept):
    assert extract_answer(text) == stripped
    assert extract_answer(text, thinking="keep") == kept


def test_the_reward_config_chooses_the_thinking_mode():
    import polars as pl

    from kdrl.config import RewardConfig
    from kdrl.stages import score_rewards

    text = "<think>Is it\n#### 12\n</think> No: 3*5 = 15, so the answer is 15."
    rollouts = pl.DataFrame({"step": [0], "prompt_id": [0], "sample_idx": [0], "completion_text": [text],
                             "finish_reason": ["stop"]})
    prompts = pl.DataFrame({"prompt_id": [0], "answer": ["15"]})
    assert score_rewards(rollouts, prompts, RewardConfig())["reward"].to_list() == [1.0]
    assert score_rewards(rollouts, prompts, RewardConfig(thinking="keep"))["reward"].to_list() == [0.0]
