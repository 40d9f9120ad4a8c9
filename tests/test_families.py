"""The built-in task families (kdrl/families.py): worked answers, generators, splits."""

from __future__ import annotations

import random
import re

import polars as pl
import pytest

from kdrl.config import load_config
from kdrl.data import build_prompts
from kdrl.families import FAMILIES, column_sum, embedded_arithmetic, family
from kdrl.models import build_char_tokenizer
from kdrl.rewards import reference_answer, score_batch

CHAIN = ["data.source=embedded:chain", "data.max_digits=2", "data.num_train=300", "data.num_heldout=40"]


def _check_worked(operands: list[int], worked: str) -> int:
    """Check every step of a worked answer by hand: column c's step adds the operands' c-th digits
    and the carry, and may be followed by the same sum in reverse order (a re-check). Returns the
    number of re-checks (a coincidence that reads both ways counts as one)."""
    *steps, final = worked.split(";")
    assert final == f"#### {sum(operands)}"
    width = max(len(str(x)) for x in operands)

    def parse(i: int, column: int, carry: int) -> int | None:
        if column == width:
            return 0 if i == len(steps) else None
        digits = [int(str(x)[::-1][column]) if column < len(str(x)) else 0 for x in operands]
        terms = digits + ([carry] if carry else [])
        total = sum(terms)
        if i >= len(steps) or steps[i] != "+".join(map(str, terms)) + f"={total}":
            return None
        if i + 1 < len(steps) and steps[i + 1] == "+".join(map(str, reversed(terms))) + f"={total}":
            rest = parse(i + 2, column + 1, total // 10)
            if rest is not None:
                return rest + 1
        return parse(i + 1, column + 1, total // 10)

    rechecks = parse(0, 0, 0)
    assert rechecks is not None, worked
    return rechecks


def test_column_sum_is_right_step_by_step_for_random_operands():
    rng = random.Random(0)
    for _ in range(500):
        operands = [rng.randint(0, 10 ** rng.randint(1, 4)) for _ in range(rng.randint(2, 5))]
        checked = [rng.random() < 0.5 for _ in range(6)]
        worked = column_sum(operands, recheck=lambda column: checked[column])
        assert _check_worked(operands, worked) >= sum(checked[: max(len(str(x)) for x in operands)])
        assert len(worked.split(";")) == max(len(str(x)) for x in operands) + sum(
            checked[: max(len(str(x)) for x in operands)]) + 1
        assert reference_answer(worked) == str(sum(operands))


def test_addition_is_the_embedded_task_it_always_was():
    # the generator as it was before the families existed (kdrl 0.x): same rows, same order
    def old(n, seed, lo=1, hi=3):
        rng, seen, rows = random.Random(seed), set(), []
        while len(rows) < n:
            a, b = (rng.randint(10 ** (d - 1), 10**d - 1) for d in (rng.randint(lo, hi) for _ in "ab"))
            if (a, b) not in seen:
                seen.add((a, b))
                rows.append(f"{a}+{b}=")
        return rows

    assert embedded_arithmetic(300, seed=1234)["question"] == old(300, 1234)
    cfg = load_config(None, [])
    assert family("embedded").problems(50, cfg.data)["question"] == old(50, cfg.data.seed)
    assert not family("embedded:addition").has_ood


def test_chain_problems_are_seeded_prefix_stable_and_re_check_half_the_columns():
    cfg = load_config(None, CHAIN).data
    chain = family("embedded:chain")
    many = chain.problems(2000, cfg)
    assert many["question"][:100] == chain.problems(100, cfg)["question"]  # row i depends on (seed, i) only
    assert len(set(many["question"])) == 2000
    rechecks = columns = 0
    lengths = []
    for question, worked in zip(many["question"], many["answer"]):
        operands = [int(x) for x in question.rstrip("=").split("+")]
        lengths.append(len(operands))
        assert len(operands) in (2, 4) and all(1 <= x <= 99 for x in operands)
        assert worked == chain.worked(question, cfg)  # what the models are warm-started on
        rechecks += _check_worked(operands, worked)
        columns += max(len(str(x)) for x in operands)
    assert 0.46 < rechecks / columns < 0.54  # each column with probability 1/2
    # chains of 2 or 4 numbers drawn half each; a repeated problem is drawn again, and short chains
    # of small numbers repeat more often, so fewer than half are kept
    assert 0.35 < lengths.count(2) / len(lengths) < 0.5
    ood = chain.problems(200, cfg, ood=True)
    for question in ood["question"]:  # the same chains with one number 0, an operand never trained on
        operands = [int(x) for x in question.rstrip("=").split("+")]
        assert len(operands) in (2, 4) and operands.count(0) == 1
    assert len(set(ood["question"])) == 200 and not set(ood["question"]) & set(many["question"])
    other_seed = chain.problems(100, cfg.model_copy(update={"seed": 7}))["question"]
    assert other_seed != many["question"][:100]


def test_chain_prompts_add_an_out_of_domain_split_after_the_others():
    tokenizer = build_char_tokenizer()
    cfg = load_config(None, CHAIN).data
    prompts = build_prompts(cfg, tokenizer)
    counts = dict(prompts.group_by("split").len().iter_rows())
    assert counts == {"heldout": 40, "train": 300, "ood": 40}
    assert prompts.filter(pl.col("split") == "ood")["prompt_id"].min() == 340  # in-domain ids as without it
    assert prompts["question"].n_unique() == prompts.height
    ood = prompts.filter(pl.col("split") == "ood")
    in_domain = prompts.filter(pl.col("split") != "ood")["question"]
    has_zero = re.compile(r"(^|\+)0(\+|=)")
    assert all(has_zero.search(q) for q in ood["question"]) and not any(has_zero.search(q) for q in in_domain)
    # the worked answers the models learn score as right against the prompts' gold answers
    worked = [family(cfg.source).worked(q, cfg) for q in prompts["question"]]
    scores = score_batch(worked, prompts["answer"].to_list(), ["stop"] * len(worked), mode="auto")
    assert all(reward == 1.0 for _, reward in scores)


def test_unknown_family_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=re.escape("known: embedded, embedded:addition, embedded:chain")):
        family("embedded:chains")
    assert set(FAMILIES) == {"addition", "chain"}
    with pytest.raises(ValueError, match="no out-of-domain split"):
        family("embedded").problems(3, load_config(None, []).data, ood=True)
