"""What Prefect and Parquet cost per training iteration at the embedded default's batch size.

    .venv/bin/python scripts/bench_overhead.py [--iters 10] [--set key=value ...]

Trains the embedded default (P=16 prompts x G=8 samples, max_new_tokens 48, the warm-started
models from run.cache_dir, trained there on first use: several minutes; add e.g.
`--set embedded.teacher_steps=50` to shorten that, model quality does not matter here) for
`--iters` iterations four times in this one process, in the order plain loop, flow, flow, plain
loop (ABBA, so slow drift of a shared machine cancels). The plain loop is the flow body run
without Prefect (`flows.train.train_without_prefect`); the flow is `flows.train.kdrl_train` run
as `kdrl train` runs it (the server PREFECT_API_URL names, else a local server at lower
priority, see flows/server.py; `--ephemeral`: Prefect's ephemeral mode).

An iteration's wall time is the time between two consecutive metrics.parquet writes (so the
flow's task orchestration, cache keys, result records and artifacts between two updates all
count); step 0 (warm-up) has no predecessor, so the median is over steps 1..N-1. Parquet I/O is
the time spent inside `kdrl.storage.write_table` / `read_table`, wrapped with timers wherever a
module imported them. Start-up is the time from calling the driver to the first model load.
Not a test: the machines are shared and noisy; compare only numbers taken in one run.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Prefect reads its settings at import time. A fresh PREFECT_HOME and result storage (unless
# given) make the one-off start-up cost that of a new machine and keep old cache records out.
for _name, _prefix in (("PREFECT_HOME", "bench-prefect-home-"),
                       ("PREFECT_LOCAL_STORAGE_PATH", "bench-prefect-storage-")):
    if _name not in os.environ:
        os.environ[_name] = tempfile.mkdtemp(prefix=_prefix)
        # registered before prefect is imported, so it runs after prefect stops its ephemeral server
        atexit.register(shutil.rmtree, os.environ[_name], ignore_errors=True)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import itertools
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class Probe:
    """Timed calls: (kind, table, start, seconds), kind one of write/read/open."""

    calls: list[tuple[str, str, float, float]] = field(default_factory=list)

    def wrap(self, kind: str, fn):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls.append((kind, kwargs.get("table", ""), started, time.perf_counter() - started))

        timed.__wrapped__ = fn
        return timed


def instrument(probe: Probe) -> None:
    """Replace write_table/read_table/load_run in every kdrl/tasks/flows module that imported them."""
    import flows.train  # noqa: F401  (imports tasks.*, kdrl.pipeline, kdrl.workers)
    import kdrl.storage
    import kdrl.workers

    originals = {"write_table": ("write", kdrl.storage.write_table), "read_table": ("read", kdrl.storage.read_table),
                 "load_run": ("open", kdrl.workers.load_run)}
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in ("kdrl", "tasks", "flows"):
            continue
        for attr, (kind, original) in originals.items():
            if getattr(module, attr, None) is original:
                setattr(module, attr, probe.wrap(kind, original))


STAGES = ("generate", "reward", "teacher", "update")


@dataclass
class RunTiming:
    driver: str
    intervals: list[float]      # wall seconds of steps 1..N-1
    stage_seconds: list[float]  # time_total_s of the same steps (the stages' own clocks)
    per_stage: dict[str, list[float]]  # time_<stage>_s of the same steps
    parquet: list[float]        # seconds inside write_table/read_table in each interval
    parquet_calls: list[int]
    startup: float              # driver called -> first model load
    tail: float                 # last metrics write -> driver returned (final evaluation, report, teardown)
    total: float


EPHEMERAL = False


def run_once(driver: str, run_index: int, cfg_overrides: list[str], runs_dir: Path, probe: Probe) -> RunTiming:
    import polars as pl

    from flows.train import kdrl_train
    from flows.train import train_without_prefect
    from kdrl.config import load_config

    run_id = f"{driver}-{run_index}"
    probe.calls.clear()
    started = time.perf_counter()
    if driver == "flow" and EPHEMERAL:
        kdrl_train(config_path=None, overrides=cfg_overrides, run_id=run_id)
    elif driver == "flow":  # exactly what `kdrl train` does: the configured API, or its own local server
        from flows.cli import _run_flow

        _run_flow(None, cfg_overrides, run_id)
    else:
        train_without_prefect(load_config(overrides=cfg_overrides), runs_dir / run_id)
    total = time.perf_counter() - started
    calls = list(probe.calls)
    opened = min(s for kind, _, s, _ in calls if kind == "open")
    ends = sorted(s + d for kind, table, s, d in calls if kind == "write" and table == "step_metrics")
    io = [(s, d) for kind, _, s, d in calls if kind in ("write", "read")]
    windows = list(itertools.pairwise(ends))
    metrics = pl.read_parquet(str(runs_dir / run_id / "iter_*" / "metrics.parquet")).sort("step")
    return RunTiming(
        driver=driver,
        intervals=[b - a for a, b in windows],
        stage_seconds=metrics["time_total_s"].to_list()[1:],
        per_stage={stage: metrics[f"time_{stage}_s"].to_list()[1:] for stage in STAGES},
        parquet=[sum(d for s, d in io if a < s <= b) for a, b in windows],
        parquet_calls=[sum(1 for s, _ in io if a < s <= b) for a, b in windows],
        startup=opened - started,
        tail=started + total - ends[-1],
        total=total,
    )


def _median(values) -> float:
    return statistics.median(values)


def _machine() -> str:
    import polars
    import prefect
    import pyarrow
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), prefect {prefect.__version__}, polars {polars.__version__}, "
            f"pyarrow {pyarrow.__version__}")


def report(runs: list[RunTiming], *, iters: int, mode: str, load: tuple[float, float]) -> str:
    by = {d: [r for r in runs if r.driver == d] for d in ("plain", "flow")}

    def pooled(driver, attr):
        return [v for r in by[driver] for v in getattr(r, attr)]

    wall = {d: _median(pooled(d, "intervals")) for d in by}
    stages = {d: _median(pooled(d, "stage_seconds")) for d in by}
    per_stage = {d: {st: _median([v for r in by[d] for v in r.per_stage[st]]) for st in STAGES} for d in by}
    outside = {d: _median([i - s for r in by[d] for i, s in zip(r.intervals, r.stage_seconds)]) for d in by}
    parquet = {d: _median(pooled(d, "parquet")) for d in by}
    calls = {d: _median(pooled(d, "parquet_calls")) for d in by}
    extra, extra_outside = wall["flow"] - wall["plain"], outside["flow"] - outside["plain"]
    flows = by["flow"]
    lines = [
        (f"{iters} iterations per run, runs in the order {', '.join(r.driver for r in runs)}; "
         f"medians over steps 1..{iters - 1} "
         f"of both runs of a driver ({2 * (iters - 1)} iterations each). Flow mode: {mode}."),
        "",
        "| per iteration | plain loop | flow | flow − plain |",
        "|---|---|---|---|",
        (f"| wall time (s) | {wall['plain']:.3f} | {wall['flow']:.3f} | "
         f"{extra:+.3f} ({100 * extra / wall['plain']:+.1f}%) |"),
        (f"| inside the stages (time_total_s) | {stages['plain']:.3f} | {stages['flow']:.3f} | "
         f"{stages['flow'] - stages['plain']:+.3f} |"),
        *(f"| · {stage} | {per_stage['plain'][stage]:.3f} | {per_stage['flow'][stage]:.3f} | "
          f"{per_stage['flow'][stage] - per_stage['plain'][stage]:+.3f} |" for stage in STAGES),
        (f"| outside the stages (wall − stages) | {outside['plain']:.3f} | {outside['flow']:.3f} | "
         f"{extra_outside:+.3f} ({100 * extra_outside / wall['plain']:+.1f}%) |"),
        (f"| Parquet I/O (write_table + read_table) | "
         f"{parquet['plain']:.3f} ({100 * parquet['plain'] / wall['plain']:.1f}%) | "
         f"{parquet['flow']:.3f} ({100 * parquet['flow'] / wall['flow']:.1f}%) | "
         f"{parquet['flow'] - parquet['plain']:+.3f} |"),
        f"| Parquet calls | {calls['plain']:.0f} | {calls['flow']:.0f} | {calls['flow'] - calls['plain']:+.0f} |",
        "",
        ("| run | driver | start-up before the first model load (s) | median iteration (s) | "
         "after the last update (s) | whole run (s) |"),
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs):
        lines.append(f"| {i + 1} | {r.driver} | {r.startup:.2f} | {_median(r.intervals):.3f} | {r.tail:.2f} "
                     f"| {r.total:.1f} |")
    plain_startup = _median([r.startup for r in by["plain"]])
    lines += [
        "",
        (f"One-off flow start-up (first flow in the process, {mode}): {flows[0].startup - plain_startup:.2f} s "
         f"more than the plain loop's; a later flow in the same process: {flows[1].startup - plain_startup:.2f} s."),
        f"Load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f}.",
        f"Machine: {_machine()}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=10, help="training iterations per run (>= 3)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run, e.g. --set embedded.teacher_steps=50")
    parser.add_argument("--ephemeral", action="store_true",
                        help="run the flow in Prefect's ephemeral mode instead of `kdrl train`'s local server")
    args = parser.parse_args()
    global EPHEMERAL
    EPHEMERAL = args.ephemeral
    if args.iters < 3:
        parser.error("--iters must be at least 3")

    probe = Probe()
    instrument(probe)
    from flows.server import NICENESS
    from kdrl.config import load_config
    from kdrl.embedded import resolve_model_path

    mode = (f"started server at {os.environ['PREFECT_API_URL']}" if os.environ.get("PREFECT_API_URL")
            else "ephemeral" if EPHEMERAL else f"`kdrl train`'s local server (nice {NICENESS})")
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        runs_dir = Path(tmp)
        overrides = [f"run.steps={args.iters}", "run.eval_every=0", f"run.runs_dir={runs_dir}", *args.overrides]
        cfg = load_config(overrides=overrides)
        for role in ("student", "teacher"):  # train/cache the embedded models outside any timing
            resolve_model_path(getattr(cfg, "model" if role == "student" else "teacher").name_or_path, cfg)
        load_before = os.getloadavg()[0]
        runs = [run_once(driver, i, overrides, runs_dir, probe)
                for i, driver in enumerate(["plain", "flow", "flow", "plain"])]
        load_after = os.getloadavg()[0]
        same = _same_metrics(runs_dir / "plain-0", runs_dir / "flow-1")
    P, G = cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt
    print(f"\n## method {cfg.run.method}, P={P} G={G} (B={P * G}), max_new_tokens {cfg.rollout.max_new_tokens}\n")
    print(report(runs, iters=args.iters, mode=mode, load=(load_before, load_after)))
    print(f"Flow and plain loop wrote the same metrics (timing columns aside): {same}.")


def _same_metrics(a: Path, b: Path) -> bool:
    import polars as pl

    frames = [pl.read_parquet(str(d / "iter_*" / "metrics.parquet")).sort("step") for d in (a, b)]
    timing = [c for c in frames[0].columns if c.startswith("time_") or c == "tokens_per_s"]
    return frames[0].drop(timing).equals(frames[1].drop(timing))


if __name__ == "__main__":
    main()
