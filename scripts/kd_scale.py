"""How large is the β·KD gradient next to the GRPO gradient in a run? (docs/experiments.md)

For each chosen iteration of a finished KDRL run, replays its update three times from the
persisted inputs (`kdrl.replay.replay_update`): as trained, with only the GRPO term
(loss.beta_init=0, beta_min=0) and with only the KD term (loss.pg_coef=0), and prints the
pre-clip gradient norms, their ratio, and the share of prompt groups whose rewards are all equal
(zero advantage: there only KD acts).

    python scripts/kd_scale.py runs/compare-c60af476/kdrl-s0 --iters 0,20,40

The iterations must follow a checkpoint (0, or k with a checkpoint at k-1). Replays go to a
temporary folder and are deleted.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import polars as pl

from kdrl.replay import replay_update
from kdrl.storage import RunPaths, read_table


def grad_norm(source: Path, step: int, overrides: list[str], scratch: Path, tag: str) -> float:
    dest = replay_update(source, step, overrides, dest_dir=scratch / f"{tag}-{step}", log=lambda _: None)
    return read_table(RunPaths(dest).metrics(step), table="step_metrics")["grad_norm"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--iters", default="0")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for step in [int(x) for x in args.iters.split(",")]:
            rewards = read_table(RunPaths(args.run).rewards(step), table="rewards")
            flat = rewards.group_by("prompt_id").agg(pl.col("reward").n_unique() == 1)["reward"].mean()
            metrics = read_table(RunPaths(args.run).metrics(step), table="step_metrics").row(0, named=True)
            full = grad_norm(args.run, step, [], Path(scratch), "full")
            pg = grad_norm(args.run, step, ["loss.beta_init=0", "loss.beta_min=0"], Path(scratch), "pg")
            kd = grad_norm(args.run, step, ["loss.pg_coef=0"], Path(scratch), "kd")
            rows.append({"step": step, "beta": metrics["beta"], "kl_k1_mean": metrics["kl_k1_mean"],
                         "flat_groups": flat, "grad_full": full, "grad_pg_only": pg, "grad_kd_only": kd,
                         "kd_over_pg": kd / pg if pg else float("inf")})
    with pl.Config(tbl_cols=-1, tbl_width_chars=200, float_precision=4):
        print(pl.DataFrame(rows))


if __name__ == "__main__":
    main()
