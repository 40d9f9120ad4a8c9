"""Prefect tasks of a training run: thin wrappers over the path-level stages in `kdrl.loop`.

Each takes the run directory (and step), calls one kdrl stage, which writes one Parquet file,
and returns a small `StageOutput` (path, seconds). Cache policies, chosen per task:

| task | cache key (+ TASK_SOURCE) | why |
|---|---|---|
| warm_start | none (NO_CACHE); runs only when the embedded model's folder is missing | the folder under run.cache_dir is the cache |
| open_run | none (NO_CACHE) | loads models into this process; must always run |
| teacher_samples | run dir, config hash | once per run; the file is the expensive offline phase |
| evaluate | run dir, config hash, step | evaluation of a given step's weights never changes |
| generate | run dir, config hash, step | rollouts of step k are a pure function of the run config and k (seeded); reused on resume instead of regenerated |
| rewards | content of rollouts + prompts files, reward config | deterministic given its inputs |
| teacher | content of rollouts + rewards files, teacher identity, top-k, loss config, step | a rerun never scores twice |
| update | none (NO_CACHE) | mutates the resident weights; on resume it is replayed from the persisted inputs after the last checkpoint |
| publish | none (NO_CACHE) | UI artifacts only |

Seeds and step numbers are in the inputs of every stochastic stage. A cached result whose file
was deleted is recomputed by the flow (`refresh_cache`), so Prefect's cache never outlives the
run directory, which stays the record.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE, TASK_SOURCE, CacheKeyFnPolicy

from kdrl.config import RunConfig
from kdrl.embedded import cache_key as embedded_cache_key
from kdrl.embedded import resolve_model_path
from kdrl.loop import (
    StageOutput,
    format_step,
    format_summary,
    stage_evaluate,
    stage_generate,
    stage_rewards,
    stage_teacher,
    stage_teacher_samples,
    stage_update,
)
from kdrl.runs import summarize_evaluation
from kdrl.storage import RunPaths, content_hash, read_table
from tasks import resident


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _run_key(context, parameters) -> str:
    run_dir = str(Path(parameters["run_dir"]).resolve())
    return _digest(context.task.name, run_dir, resident.session(run_dir).cfg.hash(), parameters.get("step"))


def _file_fingerprint(path: str | Path) -> str:
    """Identity of a model folder (config + weight file sizes and mtimes) or a hub name."""
    root = Path(path)
    if not root.exists():
        return str(path)
    files = sorted(p for p in root.iterdir() if p.suffix in {".json", ".safetensors", ".bin"})
    return _digest(str(root.resolve()), [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def _rewards_key(context, parameters) -> str:
    s = resident.session(parameters["run_dir"])
    paths = RunPaths(Path(parameters["run_dir"]))
    return _digest("rewards", content_hash(paths.rollouts(parameters["step"])), content_hash(paths.prompts),
                   s.cfg.reward.model_dump(mode="json"))


def _teacher_key(context, parameters) -> str:
    s = resident.session(parameters["run_dir"])
    paths, step = RunPaths(Path(parameters["run_dir"])), parameters["step"]
    return _digest("teacher", str(paths.root.resolve()), step, content_hash(paths.rollouts(step)), content_hash(paths.rewards(step)),
                   _file_fingerprint(s.teacher_path or ""), s.cfg.teacher.top_k, s.cfg.loss.model_dump(mode="json"))


RUN_CACHE = CacheKeyFnPolicy(cache_key_fn=_run_key) + TASK_SOURCE


@task(cache_policy=NO_CACHE, task_run_name="warm-start-{role}")
def warm_start(config: dict[str, Any], role: str) -> str:
    """Train one embedded model (the first run of a data/embedded config only; cached on disk
    after that), with a progress artifact and a log line every `embedded.log_every_s` seconds."""
    cfg = RunConfig.model_validate(config)
    logger = get_run_logger()
    artifact = create_progress_artifact(progress=0.0, key=f"embedded-{role}-{embedded_cache_key(cfg)}",
                                        description=f"warm start of the embedded {role} (SFT steps)")

    def progress(done: int, total: int) -> None:
        update_progress_artifact(artifact, 100.0 * done / max(total, 1))

    path = resolve_model_path(f"embedded:{role}", cfg, log=logger.info, progress=progress)
    update_progress_artifact(artifact, 100.0)
    return path


@task(cache_policy=NO_CACHE)
def open_run(run_dir: str, config: dict[str, Any]) -> int:
    """Load models and prompts into this process (resuming after the latest checkpoint);
    returns the first step still to run."""
    logger = get_run_logger()
    return resident.open_run(run_dir, config, log=logger.info).next_step


@task(cache_policy=RUN_CACHE)
def teacher_samples(run_dir: str) -> StageOutput:
    """Offline (SFT): G teacher samples per training prompt."""
    return stage_teacher_samples(resident.session(run_dir))


@task(cache_policy=RUN_CACHE, task_run_name="evaluate-{step}")
def evaluate(run_dir: str, step: int, include_teacher: bool = False) -> StageOutput:
    """Held-out evaluation after `step` (−1: baseline of student and teacher)."""
    out = stage_evaluate(resident.session(run_dir), step, include_teacher=include_teacher)
    title = "before training (held-out)" if step < 0 else f"after step {step} (held-out)"
    get_run_logger().info(format_summary(title, summarize_evaluation(read_table(out.path, table="evaluations"))))
    return out


@task(cache_policy=RUN_CACHE, task_run_name="generate-{step}")
def generate(run_dir: str, step: int) -> StageOutput:
    """Rollouts of `step` from the current student."""
    return stage_generate(resident.session(run_dir), step)


@task(cache_policy=CacheKeyFnPolicy(cache_key_fn=_rewards_key) + TASK_SOURCE, task_run_name="rewards-{step}")
def rewards(run_dir: str, step: int) -> StageOutput:
    """Rule-based rewards of the step's rollouts."""
    return stage_rewards(resident.session(run_dir), step)


@task(cache_policy=CacheKeyFnPolicy(cache_key_fn=_teacher_key) + TASK_SOURCE, task_run_name="teacher-{step}")
def teacher(run_dir: str, step: int) -> StageOutput:
    """Teacher log-probs of the KD-unmasked rollouts of `step`."""
    return stage_teacher(resident.session(run_dir), step)


@task(cache_policy=NO_CACHE, task_run_name="update-{step}")
def update(run_dir: str, step: int, seconds: dict[str, float]) -> StageOutput:
    """One policy update from the step's Parquet inputs (+ checkpoint when due)."""
    out = stage_update(resident.session(run_dir), step, seconds)
    get_run_logger().info(format_step(read_table(out.path, table="step_metrics").row(0, named=True)))
    return out


@task(cache_policy=NO_CACHE)
def close_run(run_dir: str) -> None:
    """Free the run's models."""
    resident.close_run(run_dir)
