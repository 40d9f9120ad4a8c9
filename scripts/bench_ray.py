"""What the Ray backend costs at the embedded default, and what data-parallel training gains on a CPU.

    python scripts/bench_ray.py [--reps 3] [--steps 4] [--dp-reps 5] [--work DIR] [--only overhead|scaling]
        [--set key=value ...]

1. Overhead. The embedded default (`load_config()` defaults, warm-started models from
   run.cache_dir: trained there first, outside any timing, if missing) runs `--steps` steps as
   `kdrl train --no-prefect`, each run its own process and run folder, in the order local, ray,
   local, ray, ... (`--reps` of each, so a shared machine's drift hits both arms). Both arms run with
   run.num_threads=1 and run.eval_every=0; the ray arm adds cluster.backend=ray with one trainer
   rank, one rollout replica and one teacher replica (1 CPU each; a local Ray of 3 logical CPUs,
   started and stopped by the run). Per step: the stages' own clocks (time_*_s; time_sync_s is the
   weight sync to the replica, 0 locally) and the wall time between two consecutive metrics.parquet
   writes (this adds what runs outside the stages: Parquet writes and, on Ray, the post-sync
   log-prob check, rollout.sync_check_every=1 by default), medians over steps 1..N-1 (step 0 is the
   warm-up). Start-up: launch of the process to the first step's metrics file, which includes the
   imports, Ray's start, loading the models (in the actors, in parallel), the baseline evaluation
   on the held-out prompts (before training; run.eval_every=0 does not skip it) and step 0, each
   split out from the timestamps of the run's own log lines.

2. Data-parallel scaling. A ~30M-parameter random-init Llama student (h512 L8, 8 heads of 64,
   FFN 2048, char vocabulary; saved under --work) and one fixed collated GRPO batch (16 prompts of
   the embedded task x 8 samples, <= 48 new tokens sampled once from that student, seeded 0/1
   rewards mixed within every group; no teacher). The timed call is one update (forward, backward,
   gradient all-reduce, AdamW step) through the real trainer group: `RayStudent.update` on a
   `trainer_group` of world size 1 and one of world size 2 (1 CPU and 1 torch thread per rank;
   both alive in one local Ray of 4 logical CPUs), and as references a local `Student.update` in
   this process with 1 and with 2 torch threads. One untimed warm-up update per arm, then
   `--dp-reps` repetitions of W=1, W=2, local 1 thread, local 2 threads. The ideal W=2 speed-up is
   2x on two free cores; the CPU seconds each arm's processes used (/proc/<pid>/stat) tell a
   shared machine's missing core apart from the cost of data parallelism itself. Also: a no-op
   actor call's round trip and the batch's size on the wire.

Prints markdown tables (medians with min-max, per-repetition ratios) and the load average at the
start and end. Not a test: the machines are shared and noisy; compare only numbers of one run.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse
import itertools
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("generate", "reward", "teacher", "update", "sync")
RAY_ARM = ["cluster.backend=ray", "cluster.num_cpus=3", "trainer.world_size=1", "rollout.replicas=1",
           "teacher.replicas=1", "trainer.resources.num_cpus=1", "rollout.resources.num_cpus=1",
           "teacher.resources.num_cpus=1"]
# log lines that mark start-up phases (prefix → phase), first occurrence; "roles ready": the local run
# loaded the student and chose the engines (the teacher loads on first use), the Ray run's actors loaded theirs
MARKS = {"[kdrl] run ": "run opened", "[kdrl] ray: started a local Ray": "ray started",
         "[kdrl] ray: trainer": "roles ready", "[kdrl] engines:": "roles ready",
         "== before training": "baseline eval done"}
STUDENT_30M = {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "intermediate_size": 2048}


def _median(values) -> float:
    return statistics.median(values)


def _spread(values, fmt: str = ".3f") -> str:
    """median (min–max)"""
    return f"{_median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------------------------------------
# 1. Ray overhead at the embedded default


@dataclass
class Run:
    arm: str
    rep: int
    wall: float                      # launch → process exit
    first_metrics: float             # launch → iter_0/metrics.parquet written
    marks: dict[str, float]          # launch → first log line of each MARKS phase
    per_stage: dict[str, list[float]]  # time_<stage>_s, steps 1..N-1
    stages_total: list[float]        # time_total_s, steps 1..N-1
    intervals: list[float]           # wall between consecutive metrics writes, steps 1..N-1


def run_training(arm: str, rep: int, steps: int, runs_dir: Path, overrides: list[str]) -> Run:
    import polars as pl

    run_id = f"{arm}-{rep}"
    sets = [f"run.runs_dir={runs_dir}", f"run.steps={steps}", "run.eval_every=0", "run.num_threads=1",
            *(RAY_ARM if arm == "ray" else []), *overrides]
    argv = [sys.executable, "-u", "-m", "flows.cli", "train", "--no-prefect", "--run-id", run_id,
            *(x for s in sets for x in ("--set", s))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "DO_NOT_TRACK": "1"}
    lines: list[tuple[float, str]] = []
    launched_wall, launched = time.time(), time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.perf_counter() - launched, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    code = proc.wait()
    wall = time.perf_counter() - launched
    reader.join()
    if code != 0:
        sys.exit(f"{run_id} failed ({code}):\n" + "\n".join(text for _, text in lines[-60:]))
    marks = {}
    for at, text in lines:
        for prefix, name in MARKS.items():
            if text.startswith(prefix) and name not in marks:
                marks[name] = at
    run_dir = runs_dir / run_id
    files = sorted(run_dir.glob("iter_*/metrics.parquet"), key=lambda p: int(p.parent.name.split("_")[1]))
    written = [p.stat().st_mtime - launched_wall for p in files]
    m = pl.read_parquet(files).sort("step")
    steady = m.filter(pl.col("step") >= 1)
    return Run(arm=arm, rep=rep, wall=wall, first_metrics=written[0], marks=marks,
               per_stage={s: steady[f"time_{s}_s"].to_list() for s in STAGES},
               stages_total=steady["time_total_s"].to_list(),
               intervals=[b - a for a, b in itertools.pairwise(written)])


def overhead(args, runs_dir: Path) -> str:
    from kdrl.config import load_config
    from kdrl.embedded import missing_embedded_models, resolve_model_path

    cfg = load_config(overrides=args.overrides)
    missing = missing_embedded_models(cfg)
    if missing:  # warm-start outside any timing (minutes; printed)
        print(f"[bench] the embedded {', '.join(missing)} are not in {cfg.run.cache_dir}: training them first")
        for role in missing:
            resolve_model_path(f"embedded:{role}", cfg)
    else:
        print(f"[bench] embedded models cached in {cfg.run.cache_dir} (nothing to train)")
    runs: list[Run] = []
    for rep in range(args.reps):
        for arm in ("local", "ray"):
            print(f"[bench] overhead: {arm} run {rep + 1}/{args.reps} (load {_load()})", flush=True)
            runs.append(run_training(arm, rep, args.steps, runs_dir, args.overrides))
            r = runs[-1]
            print(f"[bench]   step {_median(r.stages_total):.3f} s (wall {_median(r.intervals):.3f} s), "
                  f"first step's metrics after {r.first_metrics:.1f} s, run {r.wall:.1f} s", flush=True)
    return overhead_report(runs, cfg, args.steps)


def overhead_report(runs: list[Run], cfg, steps: int) -> str:
    by = {arm: [r for r in runs if r.arm == arm] for arm in ("local", "ray")}

    def pooled(arm, get):
        return [v for r in by[arm] for v in get(r)]

    def row(name, get, per_run=None, fmt=".3f"):
        """A metric pooled over steps (get: run → list) or one value per run (per_run: run → float)."""
        if per_run is not None:
            vals = {a: [per_run(r) for r in by[a]] for a in by}
        else:
            vals = {a: pooled(a, get) for a in by}
        loc, ray = _median(vals["local"]), _median(vals["ray"])
        ratios = [b / a if a else float("nan") for a, b in
                  zip(*([per_run(r) if per_run else _median(get(r)) for r in by[x]] for x in ("local", "ray")))]
        ratio = "–" if not loc else f"{ray / loc:.2f} ({', '.join(f'{q:.2f}' for q in ratios)})"
        return (f"| {name} | {_spread(vals['local'], fmt)} | {_spread(vals['ray'], fmt)} | {ray - loc:+{fmt}} "
                f"| {ratio} |")

    n = steps - 1
    lines = [
        (f"### Overhead: method {cfg.run.method}, P={cfg.rollout.prompts_per_step} × G="
         f"{cfg.rollout.samples_per_prompt}, max_new_tokens {cfg.rollout.max_new_tokens}, {steps} steps per run"),
        "",
        (f"Runs in the order {', '.join(f'{r.arm}' for r in runs)}; per-step rows: median (min–max) over steps "
         f"1..{n} of all {len(by['local'])} runs of an arm ({n * len(by['local'])} steps); start-up rows: over the "
         "runs. Ratio: ray / local of the medians, then per repetition."),
        "",
        "| | local (1 thread) | ray (1 rank + 1 rollout + 1 teacher actor) | ray − local | ray / local (per rep) |",
        "|---|---|---|---|---|",
        row("**step, wall between metrics writes (s)**", lambda r: r.intervals),
        row("step, inside the stages (time_total_s)", lambda r: r.stages_total),
        *(row(f"· {s}", lambda r, s=s: r.per_stage[s]) for s in STAGES),
        row("outside the stages (wall − time_total_s)",
            lambda r: [w - t for w, t in zip(r.intervals, r.stages_total)]),
        row("**start-up: launch → step 0's metrics (s)**", None, per_run=lambda r: r.first_metrics, fmt=".1f"),
    ]
    phases = (("· launch → run opened (Python, imports, config)", None, "run opened"),
              ("· → roles ready (local: student loaded; ray: Ray started, actors placed, models loaded)",
               "run opened", "roles ready"),
              ("· → baseline eval done (held-out, student + teacher, greedy)", "roles ready", "baseline eval done"))
    for name, start, end in phases:
        if all(end in r.marks and (start is None or start in r.marks) for r in runs):
            lines.append(row(name, None, per_run=lambda r, a=start, b=end: r.marks[b] - (r.marks[a] if a else 0.0),
                             fmt=".1f"))
    if all("baseline eval done" in r.marks for r in runs):
        lines.append(row("· → step 0's metrics (step 0, the warm-up)", None,
                         per_run=lambda r: r.first_metrics - r.marks["baseline eval done"], fmt=".1f"))
    lines.append(row("whole run: launch → exit (s)", None, per_run=lambda r: r.wall, fmt=".1f"))
    ray_runs = by["ray"]
    if all("ray started" in r.marks and "roles ready" in r.marks for r in ray_runs):
        started = [r.marks["ray started"] - r.marks.get("run opened", 0.0) for r in ray_runs]
        ready = [r.marks["roles ready"] - r.marks["ray started"] for r in ray_runs]
        lines += ["", (f"Ray arm only: run opened → local Ray started {_spread(started, '.1f')} s; Ray started → the 3 "
                       f"actors placed and their models loaded {_spread(ready, '.1f')} s.")]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 2. Data-parallel scaling of the trainer


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (all their threads)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / os.sysconf("SC_CLK_TCK")


def build_student(path: Path):
    from kdrl.models import build_char_tokenizer, build_tiny_llama, save_model

    tokenizer = build_char_tokenizer()
    if not (path / "config.json").exists():
        save_model(build_tiny_llama(tokenizer, **STUDENT_30M, seed=0), tokenizer, path)
    return tokenizer


def build_batch(path: Path, tokenizer, prompts_per_step: int, samples: int, max_new_tokens: int):
    """One collated GRPO batch: the embedded task's first train prompts, sampled from the student
    at `path`, rewards 0/1 (seeded) with both values in every group."""
    import random

    import polars as pl
    import torch

    from kdrl.batching import collate, join_step_tables
    from kdrl.config import load_config
    from kdrl.data import build_prompts
    from kdrl.engines.hf import HFRolloutEngine
    from kdrl.models import load_causal_lm
    from kdrl.stages import generate_rollouts

    prompts = build_prompts(load_config().data, tokenizer).filter(pl.col("split") == "train").head(prompts_per_step)
    torch.set_num_threads(2)
    engine = HFRolloutEngine(load_causal_lm(str(path)), tokenizer)
    rollouts = generate_rollouts(engine, prompts, step=0, n=samples, max_new_tokens=max_new_tokens, seed=0)
    rng = random.Random(0)
    values = []
    for _ in range(prompts_per_step):
        group = [1.0, 0.0] + [float(rng.random() < 0.5) for _ in range(samples - 2)]
        rng.shuffle(group)
        values += group
    ordered = rollouts.sort("prompt_id", "sample_idx")
    rewards = ordered.select("step", "prompt_id", "sample_idx").with_columns(
        pl.Series("reward", values, dtype=pl.Float32), pl.lit(None, pl.String).alias("extracted_answer"),
        (ordered["finish_reason"] == "length").alias("truncated"))
    batch = collate(join_step_tables(rollouts, rewards, None), pad_token_id=tokenizer.pad_token_id)
    return batch, rollouts["completion_token_ids"].list.len()


def scaling(args, work: Path) -> str:
    import ray
    import torch

    from kdrl.cluster import RayCluster, RayStudent, trainer_group, wait_ready
    from kdrl.config import ClusterConfig, load_config
    from kdrl.models import load_tokenizer
    from kdrl.workers import Student, load_student_model

    path = work / "student30m"
    tokenizer = build_student(path)
    params = sum(p.numel() for p in load_student_model(load_config(overrides=[f"model.name_or_path={path}"]),
                                                        str(path)).parameters())
    started = time.perf_counter()
    batch, lengths = build_batch(path, tokenizer, args.dp_prompts, args.dp_samples, args.dp_new_tokens)
    print(f"[bench] scaling: {params / 1e6:.1f}M-parameter student, batch {tuple(batch.input_ids_BS.shape)} "
          f"built in {time.perf_counter() - started:.1f} s", flush=True)

    def cfg_for(world_size: int):
        return load_config(overrides=[f"model.name_or_path={path}", "run.method=grpo", "run.steps=1000",
                                      "cluster.backend=ray", f"trainer.world_size={world_size}",
                                      "trainer.resources.num_cpus=1", *args.dp_overrides])

    cluster = RayCluster.connect(ClusterConfig(backend="ray", num_cpus=4))
    try:
        arms, pids = {}, {}
        groups = {w: trainer_group(cfg_for(w), str(path)) for w in (1, 2)}
        wait_ready(*groups.values())
        for w, group in groups.items():
            arms[f"ray W={w}"] = RayStudent(cfg_for(w), tokenizer, str(path), group).update
            pids[f"ray W={w}"] = group.pids
        torch.manual_seed(0)
        local = Student(cfg_for(1), load_student_model(cfg_for(1), str(path)), load_tokenizer(str(path)), str(path))

        def local_update(threads: int):
            def update(batch):
                torch.set_num_threads(threads)
                return local.update(batch)
            return update

        arms["local 1 thread"], arms["local 2 threads"] = local_update(1), local_update(2)
        pids["local 1 thread"] = pids["local 2 threads"] = [os.getpid()]
        # what a call costs apart from the work: a no-op round trip, the batch's bytes
        rank = groups[1].actors[0]
        trips = []
        for _ in range(20):
            t = time.perf_counter()
            ray.get(rank.pid.remote())
            trips.append(time.perf_counter() - t)
        wire = len(pickle.dumps(batch, protocol=5))
        t = time.perf_counter()
        ray.get(ray.put(batch))
        put = time.perf_counter() - t

        times: dict[str, list[float]] = {name: [] for name in arms}
        cpu: dict[str, list[float]] = {name: [] for name in arms}  # CPU seconds of the arm's processes
        for rep in range(-1, args.dp_reps):  # -1: warm-up
            for name, update in arms.items():
                c, t = cpu_seconds(pids[name]), time.perf_counter()
                update(batch)
                seconds, used = time.perf_counter() - t, cpu_seconds(pids[name]) - c
                if rep >= 0:
                    times[name].append(seconds)
                    cpu[name].append(used)
            if rep >= 0:
                print(f"[bench] scaling rep {rep + 1}/{args.dp_reps}: "
                      + ", ".join(f"{n} {v[-1]:.2f} s" for n, v in times.items()) + f" (load {_load()})", flush=True)
        # the table before the cluster goes: all that is measured is out even if the teardown fails
        table = scaling_report(times, cpu, trips, wire, put, batch, lengths, params, args,
                               cfg_for(1).optim.micro_batch_size)
        print("\n" + table + "\n", flush=True)
    finally:
        cluster.close()
        torch.set_num_threads(1)
    return table


def scaling_report(times, cpu, trips, wire, put, batch, lengths, params, args, micro_batch_size) -> str:
    base = times["ray W=1"]
    lines = [
        (f"### Data-parallel scaling: {params / 1e6:.1f}M-parameter student (h{STUDENT_30M['hidden_size']} "
         f"L{STUDENT_30M['num_layers']}), GRPO, batch {args.dp_prompts} prompts × {args.dp_samples} samples "
         f"= {batch.input_ids_BS.shape[0]} rows × {batch.input_ids_BS.shape[1]} positions, "
         f"{int(batch.completion_mask_BT.sum())} completion tokens (median length {lengths.median():.0f}, "
         f"max {lengths.max()}), micro_batch_size {micro_batch_size}"),
        "",
        (f"{args.dp_reps} repetitions after one warm-up, in the order {', '.join(times)}; median (min–max) seconds "
         "per update (forward, backward, all-reduce, AdamW); speed-up = ray W=1's time / the arm's, median of the "
         "per-repetition ratios (then each). CPU s: user + system seconds of the arm's processes (the ranks, or "
         "this process) during the update; cores busy = CPU s / wall s (what the arm got of the machine)."),
        "",
        "| arm | s / update | speed-up vs ray W=1 (per rep) | CPU s / update | cores busy |",
        "|---|---|---|---|---|",
    ]
    for name, values in times.items():
        ratios = [b / v for b, v in zip(base, values)]
        busy = [c / v for c, v in zip(cpu[name], values)]
        lines.append(f"| {name} | {_spread(values, '.2f')} | {_median(ratios):.2f} "
                     f"({', '.join(f'{q:.2f}' for q in ratios)}) | {_spread(cpu[name], '.1f')} "
                     f"| {_spread(busy, '.2f')} |")
    lines += ["", (f"A no-op actor call's round trip: {_spread([s * 1e3 for s in trips], '.2f')} ms; the batch "
                   f"pickled: {wire / 2**20:.2f} MiB (ray.put + get {put * 1e3:.1f} ms).")]
    return "\n".join(lines)


def _machine() -> str:
    import ray
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
    shares = (" (sched_autogroup on: the processes of one session share one fair share of the CPUs)"
              if autogroup.exists() and autogroup.read_text().strip() == "1" else "")
    return (f"{cpu}, {os.cpu_count()} cores{shares}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"ray {ray.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="overhead: runs per arm")
    parser.add_argument("--steps", type=int, default=4, help="overhead: training steps per run (>= 2)")
    parser.add_argument("--dp-reps", type=int, default=5, help="scaling: timed updates per arm")
    parser.add_argument("--dp-prompts", type=int, default=16)
    parser.add_argument("--dp-samples", type=int, default=8)
    parser.add_argument("--dp-new-tokens", type=int, default=48)
    parser.add_argument("--dp-set", dest="dp_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="scaling: config override of the trainer, e.g. --dp-set optim.micro_batch_size=32")
    parser.add_argument("--work", type=Path, default=None, help="run folders and the 30M student (default: a temp "
                        "folder, removed at the end)")
    parser.add_argument("--only", choices=("overhead", "scaling"), default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="overhead: config override for both arms, e.g. --set run.cache_dir=/path/.cache/kdrl")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 0 is the warm-up)")

    temp = None
    if args.work is None:
        temp = tempfile.TemporaryDirectory(prefix="kdrl-bench-ray-")
        args.work = Path(temp.name)
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    runs_dir = args.work / f"runs-{time.strftime('%Y%m%d-%H%M%S')}"
    load_start, uptime_start, started = _load(), _uptime(), time.perf_counter()
    print(f"[bench] {stamp}, {uptime_start}", flush=True)
    parts = []
    try:
        if args.only in (None, "overhead"):
            parts.append(overhead(args, runs_dir))
            print("\n" + parts[-1] + "\n", flush=True)
        if args.only in (None, "scaling"):
            parts.append(scaling(args, args.work))  # prints its table itself
    finally:
        if temp is not None:
            temp.cleanup()
    print("\n## All results\n\n" + "\n\n".join(parts), flush=True)
    print(f"\n{stamp}; load average (1/5/15 min) at the start {load_start}, at the end {_load()} "
          f"(`uptime` at the start: {uptime_start}; at the end: {_uptime()}); {time.perf_counter() - started:.0f} s "
          f"in all. Machine: {_machine()}.", flush=True)


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


if __name__ == "__main__":
    main()
