"""The `kdrl-train` flow: offline phase once, then one iteration per rollout batch.

Control flow only, written once: `run_training` is the body of the flow and of
`kdrl train --no-prefect` (through `flows.runner`). One flow run per training run with the tasks
inline (a subflow per step would cost ~1 s each). Rerunning the same parameters resumes: the
student restarts after the latest checkpoint, cached stages come back `Cached`, and updates after
that checkpoint are replayed from their persisted Parquet inputs.

    open_run ─▶ [teacher_samples] ─▶ evaluate(-1)
    per step:  generate ─▶ rewards ─▶ teacher ─▶ update ─▶ [checkpoint] ─▶ [evaluate] ─▶ [trackers]
               (an arrow: the file one task returned, passed to the next; or, into generate and
               evaluate, "after the task that last moved the student's weights": Prefect's wait_for)
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow

from flows.runner import PlainStages, PrefectStages
from kdrl.config import RunConfig, load_config
from kdrl.embedded import missing_embedded_models
from kdrl.pipeline import checkpoint_due, evaluation_due
from kdrl.runlock import hold_run_lock
from tasks import report
from tasks import train as t
from tasks.logs import info


def resolve_run_dir(cfg: RunConfig, run_id: str | None) -> Path:
    """runs_dir/run_id; without a run id, one derived from the config (so the same command
    resumes the same run). `{date}` in a run id becomes today's UTC date (nightly runs)."""
    name = run_id or f"{cfg.run.method}-{cfg.hash()[:8]}"
    return Path(cfg.run.runs_dir) / name.format(date=time.strftime("%Y%m%d", time.gmtime()))


def _flow_run_name() -> str:
    """A training flow run is named after its run id (what `kdrl runs` lists)."""
    from prefect.runtime import flow_run

    parameters = flow_run.parameters
    try:
        cfg = load_config(parameters.get("config_path"), parameters.get("overrides") or [])
    except (ValueError, FileNotFoundError):  # the flow itself reports it
        return "kdrl-train"
    return resolve_run_dir(cfg, parameters.get("run_id")).name


def run_training(cfg: RunConfig, run_dir: str, stages: PrefectStages | PlainStages) -> str:
    """Train (or resume) the run in `run_dir`; returns it. The order of the stages, the
    evaluation cadence and the resume rules live here and nowhere else."""
    with hold_run_lock(run_dir):
        if stages.prefect:
            from tasks.housekeeping import crash_stale_flow_runs

            crash_stale_flow_runs(run_dir)  # ours are the only live ones: we hold the lock
        # before minutes of model loading: a tracker whose package is missing refuses the run now
        trackers = stages(t.open_trackers, cfg, run_dir)
        try:
            _train(cfg, run_dir, stages, trackers)
        finally:
            if trackers:  # what is written is sent (on its own thread; bounded wait)
                trackers.close()
    info(f"run {Path(run_dir).name} complete: {run_dir}")
    return run_dir


def _train(cfg: RunConfig, run_dir: str, stages: PrefectStages | PlainStages, trackers) -> None:
    """`run_training`'s body under the run lock: warm start, open, baseline, the steps."""
    for role in missing_embedded_models(cfg):  # first run of an embedded config: minutes
        stages(t.warm_start, cfg, role)
    opened = stages(t.open_run, run_dir, cfg)
    run, prompts = opened.info, opened.prompts
    student, rollout, teacher = opened.student, opened.rollout, opened.teacher
    try:
        pool = stages.cached(t.teacher_samples, run, teacher, prompts) if cfg.rollout.source == "teacher" else None
        stages.cached(t.evaluate, run, student, rollout, teacher, prompts, -1, include_teacher=True)
        start = opened.start
        if start > 0 and evaluation_due(cfg, start - 1):
            # A run killed during the evaluation after a checkpointed step resumes after that
            # step: the loop below would never evaluate it. The weights are that step's.
            stages.cached(t.evaluate, run, student, rollout, teacher, prompts, start - 1)
        if trackers:  # the baseline, and what a resumed run wrote before but did not send
            trackers.publish(start - 1)
        progress = stages.report(report.start_progress, run_dir, start, cfg.run.steps)
        weights = None  # the task that last moved the student: the stages that use its weights come after it
        for step in range(start, cfg.run.steps):
            rollouts = stages.cached(t.generate, run, rollout, prompts, step, teacher_samples=pool,
                                     wait_for=weights)
            rewards = stages.cached(t.rewards, run, rollouts, prompts, step)
            scores = stages.cached(t.teacher, run, teacher, rollouts, rewards, step)
            weights = [stages(t.update, run, student, rollout, rollouts, rewards, scores, step)]
            if checkpoint_due(cfg, step):
                weights = [stages(t.checkpoint, run, student, step, wait_for=weights)]
            if evaluation_due(cfg, step):
                stages.cached(t.evaluate, run, student, rollout, teacher, prompts, step, wait_for=weights)
            stages.background(report.publish_iteration, run_dir, step, progress, cfg.run.steps)
            if trackers:
                trackers.publish(step)
        stages.wait()
        stages.report(report.final_report, run_dir, cfg.run.steps - 1)
    finally:
        stages(t.close_run, opened)


def train_without_prefect(cfg: RunConfig, run_dir: str | Path) -> str:
    """`run_training` as plain function calls (notebooks, debugging, `--no-prefect`); returns the
    run directory (`kdrl.metrics.before_after` reads its held-out summary)."""
    return run_training(cfg, str(run_dir), PlainStages())


@flow(name="kdrl-train", flow_run_name=_flow_run_name)
def kdrl_train(config_path: str | None = None, overrides: list[str] | None = None, run_id: str | None = None) -> str:
    """Train (or resume) one KDRL run; returns its run directory."""
    cfg = load_config(config_path, overrides or [])
    return run_training(cfg, str(resolve_run_dir(cfg, run_id)), PrefectStages())
