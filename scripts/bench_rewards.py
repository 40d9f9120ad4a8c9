"""Reward scoring throughput: rows/s of `kdrl.rewards.score_batch`, before vs after issue 12.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_rewards.py [--rows 1024] [--rounds 3]
        [--correct 0.5] [--seed 0]

"before" is `score_batch` with the private switch `kdrl.rewards._FAST_PATH = False`: every wrong
plain-integer answer goes through math-verify, as at e12e02e. "after" is the default: unequal
integers are settled exactly. Both use the same extraction, so the difference is the comparison
alone.

Two workloads of `--rows` responses each, scored in batches of 128 (the embedded default's
P=16 x G=8), a `--correct` share right and the rest wrong:

- embedded: the embedded task's worked answers (`kdrl.data.worked_answer`), operands of 1-3
  digits, wrong ones with a final number off by a little or a lot, 1 in 16 cut off without
  "####" (scored as finished, by its last number);
- gsm8k: GSM8K-style worked solutions ending in "#### N", "The answer is N." or a last number
  with thousands commas; golds as `reference_answer` gives them.

The variants alternate A B A B (`--rounds` times each) in this one process so a shared
machine's drift cancels; reported are the median rows/s per variant and their ratio. The
verdicts of both variants are checked to agree. Not a test: compare only numbers of one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH = 128
NAMES = ["Ali", "Mia", "Tom", "Sara", "Ben", "Lena"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books"]


def wrong(right: int, rng: random.Random) -> int:
    """A wrong final number as a model makes them: off by one, a carry, a digit, or far."""
    off = rng.choice([1, -1, 10, -10, 100, rng.randint(2, 9), -rng.randint(2, 9),
                      rng.randint(11, 999)])
    return right + off if right + off >= 0 else right + abs(off)


Rows = tuple[list[str], list[str], list[float]]


def embedded_rows(n: int, correct: float, rng: random.Random) -> Rows:
    """(completions, golds, intended rewards) of the embedded addition task."""
    from kdrl.data import worked_answer
    from kdrl.rewards import reference_answer

    texts, golds, right = [], [], []
    for _ in range(n):
        a, b = (rng.randint(1, 10 ** rng.randint(1, 3) - 1) for _ in "ab")
        work = worked_answer(a, b)
        final = a + b if rng.random() < correct else wrong(a + b, rng)
        text = work.replace(f"#### {a + b}", f"#### {final}")
        if rng.random() < 1 / 16:
            text = text[: text.index("####")]  # cut off: the last column sum is the answer read
        texts.append(text)
        golds.append(reference_answer(work))
        right.append(float(int(re.findall(r"[0-9]+", text)[-1]) == a + b))
    return texts, golds, right


def gsm8k_rows(n: int, correct: float, rng: random.Random) -> Rows:
    """(solutions, golds, intended rewards) in GSM8K's style, three ways of ending."""
    texts, golds, right = [], [], []
    for _ in range(n):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        packs, per, price = rng.randint(2, 40), rng.randint(2, 60), rng.randint(2, 90)
        extra, cost = rng.randint(1, 500), packs * price
        answer = cost + extra if rng.random() < correct else wrong(cost + extra, rng)
        work = (f"{name} buys {packs} packs of {per} {item}, so {name} has {packs} * {per} = "
                f"{packs * per} {item}.\nThe packs cost {packs} * ${price} = ${cost}, and the "
                f"{extra} dollars of shipping make {cost} + {extra} = {cost + extra}.\n")
        ending = rng.choice([f"#### {answer}", f"The answer is {answer}.",
                             f"In total {name} pays ${answer:,}."])
        texts.append(work + ending)
        golds.append(str(cost + extra))
        right.append(float(answer == cost + extra))
    return texts, golds, right


def rows_per_s(texts: list[str], golds: list[str], *, fast: bool) -> tuple[float, list[float]]:
    """Score all rows in batches of BATCH, with the fast path or without; (rows/s, rewards)."""
    from kdrl import rewards as kdrl_rewards

    rewards: list[float] = []
    kdrl_rewards._FAST_PATH = fast  # not public API: the switch exists for this comparison
    try:
        start = time.perf_counter()
        for i in range(0, len(texts), BATCH):
            chunk = slice(i, i + BATCH)
            finish_reasons = ["stop"] * len(texts[chunk])
            scored = kdrl_rewards.score_batch(texts[chunk], golds[chunk], finish_reasons)
            rewards += [reward for _, reward in scored]
        elapsed = time.perf_counter() - start
    finally:
        kdrl_rewards._FAST_PATH = True
    return len(texts) / elapsed, rewards


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1024, help="responses per workload")
    parser.add_argument("--rounds", type=int, default=3, help="A B pairs per workload")
    parser.add_argument("--correct", type=float, default=0.5, help="share of right answers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    workloads = {"embedded": embedded_rows(args.rows, args.correct, rng),
                 "gsm8k": gsm8k_rows(args.rows, args.correct, rng)}
    rows_per_s(*workloads["gsm8k"][:2], fast=False)  # warm-up: math-verify's import and first parse

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={threads}, python {platform.python_version()}")
    print(f"# {args.rows} rows per workload in batches of {BATCH}, {args.correct:.0%} right, "
          f"{args.rounds} rounds of A (before, _FAST_PATH=False) B (after, the default)\n")
    print("| workload | before rows/s | after rows/s | after / before | before ms/row "
          "| after ms/row | reward mean |")
    print("|---|---|---|---|---|---|---|")
    for name, (texts, golds, right) in workloads.items():
        speeds: dict[bool, list[float]] = {False: [], True: []}
        verdicts: dict[bool, list[float]] = {}
        for _ in range(args.rounds):
            for fast in (False, True):
                speed, verdicts[fast] = rows_per_s(texts, golds, fast=fast)
                speeds[fast].append(speed)
        if not verdicts[False] == verdicts[True] == right:
            raise SystemExit(f"{name}: a reward differs between the paths or from the intended one")
        before, after = statistics.median(speeds[False]), statistics.median(speeds[True])
        print(f"| {name} | {before:,.0f} | {after:,.0f} | {after / before:.1f}x "
              f"| {1e3 / before:.3f} | {1e3 / after:.4f} | {statistics.mean(verdicts[True]):.3f} |")


if __name__ == "__main__":
    main()
