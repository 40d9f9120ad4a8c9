"""Rule-based rewards for math answers: binary correctness, checked with math-verify.

Variant: r = 1.0 when the final answer extracted from a response is mathematically equal to the
gold answer, else 0.0. No format reward, no partial credit. A truncated response
(``finish_reason == "length"``) scores 0.0 even when the answer in it is right: it never finished,
and rewarding it would teach the policy that running out of tokens is fine (DAPO's "overlong"
problem, handled here in its simplest form).

Extraction takes the GSM8K ``#### answer`` line, else the last ``\\boxed{...}``, else the last
number. Equality is tried cheaply first (both sides plain numbers with the same exact value),
then with math-verify (``verify(parse(gold), parse(pred))``).

math-verify bounds its own time with ``signal.alarm``, which only works on the main thread:
anywhere else (Ray workers, thread pools) it raises, the error is swallowed and every reward
silently becomes 0. So its timeouts are switched off here and each check runs in a daemon
thread that the caller waits on for at most ``timeout_s``.
"""

from __future__ import annotations

import logging
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from fractions import Fraction
from typing import Callable, Literal

ExtractMode = Literal["auto", "hash", "boxed", "last_number"]

# A sign counts as a minus only where it cannot be subtraction ("10-3" ends in 3, not -3).
# Integer \frac{a}{b} is a number too, so "$-\frac{1}{2}$" without a box still yields -1/2.
_NUMBER = re.compile(
    r"(?P<sign>(?<![\w)\]}])[-−])?"
    r"(?:\\[dt]?frac\{(?P<frac_num>[0-9]+)\}\{(?P<frac_den>[0-9]+)\}"
    r"|(?P<num>(?:[0-9]{1,3}(?:(?:,|\{,\}|\\,)[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?|\.[0-9]+)"
    r"(?:/(?P<den>[0-9]+(?:\.[0-9]+)?))?)"
)
_BOXED = re.compile(r"\\boxed\s*\{")
# 1,234 / 1{,}234 / 1\,234 / 1\ 234: thousands separators. math-verify reads 1\,234 as 235.
_THOUSANDS = re.compile(r"(?<=[0-9])(?:,|\{,\}|\\,|\\ )(?=[0-9]{3}(?![0-9]))")
# Plain words ("72 dollars") parse as products of symbols inside $...$ unless put in \text{}.
_WORD = re.compile(r"(?<![\\{A-Za-z])[A-Za-z]{2,}(?![A-Za-z])")
_PLAIN_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:/[0-9]+)?")


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


def _extract_last_number(text: str) -> str | None:
    """The last number, as ``-1234.5`` or ``3/4``: commas dropped, a unicode minus made ASCII."""
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    sign = "-" if m["sign"] else ""
    if m["frac_num"] is not None:
        return f"{sign}{m['frac_num']}/{m['frac_den']}"
    den = f"/{m['den']}" if m["den"] else ""
    return f"{sign}{_THOUSANDS.sub('', m['num'])}{den}"


_EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "hash": _extract_hash,
    "boxed": _extract_boxed,
    "last_number": _extract_last_number,
}


def extract_answer(text: str, *, mode: ExtractMode = "auto") -> str | None:
    """The final answer in a response, or None when there is none.

    ``hash``: after the last ``####``; ``boxed``: the last ``\\boxed{}``; ``last_number``: the
    last number (commas, negatives, decimals, ``a/b`` and integer ``\\frac{a}{b}``);
    ``auto``: the first of those three that finds something.

    >>> extract_answer("She pays 3 * 24 = 72 dollars.\\n#### 72")
    '72'
    >>> extract_answer(r"So $x = \\boxed{\\frac{1}{2}}$.", mode="boxed")
    '\\\\frac{1}{2}'
    >>> extract_answer("From 1,000 we get -1,234.5 in the end.", mode="last_number")
    '-1234.5'
    >>> extract_answer("no digits here") is None
    True
    """
    if mode == "auto":
        for extract in _EXTRACTORS.values():
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


def _normalise(answer: str) -> str:
    """One answer as bare LaTeX, without delimiters, currency or thousands separators."""
    s = answer.strip().replace("−", "-")
    s = s.replace("\\$", "")  # an escaped dollar is currency, never a delimiter
    for delimiter in ("$", "\\(", "\\)", "\\[", "\\]"):
        s = s.replace(delimiter, "")
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


def answers_match(pred: str | None, gold: str, *, timeout_s: float = 5.0) -> bool:
    """Whether a predicted answer equals the gold one, mathematically.

    False for a missing answer, a check slower than ``timeout_s`` or any math-verify error:
    a reward that cannot be established is not earned.

    >>> answers_match("1,234", "1234"), answers_match("2.50", "2.5")
    (True, True)
    >>> answers_match(r"\\frac{1}{2}", "0.5"), answers_match("72 dollars", "72")
    (True, True)
    >>> answers_match("73", "72"), answers_match(None, "72")
    (False, False)
    """
    if pred is None:
        return False
    pred_s, gold_s = _normalise(pred), _normalise(gold)
    if not pred_s or not gold_s:
        return False
    pred_value, gold_value = _as_fraction(pred_s), _as_fraction(gold_s)
    if pred_value is not None and pred_value == gold_value:
        return True  # exact, and no thread or parse; most right GSM8K answers end here
    pred_latex = "$" + _WORD.sub(r"\\text{\g<0>}", pred_s) + "$"
    gold_latex = "$" + _WORD.sub(r"\\text{\g<0>}", gold_s) + "$"
    try:
        return _call_with_deadline(_math_verify_match, pred_latex, gold_latex, timeout_s=timeout_s)
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
    timeout_s: float = 5.0,
) -> tuple[str | None, float]:
    """(extracted answer, reward in {0.0, 1.0}) for one response; truncated ones score 0.0.

    The answer is still extracted from a truncated response, for logging.

    >>> score_response("3 * 24 = 72\\n#### 72", "72", finish_reason="stop")
    ('72', 1.0)
    >>> score_response("3 * 24 = 72\\n#### 72", "72", finish_reason="length")
    ('72', 0.0)
    """
    answer = extract_answer(text, mode=mode)
    if finish_reason == "length":
        return answer, 0.0
    return answer, float(answers_match(answer, gold, timeout_s=timeout_s))


def score_batch(
    texts: list[str],
    golds: list[str],
    finish_reasons: list[str],
    *,
    mode: ExtractMode = "auto",
    timeout_s: float = 5.0,
    max_workers: int = 4,
) -> list[tuple[str | None, float]]:
    """``score_response`` over a batch, ``max_workers`` at a time, in input order.

    Safe from any thread: nothing here uses signals. Each response's check has its own
    ``timeout_s``, so a batch takes at most about ``len(texts) / max_workers * timeout_s``.

    >>> score_batch(["#### 72", r"\\boxed{0.5}", "#### 7"], ["72", "1/2", "8"], ["stop"] * 3)
    [('72', 1.0), ('0.5', 1.0), ('7', 0.0)]
    """
    if not len(texts) == len(golds) == len(finish_reasons):
        raise ValueError(
            f"texts, golds and finish_reasons differ in length: "
            f"{len(texts)}, {len(golds)}, {len(finish_reasons)}"
        )

    def score(i: int) -> tuple[str | None, float]:
        return score_response(
            texts[i], golds[i], finish_reason=finish_reasons[i], mode=mode, timeout_s=timeout_s
        )

    # Workers here only extract and wait (every wait is bounded), so a per-call pool never
    # wedges; the math-verify work itself runs in the daemon threads of answers_match.
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kdrl-score") as pool:
        return list(pool.map(score, range(len(texts))))
