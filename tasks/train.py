"""Prefect tasks of a training run: thin wrappers over `kdrl.pipeline`, one per stage.

A task takes what its stage reads — the files earlier tasks returned (`Artifact`: path and
digest), the run (`RunInfo`: folder, config, provenance) and, where the stage needs one, a
resident worker (`Student`, `Rollout`, `Teacher`) — and returns what it wrote. The flow passes
one task's return value to the next, so Prefect's flow-run graph has the real edges
generate → rewards → teacher → update.

Cache keys come from the inputs alone (`stage_key`): an Artifact by its path and digest (taken
when it was written: nothing is hashed twice), the run by its folder and config hash, the teacher
by its model files, plus the step and the task's source. The student and the rollout engine are
left out: their weights at step k are a pure function of the run's config and k.

- warm_start, open_run: not cached (the model cache folder is the cache; open_run loads models
  into this process);
- teacher_samples, evaluate, generate, rewards, teacher: `stage_key` (a stage of a given run and
  step never changes; a rerun never computes it twice);
- update, checkpoint: not cached (they move the resident student; on resume they are replayed
  from the files after the last checkpoint).

A cached result whose file was since deleted is recomputed by the flow (`refresh_cache`), so
Prefect's cache never outlives the run directory, which stays the record. Every task also runs
without Prefect (`task.fn`, `flows.runner.PlainStages`): its log lines then go to stdout.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE, TASK_SOURCE, CacheKeyFnPolicy
from prefect.context import TaskRunContext

from kdrl.config import RunConfig
from kdrl.embedded import cache_key as embedded_cache_key
from kdrl.embedded import resolve_model_path
from kdrl.handoff import Artifact, RunInfo
from kdrl.metrics import format_step, format_summary
from kdrl.pipeline import (
    write_checkpoint,
    write_evaluation,
    write_rewards,
    write_rollouts,
    write_teacher_logprobs,
    write_teacher_samples,
    write_update,
)
from kdrl.progress import reporting
from kdrl.runs import summarize_evaluation
from kdrl.storage import read_table
from kdrl.trackers import Trackers
from kdrl.trackers import open_trackers as _open_trackers
from kdrl.workers import OpenRun, Rollout, Student, Teacher, load_run
from tasks.logs import info


def _identity(value: Any) -> Any:
    """What a task input contributes to its cache key."""
    if isinstance(value, Artifact):
        return [value.path, value.digest]
    if isinstance(value, RunInfo):
        return [str(Path(value.root).resolve()), value.cfg.hash()]
    if isinstance(value, Teacher):
        return value.identity()
    if isinstance(value, (Student, Rollout)):
        return None  # resident; its state at a step is fixed by the run's config and the step
    return value


def stage_key(context, parameters: dict[str, Any]) -> str:
    """The cache key of a stage: its name and the identity of every input."""
    inputs = {name: _identity(value) for name, value in sorted(parameters.items())}
    blob = json.dumps([context.task.name, inputs], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


STAGE_CACHE = CacheKeyFnPolicy(cache_key_fn=stage_key) + TASK_SOURCE


@task(cache_policy=NO_CACHE, task_run_name="warm-start-{role}")
def warm_start(cfg: RunConfig, role: str) -> str:
    """Train one embedded model (the first run of a data/embedded config only; cached on disk
    after that), with a progress artifact and a log line every `embedded.log_every_s` seconds."""
    if TaskRunContext.get() is None:  # without Prefect: log lines only
        return resolve_model_path(f"embedded:{role}", cfg, log=info)
    artifact = create_progress_artifact(progress=0.0, key=f"embedded-{role}-{embedded_cache_key(cfg)}",
                                        description=f"warm start of the embedded {role} (SFT steps)")

    def progress(done: int, total: int) -> None:
        update_progress_artifact(artifact, 100.0 * done / max(total, 1))

    path = resolve_model_path(f"embedded:{role}", cfg, log=info, progress=progress)
    update_progress_artifact(artifact, 100.0)
    return path


@task(cache_policy=NO_CACHE)
def open_run(run_dir: str, cfg: RunConfig) -> OpenRun:
    """Load the models into this process (resuming after the latest checkpoint) and write the
    run's config and prompts table."""
    return load_run(cfg, run_dir, log=info)


@task(cache_policy=NO_CACHE)
def open_trackers(cfg: RunConfig, run_dir: str) -> Trackers | None:
    """The experiment trackers of `run.report_to` (None without any); refuses one whose package
    is missing, before any training."""
    return _open_trackers(cfg, run_dir, log=info)


@task(cache_policy=STAGE_CACHE)
def teacher_samples(run: RunInfo, teacher: Teacher, prompts: Artifact) -> Artifact:
    """Offline (SFT): G teacher samples per training prompt."""
    with reporting(info, "teacher samples"):
        return write_teacher_samples(run, teacher, prompts)


@task(cache_policy=STAGE_CACHE, task_run_name="evaluate-{step}")
def evaluate(run: RunInfo, student: Student, rollout: Rollout, teacher: Teacher | None, prompts: Artifact, step: int,
             include_teacher: bool = False) -> Artifact:
    """Held-out evaluation after `step` (−1: baseline of student and teacher)."""
    with reporting(info, "evaluate before training" if step < 0 else f"evaluate step {step}"):
        out = write_evaluation(run, student, rollout, teacher, prompts, step, include_teacher=include_teacher)
    title = "before training" if step < 0 else f"after step {step}"
    evaluations = read_table(out.path, table="evaluations")
    info(format_summary(f"{title} (held-out)", summarize_evaluation(evaluations)))
    ood = summarize_evaluation(evaluations, split="ood")
    if ood.height:
        info(format_summary(f"{title} (out-of-domain)", ood))
    return out


@task(cache_policy=STAGE_CACHE, task_run_name="generate-{step}")
def generate(run: RunInfo, rollout: Rollout, prompts: Artifact, step: int,
             teacher_samples: Artifact | None = None) -> Artifact:
    """Rollouts of `step` from the current student (SFT: drawn from the teacher samples)."""
    with reporting(info, f"generate step {step}"):
        return write_rollouts(run, rollout, prompts, step, teacher_samples=teacher_samples)


@task(cache_policy=STAGE_CACHE, task_run_name="rewards-{step}")
def rewards(run: RunInfo, rollouts: Artifact, prompts: Artifact, step: int) -> Artifact:
    """Rule-based rewards of the step's rollouts (no model)."""
    return write_rewards(run, rollouts, prompts, step)


@task(cache_policy=STAGE_CACHE, task_run_name="teacher-{step}")
def teacher(run: RunInfo, teacher: Teacher | None, rollouts: Artifact, rewards: Artifact, step: int) -> Artifact | None:
    """Teacher log-probs of the KD-unmasked rollouts of `step` (None: β = 0 there)."""
    with reporting(info, f"teacher scoring step {step}"):
        return write_teacher_logprobs(run, teacher, rollouts, rewards, step)


@task(cache_policy=NO_CACHE, task_run_name="update-{step}")
def update(run: RunInfo, student: Student, rollout: Rollout, rollouts: Artifact, rewards: Artifact,
           teacher_scores: Artifact | None, step: int) -> Artifact:
    """One policy update from the step's files and the rollout engine's weight sync; returns
    the metrics file."""
    out = write_update(run, student, rollout, rollouts, rewards, teacher_scores, step)
    info(format_step(read_table(out.path, table="step_metrics").row(0, named=True)))
    return out


@task(cache_policy=NO_CACHE, task_run_name="checkpoint-{step}")
def checkpoint(run: RunInfo, student: Student, step: int) -> str:
    """The student after `step` (weights, optimizer, schedule): what a resumed run loads."""
    return write_checkpoint(run, student, step)


@task(cache_policy=NO_CACHE)
def close_run(opened: OpenRun) -> None:
    """Free the run's models and engines."""
    opened.close()
