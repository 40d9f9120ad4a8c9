"""Time one KDRL training step on the embedded tiny models, split into stages.

    .venv/bin/python scripts/bench_step.py [--steps 10] [--set key=value ...]

Runs a short training run (the embedded models are trained/cached on first use) and reports the
median per-stage seconds from its metrics.parquet, skipping step 0 (warm-up). Not a test: the
machines are shared and noisy; compare numbers measured in one run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    import polars as pl

    from kdrl.config import load_config
    from flows.train import train_without_prefect

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(overrides=[f"run.steps={args.steps}", "run.eval_every=0", f"run.runs_dir={tmp}",
                                     *args.overrides])
        train_without_prefect(cfg, Path(tmp) / "bench")
        metrics = pl.read_parquet(str(Path(tmp) / "bench" / "iter_*" / "metrics.parquet")).filter(pl.col("step") > 0)
    stages = ["time_generate_s", "time_reward_s", "time_teacher_s", "time_update_s", "time_total_s"]
    summary = metrics.select([pl.col(c).median() for c in stages]
                             + [pl.col("num_tokens").median(), pl.col("tokens_per_s").median()])
    P, G = cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt
    print(f"method {cfg.run.method}, P={P} G={G} (B={P * G}), max_new_tokens {cfg.rollout.max_new_tokens}, "
          f"torch threads {__import__('torch').get_num_threads()}, median of steps 1..{args.steps - 1}")
    with pl.Config(tbl_cols=-1, tbl_width_chars=200, float_precision=3):
        print(summary)


if __name__ == "__main__":
    main()
