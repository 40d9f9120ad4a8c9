"""Prompt sets: the embedded arithmetic task, or any `datasets` source with question/answer columns.

The embedded task is column addition with a worked answer that ends in ``#### N`` — reasoning
a tiny model can learn, with responses whose length grows with the number of digits:

    question  "47+85="
    answer    "7+5=12;4+8+1=13;#### 132"

Each step adds one column (right to left) plus the carry; the final line reads the answer off the
column sums. A student that skips or botches a step gets the answer wrong, so the reward is
sparse for a weak student and dense for a trained teacher (the regime KDRL is for).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

from kdrl.config import DataConfig

if TYPE_CHECKING:
    import datasets
    import polars as pl


def worked_answer(a: int, b: int) -> str:
    """The column-addition solution of a + b, ending in ``#### a+b``.

    >>> worked_answer(47, 85)
    '7+5=12;4+8+1=13;#### 132'
    >>> worked_answer(5, 3)
    '5+3=8;#### 8'
    >>> worked_answer(123, 9)
    '3+9=12;2+0+1=3;1+0=1;#### 132'
    """
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total}" if carry else f"{x}+{y}={total}")
        carry = total // 10
    return ";".join(steps) + f";#### {a + b}"


def embedded_arithmetic(n: int, *, seed: int, min_digits: int = 1, max_digits: int = 3) -> datasets.Dataset:
    """`n` distinct addition problems as a `datasets.Dataset` with question and answer columns.

    Operand lengths are drawn uniformly in [min_digits, max_digits], so responses vary in length.

    >>> ds = embedded_arithmetic(3, seed=0)
    >>> ds.column_names, len(ds)
    (['question', 'answer'], 3)
    """
    import datasets

    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    capacity = sum(9 * 10 ** (d - 1) for d in range(min_digits, max_digits + 1)) ** 2
    if n > capacity // 2:
        raise ValueError(f"{n} distinct problems requested; digits {min_digits}..{max_digits} support at most {capacity // 2} (half the {capacity} pairs, so sampling stays fast)")
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    rows: dict[str, list[str]] = {"question": [], "answer": []}
    while len(seen) < n:
        a, b = (rng.randint(10 ** (d - 1), 10**d - 1) for d in (rng.randint(min_digits, max_digits) for _ in "ab"))
        if (a, b) in seen:
            continue
        seen.add((a, b))
        rows["question"].append(f"{a}+{b}=")
        rows["answer"].append(worked_answer(a, b))
    return datasets.Dataset.from_dict(rows)


def load_source(cfg: DataConfig) -> datasets.Dataset:
    """The raw dataset: the embedded generator, local files (json/jsonl/csv/parquet, a file or a
    folder of them), or a Hugging Face hub name. Checks the configured columns exist."""
    import datasets

    if cfg.source == "embedded":
        ds = embedded_arithmetic(cfg.num_train + cfg.num_heldout, seed=cfg.seed,
                                 min_digits=cfg.min_digits, max_digits=cfg.max_digits)
        return ds
    path = Path(cfg.source)
    if path.is_file():
        kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
        if kind is None:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r} (json, jsonl, csv, parquet)")
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    else:  # a local dataset folder or a hub name
        ds = datasets.load_dataset(cfg.source, split=cfg.split)
    for field in (cfg.question_field, cfg.answer_field):
        if field not in ds.column_names:
            raise ValueError(f"{cfg.source}: no column {field!r} (data.question_field/answer_field); columns are {ds.column_names}")
    return ds


def build_prompts(cfg: DataConfig, tokenizer, *, ds: datasets.Dataset | None = None) -> pl.DataFrame:
    """The PROMPTS table: a seeded, disjoint train/held-out split, templated and tokenized.

    Held-out rows come first in the shuffled order so that growing num_train never moves a
    held-out prompt into training. Rows whose question or answer is empty are refused by id.
    `ds` is `load_source(cfg)` when already loaded.
    """
    import polars as pl

    from kdrl.rewards import reference_answer

    ds = load_source(cfg) if ds is None else ds
    need = cfg.num_train + cfg.num_heldout
    if len(ds) < need:
        raise ValueError(f"{cfg.source}: {len(ds)} rows, but num_train + num_heldout = {need}")
    order = list(range(len(ds)))
    if cfg.source != "embedded":
        # Not the generator's rows: they are seeded-random already and a larger num_train only
        # appends to them, whereas shuffling a longer list would move every held-out prompt.
        random.Random(cfg.seed).shuffle(order)
    questions, answers, splits = [], [], []
    for rank, row_index in enumerate(order[:need]):
        row = ds[row_index]
        question, answer = row[cfg.question_field], row[cfg.answer_field]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{cfg.source}: row {row_index}: empty or non-text {cfg.question_field!r}")
        gold = reference_answer(str(answer)) if answer is not None else ""
        if not gold:
            raise ValueError(f"{cfg.source}: row {row_index}: no reference answer in {cfg.answer_field!r}")
        questions.append(question)
        answers.append(gold)
        splits.append("heldout" if rank < cfg.num_heldout else "train")
    texts = [cfg.prompt_template.format(question=q) for q in questions]
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return pl.DataFrame(
        {
            "prompt_id": list(range(need)),
            "split": splits,
            "question": questions,
            "answer": answers,
            "prompt_text": texts,
            "prompt_token_ids": ids,
        },
        schema_overrides={"prompt_token_ids": pl.List(pl.Int32)},
    )


def sample_prompt_ids(train_ids: list[int], *, step: int, count: int, seed: int) -> list[int]:
    """The `count` distinct prompts of optimizer step `step`: epochs of seeded shuffles, cut into
    steps with the remainder of each epoch dropped (so a step never straddles two epochs and never
    repeats a prompt). A pure function of (seed, step): any iteration can be replayed alone.

    >>> sample_prompt_ids([10, 11, 12, 13], step=0, count=2, seed=0) != sample_prompt_ids([10, 11, 12, 13], step=1, count=2, seed=0)
    True
    >>> sorted(sample_prompt_ids([10, 11, 12, 13], step=0, count=2, seed=0) + sample_prompt_ids([10, 11, 12, 13], step=1, count=2, seed=0))
    [10, 11, 12, 13]
    """
    n = len(train_ids)
    if not 0 < count <= n:
        raise ValueError(f"prompts_per_step={count} must be in 1..{n} (the number of training prompts)")
    steps_per_epoch = n // count
    epoch, index = divmod(step, steps_per_epoch)
    order = list(train_ids)
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return order[index * count : (index + 1) * count]
