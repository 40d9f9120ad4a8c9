"""The `kdrl` command line: the control surface of the framework.

    kdrl train [--config cfg.yaml] [--set key=value ...] [--run-id ID]

It lives beside the flows (not in `kdrl/`) so that the library never depends on the drivers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdrl", description="Post-train reasoning LLMs with KDRL (GRPO + on-policy reverse-KL distillation).")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="start or resume a training run")
    train.add_argument("--config", type=Path, default=None, help="YAML config (sections: data, model, teacher, rollout, reward, loss, optim, embedded, run)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set loss.beta_init=0.01 (repeatable)")
    train.add_argument("--run-id", default=None, help="run directory name under run.runs_dir (rerun the same id to resume)")
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _train(args: argparse.Namespace) -> int:
    from kdrl.config import load_config
    from kdrl.loop import train

    _quiet_libraries()
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"kdrl: {err}", file=sys.stderr)
        return 2
    run_id = args.run_id or f"{cfg.run.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.run.runs_dir) / run_id
    print(f"[kdrl] run {run_id}: method {cfg.run.method}, {cfg.run.steps} steps → {run_dir}")
    table = train(cfg, run_dir)
    print("\nheld-out accuracy (pass@1) before → after:")
    for model in table["model"].unique(maintain_order=True).to_list():
        rows = {r["when"]: r for r in table.filter(table["model"] == model).iter_rows(named=True)}
        if "after" in rows:
            print(f"  {model:8s} {rows['before']['pass_at_1']:.3f} → {rows['after']['pass_at_1']:.3f}   "
                  f"mean response length {rows['before']['mean_len']:.1f} → {rows['after']['mean_len']:.1f}")
        else:
            print(f"  {model:8s} {rows['before']['pass_at_1']:.3f} (reference)")
    print(f"\nEverything is in {run_dir}; e.g. polars.scan_parquet('{run_dir}/iter_*/metrics.parquet')")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return {"train": _train}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
