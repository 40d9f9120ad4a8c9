"""The `kdrl-train` flow: offline phase once, then one iteration per rollout batch.

Control flow only — which task runs when. One flow run per training run with the tasks inline
(a subflow per step would cost ~1 s each). Rerunning the same parameters resumes: the session
restarts after the latest checkpoint, cached stages come back `Cached`, and updates after that
checkpoint are replayed from their persisted Parquet inputs.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.futures import wait

from kdrl.config import RunConfig, load_config
from kdrl.embedded import missing_embedded_models
from kdrl.loop import evaluation_due
from kdrl.runlock import hold_run_lock
from kdrl.storage import is_readable
from tasks import report
from tasks import train as t
from tasks.housekeeping import crash_stale_flow_runs


def resolve_run_dir(cfg: RunConfig, run_id: str | None) -> Path:
    """runs_dir/run_id; without a run id, one derived from the config (so the same command
    resumes the same run). `{date}` in a run id becomes today's UTC date (nightly runs)."""
    name = run_id or f"{cfg.run.method}-{cfg.hash()[:8]}"
    return Path(cfg.run.runs_dir) / name.format(date=time.strftime("%Y%m%d", time.gmtime()))


def _ensure(task, *args, **kwargs):
    """Run a cached task; if its cached file has since been deleted or damaged (a truncated copy, a
    full disk), recompute it: every stage is a pure function of the run's seed and step."""
    out = task(*args, **kwargs)
    if out.path is not None and not is_readable(out.path):
        out = task.with_options(refresh_cache=True)(*args, **kwargs)
    return out


def _flow_run_name() -> str:
    """A training flow run is named after its run id (what `kdrl runs` lists)."""
    from prefect.runtime import flow_run

    parameters = flow_run.parameters
    try:
        cfg = load_config(parameters.get("config_path"), parameters.get("overrides") or [])
    except (ValueError, FileNotFoundError):  # the flow itself reports it
        return "kdrl-train"
    return resolve_run_dir(cfg, parameters.get("run_id")).name


@flow(name="kdrl-train", flow_run_name=_flow_run_name)
def kdrl_train(config_path: str | None = None, overrides: list[str] | None = None, run_id: str | None = None) -> str:
    """Train (or resume) one KDRL run; returns its run directory."""
    cfg = load_config(config_path, overrides or [])
    run_dir = str(resolve_run_dir(cfg, run_id))
    logger = get_run_logger()
    with hold_run_lock(run_dir):
        crash_stale_flow_runs(run_dir)  # ours are the only live ones: we hold the lock
        for role in missing_embedded_models(cfg):  # first run of an embedded config: minutes
            t.warm_start(cfg.model_dump(mode="json"), role)
        start = t.open_run(run_dir, cfg.model_dump(mode="json"))
        if cfg.rollout.source == "teacher":
            _ensure(t.teacher_samples, run_dir)
        _ensure(t.evaluate, run_dir, -1, include_teacher=True)
        if start > 0 and evaluation_due(cfg, start - 1):
            # A run killed during the evaluation after a checkpointed step resumes after that
            # step: the loop below would never evaluate it. The weights are that step's.
            _ensure(t.evaluate, run_dir, start - 1)
        progress = report.start_progress(run_dir, start, cfg.run.steps)
        published = []  # artifacts are posted in the background, overlapping the next iteration
        for step in range(start, cfg.run.steps):
            generated = _ensure(t.generate, run_dir, step)
            rewarded = _ensure(t.rewards, run_dir, step)
            scored = _ensure(t.teacher, run_dir, step)
            seconds = {"generate": generated.seconds, "reward": rewarded.seconds, "teacher": scored.seconds}
            t.update(run_dir, step, seconds)
            if evaluation_due(cfg, step):
                _ensure(t.evaluate, run_dir, step)
            published.append(report.publish_iteration.submit(run_dir, step, progress, cfg.run.steps))
        wait(published)
        report.final_report(run_dir, cfg.run.steps - 1)
        t.close_run(run_dir)
    logger.info("run %s complete: %s", Path(run_dir).name, run_dir)
    return run_dir
