"""The README's before/after table over several warm-start seeds: what a fresh machine may print.

    .venv/bin/python scripts/default_spread.py --seeds 0 1 2 [--set run.steps=60 ...]

Each seed is the embedded default (`kdrl train --no-prefect`) with `embedded.seed=K`: another
initialisation and batch order of the two warm starts, which stands in for another machine's
floating-point kernels. Runs go to runs/spread-s<K> (resumed if present), models to the usual
cache. Prints one row per seed and the min–max of each column; the README quotes that range.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    from kdrl.config import load_config
    from kdrl.embedded import embedded_dir
    from flows.train import train_without_prefect
    from kdrl.metrics import before_after
    from kdrl.storage import RunPaths

    rows = []
    for seed in args.seeds:
        cfg = load_config(None, [*args.overrides, f"embedded.seed={seed}"])
        run_dir = Path(cfg.run.runs_dir) / f"spread-s{seed}"
        train_without_prefect(cfg, run_dir)  # holds the run's lock
        table = before_after(RunPaths(run_dir), cfg.run.steps - 1)
        get = {(r["model"], r["when"]): r for r in table.iter_rows(named=True)}
        warm = json.loads((embedded_dir(cfg) / "teacher" / "warm_start.json").read_text())
        student_warm = json.loads((embedded_dir(cfg) / "student" / "warm_start.json").read_text())
        rows.append({
            "seed": seed,
            "teacher": get[("teacher", "before")]["pass_at_1"],
            "student_before": get[("student", "before")]["pass_at_1"],
            "student_after": get[("student", "after")]["pass_at_1"],
            "len_before": get[("student", "before")]["mean_len"],
            "len_after": get[("student", "after")]["mean_len"],
            "teacher_kept_step": warm["kept_step"],
            "teacher_validation": warm["validation"][-1][1] if warm["validation"] else None,
            "warm_start_s": warm["seconds"] + student_warm["seconds"],
        })
        print(pl.DataFrame(rows), flush=True)
    frame = pl.DataFrame(rows)
    print("\nrange over seeds (min – max):")
    for column in ("teacher", "student_before", "student_after", "len_before", "len_after", "teacher_kept_step",
                   "warm_start_s"):
        print(f"  {column:18s} {frame[column].min():.3f} – {frame[column].max():.3f}")


if __name__ == "__main__":
    main()
