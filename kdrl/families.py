"""The built-in task families: generated problems with worked answers, offline, through `datasets`.

    data:
      source: embedded            # column addition of two numbers (the default)
      source: embedded:chain      # chains of 2 or 4 numbers, verbose worked answers, an out-of-domain split

A family makes questions and their worked answers (ending in ``#### N``) as a pure function of
(seed, row index), the embedded models are warm-started on those worked answers
(`kdrl.embedded`), and a family may define an **out-of-domain** held-out split: problems of
another shape, evaluated beside the in-domain held-out split but never trained on.

**addition** (``embedded``, ``embedded:addition``)::

    question  "47+85="
    answer    "7+5=12;4+8+1=13;#### 132"

**chain** (``embedded:chain``): the sum of a chain of two or four numbers (half each), one column
at a time, and a worked answer that re-checks a column at random (each with probability 1/2) by
adding it again in reverse order — redundant work, so that response length varies and is
something training can change. The out-of-domain split is the same chains with one number
replaced by **0**, an operand that never appears in training (numbers there are 1 to 99)::

    question  "47+85+36+2="
    answer    "7+5+6+2=20;2+6+5+7=20;4+8+3+0+2=17;#### 170"      (the first column re-checked)
    ood       "47+0+36+2="

Why this family: `docs/experiments.md` ("The chain task") — a student that rarely succeeds (most
GRPO groups all-zero), a teacher that does, out-of-domain problems for both, and a teacher whose
answers are longer than necessary.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

    from kdrl.config import DataConfig

EMBEDDED = "embedded"
"""data.source of the built-in families: "embedded" (addition) or "embedded:<family>"."""


def worked_answer(a: int, b: int) -> str:
    """The column-addition solution of a + b, ending in ``#### a+b``.

    >>> worked_answer(47, 85)
    '7+5=12;4+8+1=13;#### 132'
    >>> worked_answer(5, 3)
    '5+3=8;#### 8'
    >>> worked_answer(123, 9)
    '3+9=12;2+0+1=3;1+0=1;#### 132'
    """
    return column_sum([a, b])


def column_sum(operands: list[int], recheck: Callable[[int], bool] = lambda column: False) -> str:
    """The column-by-column sum of `operands` (right to left, the carry added last), ending in
    ``#### total``. A column for which `recheck(column)` is true is added a second time, its
    terms in reverse order: the same sum, more tokens.

    >>> column_sum([47, 85, 36])
    '7+5+6=18;4+8+3+1=16;#### 168'
    >>> column_sum([47, 85, 36], recheck=lambda column: column == 0)
    '7+5+6=18;6+5+7=18;4+8+3+1=16;#### 168'
    >>> column_sum([9, 8, 7, 40])
    '9+8+7+0=24;0+0+0+4+2=6;#### 64'
    """
    digits = [str(x)[::-1] for x in operands]
    steps, carry = [], 0
    for i in range(max(map(len, digits))):
        terms = [int(d[i]) if i < len(d) else 0 for d in digits] + ([carry] if carry else [])
        total = sum(terms)
        steps.append("+".join(map(str, terms)) + f"={total}")
        if recheck(i):
            steps.append("+".join(map(str, reversed(terms))) + f"={total}")
        carry = total // 10
    return ";".join(steps) + f";#### {sum(operands)}"


def _operands(question: str) -> list[int]:
    return [int(x) for x in question.rstrip("=").split("+")]


def _draw(n: int, *, seed: int | str, terms: int | tuple[int, ...], min_digits: int,
          max_digits: int) -> list[list[int]]:
    """`n` distinct tuples of numbers, each with a uniformly drawn number of digits in
    [min_digits, max_digits]; `terms` numbers per tuple, or a count drawn uniformly from `terms`
    for each. Row i depends only on (seed, i)."""
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    counts = (terms,) if isinstance(terms, int) else terms
    capacity = min(sum(9 * 10 ** (d - 1) for d in range(min_digits, max_digits + 1)) ** t for t in counts)
    if n > capacity // 2 * len(counts):
        raise ValueError(f"{n} distinct problems requested; {'/'.join(map(str, counts))} numbers of "
                         f"{min_digits}..{max_digits} digits support at most {capacity // 2 * len(counts)} "
                         "(half the tuples, so sampling stays fast)")
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    rows = []
    while len(rows) < n:
        count = counts[0] if len(counts) == 1 else rng.choice(counts)
        numbers = tuple(rng.randint(10 ** (d - 1), 10**d - 1)
                        for d in (rng.randint(min_digits, max_digits) for _ in range(count)))
        if numbers not in seen:
            seen.add(numbers)
            rows.append(list(numbers))
    return rows


def _draw_with_zero(n: int, *, seed: str, terms: int | tuple[int, ...], min_digits: int,
                    max_digits: int) -> list[list[int]]:
    """`n` distinct tuples drawn as `_draw` draws them, each with the number at one uniformly drawn
    position replaced by 0; row i depends only on (seed, i).

    >>> _draw_with_zero(3, seed="s", terms=(2, 4), min_digits=1, max_digits=2)
    [[3, 1, 0, 50], [0, 43, 70, 7], [5, 0]]
    """
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    rows = []
    while len(rows) < n:
        numbers = _draw(1, seed=rng.random(), terms=terms, min_digits=min_digits, max_digits=max_digits)[0]
        numbers[rng.randrange(len(numbers))] = 0
        if tuple(numbers) not in seen:
            seen.add(tuple(numbers))
            rows.append(numbers)
    return rows


def _dataset(questions: list[str], answers: list[str]) -> datasets.Dataset:
    import datasets

    return datasets.Dataset.from_dict({"question": questions, "answer": answers})


def embedded_arithmetic(n: int, *, seed: int, min_digits: int = 1, max_digits: int = 3) -> datasets.Dataset:
    """`n` distinct addition problems as a `datasets.Dataset` with question and answer columns.

    Operand lengths are drawn uniformly in [min_digits, max_digits], so responses vary in length.

    >>> ds = embedded_arithmetic(3, seed=0)
    >>> ds.column_names, len(ds)
    (['question', 'answer'], 3)
    """
    rows = _draw(n, seed=seed, terms=2, min_digits=min_digits, max_digits=max_digits)
    return _dataset([f"{a}+{b}=" for a, b in rows], [worked_answer(a, b) for a, b in rows])


@dataclass(frozen=True)
class Family:
    """A built-in task family: `problems(n, cfg, ood)` makes n rows (question, worked answer) of
    the in-domain distribution, or of the out-of-domain one (`has_ood`); `worked(question, cfg)`
    is the worked answer the embedded models are warm-started on (the same text)."""

    name: str
    terms: int | tuple[int, ...]
    """Numbers per problem (a tuple: one of them, uniformly)."""
    ood_zero: bool
    """Whether the family has an out-of-domain split: its problems with one number set to 0."""
    recheck_p: float
    """Probability that the worked answer re-checks a column."""

    @property
    def has_ood(self) -> bool:
        return self.ood_zero

    def worked(self, question: str, cfg: DataConfig) -> str:
        if not self.recheck_p:
            return column_sum(_operands(question))
        rng = random.Random(f"{cfg.seed}:{question}")  # a pure function of the question
        checks = [rng.random() < self.recheck_p for _ in range(cfg.max_digits + 2)]
        return column_sum(_operands(question), recheck=lambda column: checks[column])

    def problems(self, n: int, cfg: DataConfig, *, ood: bool = False) -> datasets.Dataset:
        if ood and not self.has_ood:
            raise ValueError(f"embedded:{self.name} has no out-of-domain split")
        # The seed of the in-domain rows of addition is data.seed itself (the default task's
        # problems are what they always were); the out-of-domain rows come from another stream.
        seed = cfg.seed if self.name == "addition" and not ood else f"{cfg.seed}-{self.name}" + "-ood" * ood
        if ood:
            rows = _draw_with_zero(n, seed=seed, terms=self.terms, min_digits=cfg.min_digits,
                                   max_digits=cfg.max_digits)
        else:
            rows = _draw(n, seed=seed, terms=self.terms, min_digits=cfg.min_digits, max_digits=cfg.max_digits)
        questions = ["+".join(map(str, numbers)) + "=" for numbers in rows]
        return _dataset(questions, [self.worked(q, cfg) for q in questions])


FAMILIES: dict[str, Family] = {
    "addition": Family("addition", terms=2, ood_zero=False, recheck_p=0.0),
    "chain": Family("chain", terms=(2, 4), ood_zero=True, recheck_p=0.5),
}


def is_embedded(source: str) -> bool:
    """Whether data.source names a built-in family.

    >>> is_embedded("embedded"), is_embedded("embedded:chain"), is_embedded("openai/gsm8k")
    (True, True, False)
    """
    return source == EMBEDDED or source.startswith(EMBEDDED + ":")


def family(source: str) -> Family:
    """The family of an embedded data.source ("embedded" is addition); an unknown name is refused
    with the known ones.

    >>> family("embedded").name, family("embedded:chain").has_ood
    ('addition', True)
    """
    name = source.partition(":")[2] or "addition"
    if not is_embedded(source) or name not in FAMILIES:
        known = ", ".join(["embedded", *(f"embedded:{n}" for n in FAMILIES)])
        raise ValueError(f"unknown embedded task {source!r}; known: {known}")
    return FAMILIES[name]
