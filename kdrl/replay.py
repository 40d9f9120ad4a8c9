"""Counterfactual updates: re-run only the update of iteration K of a finished (or running) run,
from its persisted rollouts, rewards and teacher scores, under a changed loss/optimizer config.

    kdrl replay RUN --iter K --set loss.beta_init=0.02

The student, optimizer, scheduler and RNG start from RUN's checkpoint of step K−1 (or the
initial model for K = 0); the result goes to a new run directory ``RUN-replayK-<hash>`` holding
the config, links to the three input tables, and the new batch/metrics/checkpoint. Nothing in
RUN is written. With no overrides the replay reproduces RUN's step K exactly (tested).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import polars as pl

from kdrl.config import OptimConfig, RunConfig, dump_config, load_config, objective_problems
from kdrl.handoff import Artifact
from kdrl.pipeline import teacher_needed, write_checkpoint, write_update
from kdrl.runs import latest_checkpoint
from kdrl.stages import kd_needed
from kdrl.storage import RunPaths, read_table
from kdrl.train import TrainingDiverged
from kdrl.workers import load_run

REPLAYABLE = {"loss", "optim"}
"""Config sections a replay may change; the rest shaped the persisted inputs."""


def _check_overrides(old: RunConfig, new: RunConfig) -> None:
    before, after = old.model_dump(mode="json"), new.model_dump(mode="json")
    changed = [f"{section}.{key}" for section in before for key in before[section]
               if before[section][key] != after[section][key] and section not in REPLAYABLE
               and f"{section}.{key}" not in {"teacher.offload", "run.method"}]
    if changed:
        raise ValueError(f"replay can only change {sorted(REPLAYABLE)} (the rollouts are fixed); "
                         f"these differ: {changed}")


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem: copy
        shutil.copy2(src, dst)


def _check_teacher_inputs(source: RunPaths, step: int, cfg: RunConfig, needed: bool) -> None:
    if not needed:
        return
    if not source.teacher(step).exists():
        raise ValueError(f"{source.root}: step {step} has no teacher scores, but the replayed loss needs them (β > 0)")
    rollouts = read_table(source.rollouts(step), table="rollouts")
    wanted = kd_needed(rollouts, read_table(source.rewards(step), table="rewards"), cfg.loss)
    scores = read_table(source.teacher(step), table="teacher_logprobs")
    missing = scores.filter(wanted & pl.col("teacher_logprobs").is_null())
    if len(missing):
        raise ValueError(f"{source.teacher(step)}: {len(missing)} responses the new KD mask keeps were never "
                         f"scored (first {missing.select('prompt_id', 'sample_idx').row(0)}); replay with the "
                         "original kd_mask")
    if cfg.loss.kl_estimator == "topk" and scores["topk_ids"].null_count() == len(scores):
        raise ValueError(f"{source.teacher(step)}: no top-k teacher scores stored (teacher.top_k was 0)")


def _apply_optim(optimizer, scheduler, cfg: OptimConfig) -> None:
    """A loaded optimizer keeps the checkpoint's hyper-parameters; put the replay's in place."""
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, (f(scheduler.last_epoch) for f in scheduler.lr_lambdas)):
        group.update(lr=cfg.lr * factor, initial_lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def replay_update(source_dir: Path, step: int, overrides: list[str] | tuple[str, ...] = (), *,
                  dest_dir: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Re-run the update of `step` of the run in `source_dir` under `overrides`; returns the new
    run directory (default: a sibling named after the run, the step and the new config)."""
    source = RunPaths(Path(source_dir))
    if not source.config.exists():
        raise FileNotFoundError(f"{source.root} is not a run directory (no config.yaml)")
    # The run exists whatever today's objective checks say of it; a replay may not make a
    # meaningful objective meaningless, but may replay one an older version accepted.
    old = load_config(source.config, check_objective=False)
    cfg = load_config(source.config, overrides, check_objective=not objective_problems(old))
    _check_overrides(old, cfg)
    for table in ("rollouts", "rewards"):
        if not getattr(source, table)(step).exists():
            raise FileNotFoundError(f"{source.root}: iteration {step} has no {table} (was it generated?)")
    start = None if step == 0 else source.checkpoint(step - 1)
    if start is not None and not (start / "trainer_state.pt").exists():
        have = sorted(int(p.parent.parent.name.split("_")[1])
                      for p in source.root.glob("iter_*/checkpoint/trainer_state.pt"))
        raise FileNotFoundError(f"{source.root}: replaying step {step} needs the checkpoint of step {step - 1}; "
                                f"checkpoints exist for steps {have} (set run.checkpoint_every=1 to replay any step)")
    dest = RunPaths(Path(dest_dir) if dest_dir
                    else source.root.with_name(f"{source.root.name}-replay{step}-{cfg.hash()[:8]}"))
    if latest_checkpoint(dest) is not None:
        raise FileExistsError(f"{dest.root} already holds a replay; remove it or pass another destination")
    created = dest.root  # the topmost folder this call creates; removed again if the replay fails
    while not created.parent.exists():
        created = created.parent
    created = None if dest.root.exists() else created
    dest.root.mkdir(parents=True, exist_ok=True)
    try:
        _replay_into(source, dest, step, cfg, start, log=log)
    except TrainingDiverged:  # the replay ran: its folder holds the step's diverged.json
        raise
    except BaseException:  # a refusal below (teacher inputs, a damaged file) or a crash: leave no half-made run
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    log(f"[kdrl] replayed step {step} of {source.root.name} → {dest.root}")
    return dest.root


def _replay_into(source: RunPaths, dest: RunPaths, step: int, cfg: RunConfig, start: Path | None, *,
                 log: Callable[[str], None]) -> None:
    dest.config.write_text(dump_config(cfg))
    _link(source.prompts, dest.prompts)
    opened = load_run(cfg, dest.root, log=log)
    student = opened.student
    if start is not None:
        student.restore(start)
        _apply_optim(student.optimizer, student.scheduler, cfg.optim)
    _check_teacher_inputs(source, step, cfg,
                          teacher_needed(cfg, student.optimizer_step, has_teacher=opened.teacher is not None))
    for table in ("rollouts", "rewards", "teacher"):
        if getattr(source, table)(step).exists():
            _link(getattr(source, table)(step), getattr(dest, table)(step))
    original = (read_table(source.metrics(step), table="step_metrics").row(0, named=True)
                if source.metrics(step).exists() else {})
    seconds = {k: original.get(f"time_{k}_s", 0.0) for k in ("generate", "reward", "teacher")}
    teacher = Artifact.of(dest.teacher(step), seconds["teacher"]) if dest.teacher(step).exists() else None
    try:
        write_update(opened.info, student, opened.rollout, Artifact.of(dest.rollouts(step), seconds["generate"]),
                     Artifact.of(dest.rewards(step), seconds["reward"]), teacher, step)
        write_checkpoint(opened.info, student, step)
    finally:
        opened.close()
