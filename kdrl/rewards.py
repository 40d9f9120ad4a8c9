"""Rule-based rewards for math answers: binary correctness, exact where it can be, else math-verify.

Variant: r = 1.0 when the final answer extracted from a response is mathematically equal to the
gold answer, else 0.0. No format reward, no partial credit. A truncated response
(``finish_reason == "length"``) scores 0.0 even when the answer in it is right: it never finished,
and rewarding it would teach the policy that running out of tokens is fine (DAPO's "overlong"
problem, handled here in its simplest form).

Extraction (``mode="auto"``) prefers an explicit marker to the last number, in this order:

1. the GSM8K ``#### answer`` line (the last one);
2. the last ``\\boxed{...}`` whose braces close;
3. "the answer is ..." (also "the final answer is", "Final answer:", a line starting "Answer:"),
   the last such marker, and only when its clause starts with the answer: its leading number, or
   the result of an equation ("The answer is 3*4 = 12"). "The answer is 12. Step 2 used 20
   apples." gives 12 and "The answer is 12 apples and 3 pears" 12; a clause of prose ("The answer
   is the sum of 3, 4 and 5, which is 12", "Answer: Janet sells 16 - 3 - 4 = 9 eggs, making
   $18") or of a bare expression ("The answer is 3 + 4, so 7") falls through to
4. the last number in the text.

A number is read whole: ``1,234``, ``1{,}234``, ``1\\,234`` and space-grouped ``1 234`` are 1234;
``3 1/2`` is the mixed number 7/2 (when 1 < 2; "2 3/2" is two numbers); a space groups or mixes
only in a number that stands free (after a space, sign, ``$`` or bracket: "###9 837" ends in
837); ``-``, ``−`` before a number are a minus only where they cannot be subtraction.

Equality is decided exactly when both sides are plain numbers (integer, decimal, ``a/b``) and
exact arithmetic provably agrees with math-verify: equal values match, and two *integers* that
differ do not (math-verify compares integers exactly; below 10^12 even one written ``12.0``).
Everything else (0.3333333 vs 1/3, which math-verify accepts after rounding to 6 decimals; LaTeX;
units; percent) goes to math-verify (``verify(parse(gold), parse(pred))``).
tests/test_rewards.py checks that agreement over thousands of generated pairs.

math-verify bounds its own time with ``signal.alarm``, which only works on the main thread:
anywhere else (Ray workers, thread pools) it raises, the error is swallowed and every reward
silently becomes 0. So its timeouts are switched off here and each check runs in a daemon
thread that the caller waits on for at most ``timeout_s``.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from fractions import Fraction
from typing import Literal

ExtractMode = Literal["auto", "hash", "boxed", "last_number"]
ThinkingMode = Literal["strip", "keep"]

# A space, no-break space, thin space or narrow no-break space.
_SPACE = "[ \u00a0\u2009\u202f]"
# 1,234 / 1{,}234 / 1\,234 / 1\ 234 / 1 234: thousands separators. math-verify reads 1\,234 and
# 1 234 as 235.
_MARK_SEP = r"(?:,|\{,\}|\\,|\\ )"
_GROUP_SEP = rf"(?:{_MARK_SEP}|{_SPACE})"
# Spaces group digits ("1 234") or split a mixed number ("3 1/2") only in a number that stands
# free: after a space, a sign, $ or an opening bracket. Glued to a symbol it is two numbers, as
# in a weak student's "###9 837" (a '#' mistyped), which must read 837 as it always did.
_FREE = r"(?<![^\s$(\[{\-−])"
# A sign counts as a minus only where it cannot be subtraction ("10-3" ends in 3, not -3).
# Integer \frac{a}{b} is a number too, so "$-\frac{1}{2}$" without a box still yields -1/2.
# A mixed number is tried before the plain forms, grouped thousands before bare digits.
_NUMBER = re.compile(
    r"(?P<sign>(?<![\w)\]}])[-−])?"
    r"(?:\\[dt]?frac\{(?P<frac_num>[0-9]+)\}\{(?P<frac_den>[0-9]+)\}"
    rf"|{_FREE}(?P<whole>[0-9]+){_SPACE}(?P<mixed_num>[0-9]+)/(?P<mixed_den>[0-9]+)(?![0-9/]|\.[0-9])"
    rf"|(?P<num>(?:{_FREE}[0-9]{{1,3}}(?:{_GROUP_SEP}[0-9]{{3}})+(?![0-9])"
    rf"|[0-9]{{1,3}}(?:{_MARK_SEP}[0-9]{{3}})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?|\.[0-9]+)"
    r"(?:/(?P<den>[0-9]+(?:\.[0-9]+)?))?)"
)
_BOXED = re.compile(r"\\boxed\s*\{")
_THOUSANDS = re.compile(rf"(?<=[0-9]){_GROUP_SEP}(?=[0-9]{{3}}(?![0-9]))")
# A mixed number inside an answer; math-verify reads "3 1/2" as 2.
_MIXED = re.compile(rf"(?<![\w.}}/])([0-9]+){_SPACE}+([0-9]+)/([0-9]+)(?![\w./])")
# "The answer is", "the final answer is", "Final answer:", a line "**Answer:**". Neither "my
# answer is" ("My answer is based on 3 steps.") nor a bare "answer:" mid-sentence ("to find the
# answer: first 3, ...") is a marker: they introduce prose, and would hide an earlier real one.
_ANSWER_IS = re.compile(
    r"\bthe\s+(?:final\s+)?answer\s+(?:is\b|=)"
    r"|\bfinal\s+answer[*_\s]*(?:is\b|=|:)"
    r"|^[*_#>\s]*answer[*_\s]*:",
    re.IGNORECASE | re.MULTILINE,
)
# Where the clause after the marker ends: a new line, ; ! ?, a full stop that is no decimal
# point, or a comma followed by a space (thousands commas have none).
_CLAUSE_END = re.compile(r"\n|[;!?]|\.(?![0-9])|,\s")
# What may stand between a marker and the answer it introduces: spaces, markdown emphasis, a
# colon, math delimiters, an opening \boxed{ (a closed box is read before any marker), a hedge.
_ANSWER_LEAD = re.compile(
    r"(?:[\s*_:]|\\?\$|\\[(\[]|\\boxed\s*\{|\\approx|[≈~]"
    r"|(?:approximately|about|roughly|exactly)\b)*",
    re.IGNORECASE,
)
# An operator or "=" between two numbers of an answer clause ("3 \\times 4 = 12", "$3*4$ = 12").
_CHAIN_OP = re.compile(r"[\s$]*([-+*/×÷^−=]|\\(?:times|cdot|div)(?![A-Za-z]))")
# Plain words ("72 dollars") parse as products of symbols inside $...$ unless put in \text{}.
_WORD = re.compile(r"(?<![\\{A-Za-z])[A-Za-z]{2,}(?![A-Za-z])")
_PLAIN_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:/[0-9]+)?")
# Integers smaller than this are compared exactly by math-verify in every plain spelling
# (sympy Integer, or a 15-digit Float for "12.0"), so two that differ are provably unequal.
_EXACT_INTEGER_BOUND = 10**12
# False sends unequal integers through math-verify too, as before issue 12 (~2 ms each instead
# of ~10 us, same verdicts). Only for scripts/bench_rewards.py and the tests that compare paths.
_FAST_PATH = True


def _extract_hash(text: str) -> str | None:
    """The rest of the line after the last ``####`` (GSM8K's answer marker)."""
    if "####" not in text:
        return None
    answer = text.rsplit("####", 1)[1].split("\n", 1)[0].strip()
    return answer or None


def _extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` whose braces close; nested braces are fine."""
    # Scan from the end so a box cut off by truncation falls back to the previous one.
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                content = text[start:i].strip()
                if content:
                    return content
                break
    return None


def _number_text(m: re.Match[str]) -> str:
    """A ``_NUMBER`` match as ``-1234.5``, ``3/4`` or ``3 1/2``: no separators, an ASCII minus."""
    sign = "-" if m["sign"] else ""
    if m["frac_num"] is not None:
        return f"{sign}{m['frac_num']}/{m['frac_den']}"
    if m["whole"] is not None:
        if int(m["mixed_num"]) < int(m["mixed_den"]):
            return f"{sign}{m['whole']} {m['mixed_num']}/{m['mixed_den']}"
        return f"{m['mixed_num']}/{m['mixed_den']}"  # "2 3/2" is no mixed number: the last is 3/2
    den = f"/{m['den']}" if m["den"] else ""
    return f"{sign}{_THOUSANDS.sub('', m['num'])}{den}"


def _extract_last_number(text: str) -> str | None:
    """The last number, as ``-1234.5``, ``3/4`` or ``3 1/2``; separators dropped, minus in ASCII."""
    matches = list(_NUMBER.finditer(text))
    return _number_text(matches[-1]) if matches else None


def _leading_number(text: str, pos: int = 0) -> re.Match[str] | None:
    """The number at ``pos``, after any ``_ANSWER_LEAD`` ("is: $-7$", "**Answer:** 7")."""
    return _NUMBER.match(text, _ANSWER_LEAD.match(text, pos).end())


def _clause_answer(clause: str) -> str | None:
    """The answer a clause opens with: its leading number ("12 apples and 3 pears" is 12), or of
    an equation the last side that is one number ("3*4 = 12" and "12 = 3*4" are 12); None for a
    clause that opens with anything else, or with an expression that has no result ("3 + 4")."""
    m = _leading_number(clause)
    if m is None:
        return None
    # The operands of each side of the "="s; None where an operator is followed by no number
    # ("2^{10}", "3*4 = twelve"): that side is no plain number.
    sides: list[list[re.Match[str] | None]] = [[m]]
    while m is not None and (op := _CHAIN_OP.match(clause, m.end())):
        m = _leading_number(clause, op.end())
        if op[1] == "=":
            sides.append([m])
        else:
            sides[-1].append(m)
    numbers = [side[0] for side in sides if len(side) == 1 and side[0] is not None]
    return _number_text(numbers[-1]) if numbers else None


def _extract_answer_is(text: str) -> str | None:
    """The answer that the last "the answer is"-style marker introduces, or None (not trusted).

    Trusted only when the clause after the marker starts with the answer (``_clause_answer``);
    "The answer is not 10, it is 12." is no statement of an answer: the last number decides.
    """
    markers = list(_ANSWER_IS.finditer(text))
    if not markers:
        return None
    rest = text[markers[-1].end() :]
    end = _CLAUSE_END.search(rest)
    return _clause_answer(rest[: end.start() if end else None])


_EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "hash": _extract_hash,
    "boxed": _extract_boxed,
    "last_number": _extract_last_number,
}
# The documented order of mode="auto" (module docstring): explicit markers before the last number.
_AUTO_ORDER = (_extract_hash, _extract_boxed, _extract_answer_is, _extract_last_number)


def answer_part(text: str, *, thinking: ThinkingMode = "strip") -> str | None:
    """The part of a response that holds its answer. ``strip`` (reasoning models): the text after
    the last ``</think>``; None when a ``<think>`` block is never closed (the model stopped while
    thinking: it gave no answer); the whole text when there are no think tags. Only ``</think>``
    is needed: R1-style chat templates open the block in the prompt. ``keep``: the whole text.

    >>> answer_part("<think>Is it 12? No, 3*5 = 15.</think> The answer is 15.")
    ' The answer is 15.'
    >>> answer_part("Is it 12? No, 3*5 = 15.</think>#### 15")  # the template opened the block
    '#### 15'
    >>> answer_part("<think>Is it 12? Let me check 3*4") is None
    True
    >>> answer_part("<think>Is it 12?</think> 15", thinking="keep")
    '<think>Is it 12?</think> 15'
    """
    if thinking == "keep":
        return text
    if thinking != "strip":
        raise ValueError(f"unknown thinking mode {thinking!r}: strip or keep")
    end = text.rfind("</think>")
    if end >= 0:
        return text[end + len("</think>"):]
    return None if "<think>" in text else text


def extract_answer(text: str, *, mode: ExtractMode = "auto", thinking: ThinkingMode = "strip") -> str | None:
    """The final answer in a response, or None when there is none. With ``thinking="strip"``
    only the text after the thinking block counts (see `answer_part`).

    ``hash``: after the last ``####``; ``boxed``: the last ``\\boxed{}``; ``last_number``: the
    last number (grouped thousands, negatives, decimals, ``a/b``, mixed ``3 1/2`` and integer
    ``\\frac{a}{b}``); ``auto``: the first of these that finds something, in this order:

    1. ``####`` line, 2. last ``\\boxed{}``, 3. the answer that the last "the answer is" /
    "the final answer is" / "Final answer:" / line-initial "Answer:" introduces, when its clause
    starts with a number (the leading number, or an equation's result), 4. the last number.

    >>> extract_answer("She pays 3 * 24 = 72 dollars.\\n#### 72")
    '72'
    >>> extract_answer(r"So $x = \\boxed{\\frac{1}{2}}$.", mode="boxed")
    '\\\\frac{1}{2}'
    >>> extract_answer("From 1,000 we get -1,234.5 in the end.", mode="last_number")
    '-1234.5'
    >>> extract_answer("The answer is 12. Step 2 used 20 apples.")
    '12'
    >>> extract_answer("The answer is 3*4 = 12, not 13.")
    '12'
    >>> extract_answer("The answer is not 10, it is 12.")  # no answer after the marker
    '12'
    >>> extract_answer("She needs 3 1/2 cups, or 1 234 grams.", mode="last_number")
    '1234'
    >>> extract_answer("no digits here") is None
    True
    """
    text = answer_part(text, thinking=thinking)
    if text is None:
        return None
    if mode == "auto":
        for extract in _AUTO_ORDER:
            answer = extract(text)
            if answer is not None:
                return answer
        return None
    if mode not in _EXTRACTORS:
        raise ValueError(f"unknown extraction mode {mode!r}: auto, hash, boxed or last_number")
    return _EXTRACTORS[mode](text)


def reference_answer(answer_field: str) -> str:
    """The gold final answer in a dataset's answer field.

    GSM8K worked solutions end in ``#### answer``; MATH solutions box it; anything else is taken
    to be the bare answer already. Never the last number: a gold like ``x+1`` has none to spare.

    >>> reference_answer("Natalia sold 48/2 = 24 clips in May.\\n48+24 = 72\\n#### 72")
    '72'
    >>> reference_answer(r"Hence the answer is $\\boxed{\\frac{\\sqrt{3}}{2}}$.")
    '\\\\frac{\\\\sqrt{3}}{2}'
    >>> reference_answer(" 72 ")
    '72'
    """
    return _extract_hash(answer_field) or _extract_boxed(answer_field) or answer_field.strip()


def _improper(m: re.Match[str]) -> str:
    """A mixed number "3 1/2" as "7/2"; "2 3/2" (no proper fraction part) is left as it is."""
    whole, num, den = (int(g) for g in m.groups())
    return f"{whole * den + num}/{den}" if num < den else m[0]


def _normalise(answer: str) -> str:
    """One answer as bare LaTeX, without delimiters, currency or thousands separators, with
    mixed numbers as improper fractions."""
    s = answer.strip().replace("−", "-")
    s = s.replace("\\$", "")  # an escaped dollar is currency, never a delimiter
    for delimiter in ("$", "\\(", "\\)", "\\[", "\\]"):
        s = s.replace(delimiter, "")
    s = _MIXED.sub(_improper, s.strip())  # before the separators: "3 1/2" is no "3" + "1/2"
    s = _THOUSANDS.sub("", s)
    return s.strip().rstrip(".").strip()


def _as_fraction(s: str) -> Fraction | None:
    """The exact value of a plain number (``-2.50``, ``007``, ``3/4``), else None."""
    if not _PLAIN_NUMBER.fullmatch(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def is_numeric_answer(answer: str) -> bool:
    """Whether an answer is one plain number, as the reward reads it: an integer, decimal, ``a/b``
    or integer ``\\frac{a}{b}``, with an optional sign, thousands separators, ``$`` and a
    trailing ``%``. Anything else (``x+1``, ``\\sqrt{2}``, ``72 dollars``, words) is graded by
    math-verify's parsing alone; a task whose golds should all be numbers can warn on those.

    >>> [is_numeric_answer(s) for s in ("72", "-1,234.5", "$3/4$", r"\\frac{1}{2}", "50%")]
    [True, True, True, True, True]
    >>> [is_numeric_answer(s) for s in ("x+1", r"\\sqrt{2}", "seven", "1, 2", "")]
    [False, False, False, False, False]
    """
    s = _normalise(answer).removesuffix("\\%").removesuffix("%").strip()
    return bool(s) and _NUMBER.fullmatch(s) is not None


def _exact_verdict(pred_s: str, gold_s: str, *, unequal: bool = True) -> bool | None:
    """The verdict on two normalised answers when exact arithmetic provably gives math-verify's,
    else None (ask math-verify).

    Equal plain numbers match. Two integers that differ (each below ``_EXACT_INTEGER_BOUND``,
    in any plain spelling: ``12``, ``12.0``, ``24/2``) do not: math-verify compares integers
    exactly, and a decimal one as a 15-digit float rounded to 6 places, which keeps every digit
    of a 12-digit integer. Anything else defers, e.g. 0.333333 vs 1/3, which math-verify accepts.
    ``unequal=False`` sends unequal integers to math-verify too (the behaviour before issue 12).

    >>> _exact_verdict("1234", "1234.0"), _exact_verdict("12", "13"), _exact_verdict("12.0", "24/2")
    (True, False, True)
    >>> _exact_verdict("0.333333", "1/3") is None, _exact_verdict("12.5", "13") is None
    (True, True)
    """
    pred_value, gold_value = _as_fraction(pred_s), _as_fraction(gold_s)
    if pred_value is None or gold_value is None:
        return None
    if pred_value == gold_value:
        return True
    values = (pred_value, gold_value)
    integers = (v.denominator == 1 and abs(v) < _EXACT_INTEGER_BOUND for v in values)
    return False if unequal and all(integers) else None


def _as_latex(s: str) -> str:
    """A normalised answer as the ``$...$`` string math-verify parses, words put in ``\\text{}``."""
    return "$" + _WORD.sub(r"\\text{\g<0>}", s) + "$"


def _math_verify_match(pred_latex: str, gold_latex: str) -> bool:
    """math-verify on two ``$...$`` strings, its own signal-based timeouts off."""
    from math_verify import parse, verify  # lazy: sympy and friends cost ~0.3 s to import

    # We bound time ourselves (see module docstring); silence its per-call "timeout disabled" warning.
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    gold_parsed = parse(gold_latex, parsing_timeout=None)
    pred_parsed = parse(pred_latex, parsing_timeout=None)
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _call_with_deadline(fn: Callable[..., bool], *args: str, timeout_s: float) -> bool:
    """``fn(*args)`` in a fresh daemon thread; raises TimeoutError after ``timeout_s``.

    Not a shared ThreadPoolExecutor: its workers are joined at interpreter exit (so one
    runaway sympy call would hang shutdown), and a few stuck workers would starve the pool
    until every later check timed out and scored 0. A thread cannot be killed, so a runaway
    check keeps burning CPU in the background; it no longer blocks anyone.
    """
    future: Future[bool] = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # handed to the waiting caller, which decides
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True, name="kdrl-math-verify").start()
    return future.result(timeout=timeout_s)


def _quick_verdict(pred: str | None, gold: str) -> bool | None:
    """``answers_match`` without math-verify: the verdict, or None when math-verify must decide."""
    if pred is None:
        return False
    pred_s, gold_s = _normalise(pred), _normalise(gold)
    if not pred_s or not gold_s:
        return False
    return _exact_verdict(pred_s, gold_s, unequal=_FAST_PATH)


def answers_match(pred: str | None, gold: str, *, timeout_s: float = 5.0) -> bool:
    """Whether a predicted answer equals the gold one, mathematically.

    False for a missing answer, a check slower than ``timeout_s`` or any math-verify error:
    a reward that cannot be established is not earned. Plain numbers are settled exactly where
    that provably agrees with math-verify (see ``_exact_verdict``).

    >>> answers_match("1,234", "1234"), answers_match("2.50", "2.5")
    (True, True)
    >>> answers_match(r"\\frac{1}{2}", "0.5"), answers_match("72 dollars", "72")
    (True, True)
    >>> answers_match("73", "72"), answers_match(None, "72")
    (False, False)
    """
    verdict = _quick_verdict(pred, gold)
    if verdict is not None:
        return verdict  # no thread, no parse: most answers to numeric tasks end here
    try:
        latex = _as_latex(_normalise(pred or "")), _as_latex(_normalise(gold))
        return _call_with_deadline(_math_verify_match, *latex, timeout_s=timeout_s)
    except FutureTimeout:
        return False
    except Exception:  # sympy and the LaTeX parser raise many kinds; each means "unverified"
        return False


def score_response(
    text: str,
    gold: str,
    *,
    finish_reason: str,
    mode: ExtractMode = "auto",
    thinking: ThinkingMode = "strip",
    timeout_s: float = 5.0,
) -> tuple[str | None, float]:
    """(extracted answer, reward in {0.0, 1.0}) for one response; truncated ones score 0.0.

    The answer is still extracted from a truncated response, for logging.

    >>> score_response("3 * 24 = 72\\n#### 72", "72", finish_reason="stop")
    ('72', 1.0)
    >>> score_response("3 * 24 = 72\\n#### 72", "72", finish_reason="length")
    ('72', 0.0)
    """
    answer = extract_answer(text, mode=mode, thinking=thinking)
    if finish_reason == "length":
        return answer, 0.0
    return answer, float(answers_match(answer, gold, timeout_s=timeout_s))


def score_batch(
    texts: list[str],
    golds: list[str],
    finish_reasons: list[str],
    *,
    mode: ExtractMode = "auto",
    thinking: ThinkingMode = "strip",
    timeout_s: float = 5.0,
    max_workers: int = 4,
) -> list[tuple[str | None, float]]:
    """``score_response`` over a batch, in input order: the rows exact arithmetic settles inline,
    the rest through math-verify ``max_workers`` at a time.

    Safe from any thread: nothing here uses signals. Each math-verify check has its own
    ``timeout_s``, so a batch takes at most about ``len(texts) / max_workers * timeout_s``.

    >>> score_batch(["#### 72", r"\\boxed{0.5}", "#### 7"], ["72", "1/2", "8"], ["stop"] * 3)
    [('72', 1.0), ('0.5', 1.0), ('7', 0.0)]
    """
    if not len(texts) == len(golds) == len(finish_reasons):
        raise ValueError(
            f"texts, golds and finish_reasons differ in length: "
            f"{len(texts)}, {len(golds)}, {len(finish_reasons)}"
        )

    answers = [extract_answer(text, mode=mode, thinking=thinking) for text in texts]
    verdicts = [
        False if finish == "length" else _quick_verdict(answer, gold)
        for answer, gold, finish in zip(answers, golds, finish_reasons)
    ]
    slow = [i for i, verdict in enumerate(verdicts) if verdict is None]
    if slow:
        # math-verify holds the GIL, so workers buy no speed; they bound the wall time of a batch
        # of timeouts. They only wait (every wait is bounded), so a per-call pool never wedges.
        def check(i: int) -> bool:
            return answers_match(answers[i], golds[i], timeout_s=timeout_s)

        with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kdrl-score") as pool:
            for i, verdict in zip(slow, pool.map(check, slow)):
                verdicts[i] = verdict
    return [(answer, float(bool(verdict))) for answer, verdict in zip(answers, verdicts)]
