"""What length-grouped micro-batches save in the embedded warm start (kdrl/embedded.py).

    .venv/bin/python scripts/bench_warm_start.py [--role teacher] [--reps 6] [--steps 4] [--threads 0]

Times SFT steps of the embedded model (random init; speed does not depend on the weights) on
the default batch: A = one batch padded to its longest row, B = the same rows as
`embedded.LENGTH_GROUPS` length-sorted micro-batches (what the warm start does). Each repetition
runs `--steps` steps of A then of B on the same sampled batches (A B A B ...), so slow drift of a
shared machine falls on both; it prints the B/A time ratio of every repetition and their median,
and the padded tokens each computes. Not a test: compare only numbers taken in one run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from kdrl import embedded as E
from kdrl.config import load_config
from kdrl.models import build_char_tokenizer, build_tiny_llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=sorted(E.ROLES), default="teacher")
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(None, [])
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(tokenizer, seed=0, **E.ROLES[args.role]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pairs = E._training_pairs(cfg, tokenizer)
    rng = random.Random(0)
    batches = [rng.sample(pairs, cfg.embedded.batch_size) for _ in range(args.steps)]

    def run(groups: int) -> tuple[float, int]:
        padded = 0
        start = time.perf_counter()
        for batch in batches:
            tokens = sum(len(c) for _, c in batch)
            optimizer.zero_grad(set_to_none=True)
            for group in E.length_groups(batch, groups):
                ids, mask, labels = E._padded(group, tokenizer.pad_token_id)
                padded += ids.numel()
                model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=tokens).loss.backward()
            optimizer.step()
        return time.perf_counter() - start, padded

    run(1), run(E.LENGTH_GROUPS)  # warm-up
    ratios = []
    for rep in range(args.reps):
        a, padded_a = run(1)
        b, padded_b = run(E.LENGTH_GROUPS)
        ratios.append(b / a)
        print(f"rep {rep}: one batch {a / args.steps:.3f} s/step, {E.LENGTH_GROUPS} length groups "
              f"{b / args.steps:.3f} s/step, ratio {b / a:.3f}", flush=True)
    real = sum(len(p) + len(c) for batch in batches for p, c in batch)
    print(f"\n{args.role}, batch {cfg.embedded.batch_size}, torch threads {torch.get_num_threads()}: "
          f"{E.LENGTH_GROUPS} length groups / one batch = {statistics.median(ratios):.3f} (median of {args.reps}); "
          f"padded tokens per step {padded_a // args.steps} → {padded_b // args.steps} (real {real // args.steps})")


if __name__ == "__main__":
    main()
