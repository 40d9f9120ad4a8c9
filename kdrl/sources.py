"""Generated prompt sources: procedural task generators as `datasets` sources, offline.

    data:
      source: "reasoning-gym:gsm_symbolic"   # any reasoning_gym task name after the colon

``reasoning-gym:<task>`` builds ``reasoning_gym.create_dataset(<task>, size, seed=data.seed)``
rows as a `datasets.Dataset`: ``question``, ``answer`` (the task's answer as text: the number for
gsm_symbolic) and, when the task gives one, ``answer_cot`` (the worked answer, ending in ``#### N``
for gsm_symbolic; usable as data.answer_field). gsm_symbolic is GSM8K-style school maths from
templates (Apple's GSM-Symbolic), every question ending in "Give the result as your final answer.
Do not include units."

Rows are a pure function of (task, seed, row index): a generator's row i does not depend on how
many rows are made, so `build_prompts` takes them in order like the embedded task's (no shuffle),
the held-out rows come first and growing data.num_train never moves them. A margin of extra rows
stands in for the ones dropped as duplicates (~0.5% for gsm_symbolic) or as too long.
"""

from __future__ import annotations

import difflib
import importlib.util
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

    from kdrl.config import DataConfig

REASONING_GYM = "reasoning-gym:"
"""data.source prefix of reasoning_gym tasks."""

INSTALL_REASONING_GYM = "pip install reasoning-gym"


def is_generated(source: str) -> bool:
    """Whether data.source names a generator of this module (its rows are seeded and in order).

    >>> is_generated("reasoning-gym:gsm_symbolic"), is_generated("openai/gsm8k")
    (True, False)
    """
    return source.startswith(REASONING_GYM)


def rows_to_make(num_rows: int) -> int:
    """Rows generated for `num_rows` usable ones: 10% more (at least 16) for the duplicates and
    over-long prompts `build_prompts` drops.

    >>> rows_to_make(100), rows_to_make(2200)
    (116, 2420)
    """
    return num_rows + max(16, num_rows // 10)


def reasoning_gym_task(source: str) -> str:
    """The task name of a "reasoning-gym:<task>" source, checked against reasoning_gym's registry
    (did-you-mean on a typo); a missing package is refused with the command that installs it."""
    from kdrl.data import DatasetError

    task = source[len(REASONING_GYM):].strip()
    if importlib.util.find_spec("reasoning_gym") is None:
        raise DatasetError(f"data.source {source!r} needs the reasoning_gym package, which is not installed: "
                           f"{INSTALL_REASONING_GYM}")
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        close = difflib.get_close_matches(task, sorted(DATASETS), n=1, cutoff=0.6)
        hint = (f"did you mean {REASONING_GYM}{close[0]}?" if close else
                f"e.g. {REASONING_GYM}gsm_symbolic; the {len(DATASETS)} tasks are in reasoning_gym.factory.DATASETS")
        raise DatasetError(f"data.source {source!r}: reasoning_gym has no task {task!r}; {hint}")
    return task


def reasoning_gym_rows(task: str, *, size: int, seed: int) -> datasets.Dataset:
    """`size` rows of reasoning_gym task `task` with `seed`: question, answer, and answer_cot
    where the task's metadata has a worked answer.

    >>> ds = reasoning_gym_rows("gsm_symbolic", size=2, seed=0)
    >>> ds.column_names
    ['question', 'answer', 'answer_cot']
    """
    import datasets
    import reasoning_gym

    items = list(reasoning_gym.create_dataset(task, size=size, seed=seed))
    rows: dict[str, list] = {
        "question": [item["question"] for item in items],
        "answer": [None if item.get("answer") is None else str(item["answer"]) for item in items],
    }
    cots = [item.get("metadata", {}).get("answer_cot") for item in items]
    if any(isinstance(cot, str) for cot in cots):
        rows["answer_cot"] = [cot if isinstance(cot, str) else None for cot in cots]
    return datasets.Dataset.from_dict(rows)


def load_generated(cfg: DataConfig) -> datasets.Dataset:
    """The rows of a generated data.source, enough for data.num_train + data.num_heldout.
    Python's global `random` is left as it was: `import reasoning_gym` draws from it (the first
    time in a process), and a run's checkpoints store its state, which must not depend on
    whether the package was imported before."""
    state = random.getstate()
    try:
        task = reasoning_gym_task(cfg.source)
        return reasoning_gym_rows(task, size=rows_to_make(cfg.num_train + cfg.num_heldout), seed=cfg.seed)
    finally:
        random.setstate(state)
