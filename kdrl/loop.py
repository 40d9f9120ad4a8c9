"""The training run as path-level stages over a run directory, and a plain-Python driver.

Each ``stage_*`` function reads its inputs from the run directory, calls the pure stages in
`kdrl.stages`, writes one new Parquet file and returns a `StageOutput` (path, seconds). The
Prefect tasks in `tasks/` wrap exactly these functions; `train` below chains them without
Prefect (notebooks, debugging). Both write the same files:

    offline:  prompts → [teacher samples, SFT only] → baseline evaluation
    online:   generate → rewards → teacher → update (+ checkpoint) [→ evaluate]   per step

The `Session` keeps models, engines and the optimizer resident between stages. Opening it on a
run directory that has checkpoints resumes after the latest one; since prompts and sampling
seeds are pure functions of (seed, step), a resumed run reproduces an uninterrupted one (HF
engines; a vLLM engine on CPU is seeded once per process, see `kdrl.engines.vllm`).

Engines (``rollout.engine``, ``teacher.engine``: hf | vllm | auto) are resolved when the session
opens (`kdrl.engines.select`), recorded in every Parquet file's metadata, and built on first use.
A vLLM rollout engine gets the trainer's weights after every update (`stage_update`: timed, and
every ``rollout.sync_check_every`` syncs checked against the trainer's log-probs) and before any
use that finds it stale (a resumed run, an engine first built after some updates).
"""

from __future__ import annotations

import gc
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import polars as pl
import torch

from kdrl.batching import collate, join_step_tables
from kdrl.config import RunConfig, dump_config, load_config
from kdrl.data import build_prompts, run_prompt_limit, sample_prompt_ids
from kdrl.embedded import resolve_model_path
from kdrl.engines.base import RolloutEngine, TeacherScorer
from kdrl.engines.hf import HFRolloutEngine, HFTeacherScorer, check_same_tokenizer
from kdrl.engines.select import EngineChoice, choose_engine, count_parameters
from kdrl.models import load_causal_lm, load_tokenizer, resolve_device
from kdrl.prompts import check_same_rendering, warn_if_chat_model
from kdrl.runs import latest_checkpoint
from kdrl.stages import (
    batch_table,
    evaluate_passes,
    generate_rollouts,
    kd_needed,
    score_rewards,
    score_teacher,
    summarize_evaluation,
)
from kdrl.storage import LOGP_GAPS, STEP_METRICS, RunPaths, read_table, write_table
from kdrl.train import TrainingDiverged, beta_at, build_optimizer, load_trainer_state, save_checkpoint, update_step

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


@dataclass(frozen=True)
class StageOutput:
    """What a stage hands to the next: the file it wrote (None if it had nothing to do)."""

    path: str | None
    seconds: float


@dataclass
class Session:
    """Everything resident between stages: models, engines, optimizer, prompts, counters."""

    cfg: RunConfig
    paths: RunPaths
    prompts: pl.DataFrame
    tokenizer: object
    student: torch.nn.Module
    student_path: str
    teacher_path: str | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    next_step: int = 0
    optimizer_step: int = 0
    log: Callable[[str], None] = print
    rollout_choice: EngineChoice = field(default_factory=lambda: EngineChoice("hf", "rollout.engine=hf"))
    teacher_choice: EngineChoice = field(default_factory=lambda: EngineChoice("hf", "teacher.engine=hf"))
    _teacher: torch.nn.Module | None = field(default=None, repr=False)
    _rollout: RolloutEngine | None = field(default=None, repr=False)
    _rollout_at: int = field(default=0, repr=False)  # optimizer step whose weights the engine holds
    _teacher_vllm: object | None = field(default=None, repr=False)  # a VLLMRolloutEngine on the teacher

    @property
    def metadata(self) -> dict[str, str]:
        return {"kdrl.config_hash": self.cfg.hash(), "kdrl.run_id": self.paths.root.name,
                "kdrl.rollout_engine": self.rollout_choice.engine, "kdrl.teacher_engine": self.teacher_choice.engine}

    @property
    def student_engine(self) -> RolloutEngine:
        """The rollout engine, built on first use and holding the trainer's current weights."""
        cfg = self.cfg
        if self._rollout is None:
            if self.rollout_choice.engine == "vllm":
                from kdrl.engines.vllm import VLLMRolloutEngine, VLLMSettings, build_llm

                settings = VLLMSettings.from_config(cfg.rollout.vllm, model_dtype=cfg.model.dtype)
                started = time.perf_counter()
                llm = build_llm(self.student_path, settings=settings, seed=cfg.run.seed)
                self.log(f"[kdrl] vLLM rollout engine on {self.student_path} started in {time.perf_counter() - started:.1f}s")
                self._rollout = VLLMRolloutEngine(llm, self.tokenizer, trainer_model=self.student, sleep_mode=settings.sleeps)
                self._rollout_at = 0  # built from the initial weights
            else:
                self._rollout = HFRolloutEngine(self.student, self.tokenizer, batch_size=cfg.rollout.batch_size)
                self._rollout_at = self.optimizer_step  # it runs on the trainer's own module
        if self._rollout_at != self.optimizer_step:
            self.sync_rollout_engine()
        return self._rollout

    def sync_rollout_engine(self) -> float | None:
        """Push the trainer's weights into a built vLLM rollout engine; seconds (None: nothing to do)."""
        if self._rollout is None or self.rollout_choice.engine != "vllm":
            self._rollout_at = self.optimizer_step
            return None
        seconds = self._rollout.sync_weights()
        self._rollout_at = self.optimizer_step
        return seconds

    def teacher(self) -> torch.nn.Module:
        """The HF teacher model, loaded on first use (and again after `release_teacher`)."""
        if self.teacher_path is None:
            raise ValueError("this run has no teacher (β = 0 and rollout.source = student)")
        if self._teacher is None:
            self._teacher = load_causal_lm(self.teacher_path, dtype=self.cfg.teacher.dtype, device=self.cfg.teacher.device)
        return self._teacher

    def teacher_vllm(self):
        """The teacher's vLLM engine (a `VLLMRolloutEngine`), built on first use, awake."""
        if self.teacher_path is None:
            raise ValueError("this run has no teacher (β = 0 and rollout.source = student)")
        if self._teacher_vllm is None:
            from kdrl.engines.vllm import VLLMRolloutEngine, VLLMSettings, build_llm

            settings = VLLMSettings.from_config(self.cfg.teacher.vllm, model_dtype=self.cfg.teacher.dtype)
            started = time.perf_counter()
            llm = build_llm(self.teacher_path, settings=settings, seed=self.cfg.run.seed, max_logprobs=self.cfg.teacher.top_k)
            self.log(f"[kdrl] vLLM teacher engine on {self.teacher_path} started in {time.perf_counter() - started:.1f}s")
            self._teacher_vllm = VLLMRolloutEngine(llm, self.tokenizer, sleep_mode=settings.sleeps)
        self._teacher_vllm.wake()
        return self._teacher_vllm

    def teacher_scorer(self) -> TeacherScorer:
        """Scores completions under the teacher, on the configured engine."""
        if self.teacher_choice.engine == "vllm":
            from kdrl.engines.vllm import VLLMTeacherScorer

            return VLLMTeacherScorer(self.teacher_vllm().llm)
        return HFTeacherScorer(self.teacher(), self.tokenizer, max_tokens_per_batch=self.cfg.teacher.max_tokens_per_batch)

    def teacher_sampler(self) -> RolloutEngine:
        """Samples from the teacher (SFT data, baseline evaluation), on the configured engine."""
        if self.teacher_choice.engine == "vllm":
            return self.teacher_vllm()
        return HFRolloutEngine(self.teacher(), self.tokenizer, batch_size=self.cfg.rollout.batch_size)

    def release_teacher(self) -> None:
        """With `teacher.offload`: drop the HF teacher from memory, or put a vLLM teacher to sleep
        (the student stays)."""
        if not self.cfg.teacher.offload:
            return
        if self._teacher_vllm is not None:
            self._teacher_vllm.sleep()  # a no-op where the engine cannot sleep (CPU)
        if self._teacher is not None:
            self._teacher = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def close(self) -> None:
        """Free the engines and the teacher now, all together. vLLM engines sit in reference
        cycles, so without the explicit collection they would be freed at some later gc pass,
        possibly while the next session's engines live, which breaks those (vLLM's shared
        parallel state)."""
        self._rollout = self._teacher_vllm = self._teacher = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def resolve_engines(cfg: RunConfig, *, student: torch.nn.Module, teacher_path: str | None) -> tuple[EngineChoice, EngineChoice]:
    """The engines of the rollout and teacher stages (see `kdrl.engines.select`)."""
    from kdrl.engines.vllm import VLLMSettings, vllm_available

    installed = vllm_available()
    rollout = choose_engine(cfg.rollout.engine, field="rollout.engine", num_params=sum(p.numel() for p in student.parameters()),
                            device=resolve_device(cfg.model.device).type, vllm_installed=installed)
    if teacher_path is None:
        return rollout, EngineChoice("hf", "no teacher")
    sleeps = VLLMSettings.from_config(cfg.teacher.vllm, model_dtype=cfg.teacher.dtype).sleeps
    teacher = choose_engine(cfg.teacher.engine, field="teacher.engine", num_params=lambda: count_parameters(teacher_path),
                            device=resolve_device(cfg.teacher.device).type, vllm_installed=installed,
                            must_release=cfg.teacher.offload and not sleeps)
    return rollout, teacher


def _check_run_config(cfg: RunConfig, paths: RunPaths) -> None:
    if paths.config.exists():
        existing = load_config(paths.config, check_objective=False)  # as it was written, even if refused today
        if existing.hash() != cfg.hash():
            raise ValueError(
                f"{paths.root} was started with another config (hash {existing.hash()}, now {cfg.hash()}); "
                "use a new --run-id, or `kdrl replay` for counterfactual updates"
            )
    else:
        paths.root.mkdir(parents=True, exist_ok=True)
        paths.config.write_text(dump_config(cfg))


def open_session(cfg: RunConfig, run_dir: Path, *, log: Callable[[str], None] = print) -> Session:
    """Load the student (training embedded models on first use), build the optimizer, write the
    prompts table if missing, and resume after the latest checkpoint if there is one."""
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)  # nothing of ours draws from it, but checkpoints store its state: same run, same bytes
    paths = RunPaths(Path(run_dir))
    student_path = resolve_model_path(cfg.model.name_or_path, cfg, log=log)
    teacher_path = resolve_model_path(cfg.teacher.name_or_path, cfg, log=log) if cfg.loads_teacher else None
    from kdrl.memory import check_memory  # before any weights load and the run folder is written: a refused run can change its config

    check_memory(cfg, student_path, teacher_path, run_dir=paths.root, log=log)
    _check_run_config(cfg, paths)
    tokenizer = load_tokenizer(student_path)
    student = load_causal_lm(student_path, dtype=cfg.model.dtype, device=cfg.model.device)
    if cfg.model.gradient_checkpointing:  # recompute each layer in backward (generation, in eval mode, keeps its cache)
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.lora is not None:  # train an adapter instead of every weight (kdrl.lora)
        from kdrl.lora import apply_lora

        student = apply_lora(student, cfg.model.lora, seed=cfg.run.seed)
    if teacher_path is not None:
        teacher_tokenizer = load_tokenizer(teacher_path)
        check_same_tokenizer(tokenizer, teacher_tokenizer)
    warn_if_chat_model(cfg.data, tokenizer, student_path)
    if paths.prompts.exists():
        prompts = read_table(paths.prompts, table="prompts")
    else:
        limit = run_prompt_limit(cfg, student.config, tokenizer, teacher=teacher_path)
        prompts = build_prompts(cfg.data, tokenizer, max_prompt_tokens=limit)
    if teacher_path is not None:  # before the prompts are written: a refused run leaves no prompts table
        check_same_rendering(cfg.data, prompts["question"].to_list(), prompts["prompt_token_ids"].to_list(),
                             tokenizer, teacher_tokenizer)
    if not paths.prompts.exists():
        write_table(prompts, paths.prompts, table="prompts", metadata={"kdrl.config_hash": cfg.hash()})
    optimizer, scheduler = build_optimizer(student, cfg.optim, cfg.run.steps * cfg.loss.ppo_epochs)
    rollout_choice, teacher_choice = resolve_engines(cfg, student=student, teacher_path=teacher_path)
    log(f"[kdrl] engines: rollout {rollout_choice.engine} ({rollout_choice.reason}); "
        f"teacher {teacher_choice.engine} ({teacher_choice.reason})")
    s = Session(cfg, paths, read_table(paths.prompts, table="prompts"), tokenizer, student, student_path, teacher_path,
                optimizer, scheduler, log=log, rollout_choice=rollout_choice, teacher_choice=teacher_choice)
    resumed = latest_checkpoint(paths)
    if resumed is not None:
        state = load_trainer_state(paths.checkpoint(resumed), model=student, optimizer=optimizer, scheduler=scheduler)
        s.optimizer_step, s.next_step = state["optimizer_step"], state["step"] + 1
        log(f"[kdrl] resuming {paths.root} after step {resumed}")
    return s


def _timed(fn):
    started = time.perf_counter()
    path = fn()
    return StageOutput(None if path is None else str(path), time.perf_counter() - started)


def stage_teacher_samples(s: Session) -> StageOutput:
    """Offline, SFT only: G teacher samples for every training prompt the run's steps will draw,
    with their rewards, and (teacher.top_k > 0) the teacher's top-k per position →
    offline/teacher_{samples,rewards,logprobs}.parquet. The sampled tokens' teacher log-probs are
    the samples' sampler_logprobs."""
    cfg, offline = s.cfg, s.paths.offline
    if (offline / "teacher_samples.parquet").exists():  # written last: the record is complete
        return StageOutput(str(offline / "teacher_samples.parquet"), 0.0)

    def run():
        train_ids = s.prompts.filter(pl.col("split") == "train")["prompt_id"].to_list()
        drawn = {pid for step in range(cfg.run.steps)
                 for pid in sample_prompt_ids(train_ids, step=step, count=cfg.rollout.prompts_per_step, seed=cfg.run.seed)}
        train = s.prompts.filter(pl.col("prompt_id").is_in(sorted(drawn)))
        samples = generate_rollouts(s.teacher_sampler(), train, step=-1, n=cfg.rollout.samples_per_prompt, max_new_tokens=cfg.rollout.max_new_tokens,
                                    temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, seed=step_seed(cfg.run.seed, -2))
        if cfg.teacher.top_k > 0:
            scores = score_teacher(s.teacher_scorer(), samples, pl.Series([True] * len(samples)), top_k=cfg.teacher.top_k)
            write_table(scores, offline / "teacher_logprobs.parquet", table="teacher_logprobs", metadata=s.metadata)
        s.release_teacher()
        write_table(score_rewards(samples, s.prompts, cfg.reward), offline / "teacher_rewards.parquet", table="rewards", metadata=s.metadata)
        return write_table(samples, offline / "teacher_samples.parquet", table="rollouts", metadata=s.metadata)

    return _timed(run)


def stage_generate(s: Session, step: int) -> StageOutput:
    """Rollouts of `step`: the step's prompts, G samples each, from the current student (or,
    for SFT, the precomputed teacher samples of those prompts)."""
    cfg = s.cfg

    def run():
        train_ids = s.prompts.filter(pl.col("split") == "train")["prompt_id"].to_list()
        chosen = sample_prompt_ids(train_ids, step=step, count=cfg.rollout.prompts_per_step, seed=cfg.run.seed)
        if cfg.rollout.source == "teacher":
            pool = read_table(s.paths.offline / "teacher_samples.parquet", table="rollouts")
            rollouts = pool.filter(pl.col("prompt_id").is_in(chosen)).with_columns(pl.lit(step, pl.Int64).alias("step"))
        else:
            prompts = s.prompts.filter(pl.col("prompt_id").is_in(chosen)).sort("prompt_id")
            engine = s.student_engine
            rollouts = generate_rollouts(engine, prompts, step=step, n=cfg.rollout.samples_per_prompt,
                                         max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                         top_p=cfg.rollout.top_p, seed=step_seed(cfg.run.seed, step))
            engine.sleep()  # vLLM with sleep mode: the GPU is the trainer's until the sync
        maybe_fault("generate", step)
        return write_table(rollouts, s.paths.rollouts(step), table="rollouts", metadata=s.metadata)

    return _timed(run)


def stage_rewards(s: Session, step: int) -> StageOutput:
    """Binary rewards of the step's rollouts."""

    def run():
        rewards = score_rewards(read_table(s.paths.rollouts(step), table="rollouts"), s.prompts, s.cfg.reward)
        maybe_fault("rewards", step)
        return write_table(rewards, s.paths.rewards(step), table="rewards", metadata=s.metadata)

    return _timed(run)


def teacher_needed(s: Session, step: int) -> bool:
    """Whether step `step` uses teacher scores (β > 0 at this optimizer step)."""
    return s.teacher_path is not None and s.cfg.uses_teacher and beta_at(s.optimizer_step, s.cfg.loss) > 0


def stage_teacher(s: Session, step: int) -> StageOutput:
    """Teacher log-probs of the KD-unmasked rollouts (masked rows stay null), or nothing when
    this step needs no teacher."""

    def run():
        if not teacher_needed(s, step):
            return None
        rollouts = read_table(s.paths.rollouts(step), table="rollouts")
        rewards = read_table(s.paths.rewards(step), table="rewards")
        scores = score_teacher(s.teacher_scorer(), rollouts, kd_needed(rollouts, rewards, s.cfg.loss), top_k=s.cfg.teacher.top_k)
        s.release_teacher()
        maybe_fault("teacher", step)
        return write_table(scores, s.paths.teacher(step), table="teacher_logprobs", metadata=s.metadata)

    return _timed(run)


def stage_update(s: Session, step: int, seconds: dict[str, float]) -> StageOutput:
    """One optimizer step (or ppo_epochs) from the step's Parquet inputs; writes batch.parquet,
    metrics.parquet (with the stage seconds given) and, when due, the checkpoint."""
    cfg, paths = s.cfg, s.paths
    started = time.perf_counter()
    rollouts = read_table(paths.rollouts(step), table="rollouts")
    rewards = read_table(paths.rewards(step), table="rewards")
    teacher = read_table(paths.teacher(step), table="teacher_logprobs") if paths.teacher(step).exists() and teacher_needed(s, step) else None
    batch = collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=s.tokenizer.pad_token_id)
    device = next(s.student.parameters()).device
    try:
        result = update_step(s.student, s.optimizer, s.scheduler, batch.to(device), loss_cfg=cfg.loss, optim_cfg=cfg.optim,
                             optimizer_step=s.optimizer_step, temperature=cfg.rollout.temperature)
    except TrainingDiverged as err:
        report = paths.iter_dir(step) / DIVERGED_FILE
        report.write_text(json.dumps({"step": step, "error": str(err), **err.diagnostics}, indent=2, default=str) + "\n")
        raise TrainingDiverged(f"step {step}, {err} — no metrics or checkpoint written for it; diagnostics in {report}. "
                               "Usual causes: optim.lr too high, optim.grad_clip=0, a teacher that gives -inf log-probs.",
                               err.diagnostics) from None
    s.optimizer_step += cfg.loss.ppo_epochs
    times = {**seconds, "update": time.perf_counter() - started}
    gaps = rollout_logprob_gap(result.student_logp_BT, batch.sampler_logp_BT, batch.completion_mask_BT.to(device)) \
        if cfg.rollout.source == "student" else {}
    sync_seconds = s.sync_rollout_engine()
    if sync_seconds is not None:
        times["sync"] = sync_seconds
        if cfg.rollout.sync_check_every and step % cfg.rollout.sync_check_every == 0:
            sample = rollouts.head(cfg.rollout.sync_check_samples)
            gap_max, gap_mean = s.student_engine.logprob_gap(sample["prompt_token_ids"].to_list(),
                                                             sample["completion_token_ids"].to_list())
            gaps.update(sync_logp_gap_max=gap_max, sync_logp_gap_mean=gap_mean)
    maybe_fault("update", step)
    write_table(batch_table(batch.keys, result, batch.rewards_PG, batch.completion_mask_BT), paths.advantages(step),
                table="advantages", metadata=s.metadata)
    metrics = step_metrics(step, result.metrics, rewards, rollouts, teacher, times, gaps)
    write_table(pl.DataFrame([metrics], schema=STEP_METRICS), paths.metrics(step), table="step_metrics", metadata=s.metadata)
    if step == cfg.run.steps - 1 or (cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0):
        save_checkpoint(paths.checkpoint(step), model=s.student, tokenizer=s.tokenizer, optimizer=s.optimizer,
                        scheduler=s.scheduler, step=step, optimizer_step=s.optimizer_step)
    s.next_step = step + 1
    return StageOutput(str(paths.metrics(step)), times["update"])


def rollout_logprob_gap(trainer_logp_BT: torch.Tensor, sampler_logp_BT: torch.Tensor, mask_BT: torch.Tensor) -> dict[str, float]:
    """Train/inference mismatch of the batch an update trained on: mean and max over completion
    tokens of |log π_trainer − log π_sampler|, the trainer's log-probs taken before the update
    (≈ 1e-6 with HF in fp32; bf16 vLLM sampling or a stale sync shows up here)."""
    gap_BT = (trainer_logp_BT.float() - sampler_logp_BT.to(trainer_logp_BT.device).float()).abs() * mask_BT
    count = float(mask_BT.sum())
    return {"rollout_logp_gap_mean": float(gap_BT.sum()) / max(count, 1.0), "rollout_logp_gap_max": float(gap_BT.max()) if count else 0.0}


def step_metrics(step, update_metrics, rewards, rollouts, teacher, times, gaps=None) -> dict:
    """The STEP_METRICS row: update scalars, rewards, lengths, tokens, per-stage seconds and the
    train/inference log-prob gaps (NaN where not measured)."""
    lengths = rollouts["completion_token_ids"].list.len()
    truncated = rollouts["finish_reason"] == "length"
    gaps = gaps or {}
    total = sum(times.get(k, 0.0) for k in ("generate", "reward", "teacher", "update", "sync"))
    teacher_tokens = 0 if teacher is None else int(teacher["teacher_logprobs"].list.len().sum() or 0)
    row = {name: float(update_metrics.get(name, 0.0)) for name in
           ("loss", "pg_loss", "kd_loss", "nll_loss", "beta", "lr", "grad_norm", "kl_k1_mean", "clip_frac", "kd_token_frac")}
    return {
        "step": step, **row,
        "reward_mean": float(rewards["reward"].mean()),
        "response_len_mean": float(lengths.mean()),
        **response_stats(lengths, truncated, rewards["extracted_answer"]),
        "num_tokens": int(lengths.sum()),
        "teacher_tokens": teacher_tokens,
        "time_generate_s": times.get("generate", 0.0), "time_reward_s": times.get("reward", 0.0),
        "time_teacher_s": times.get("teacher", 0.0), "time_update_s": times.get("update", 0.0),
        "time_sync_s": times.get("sync", 0.0), "time_total_s": total, "tokens_per_s": float(lengths.sum()) / max(total, 1e-9),
        **{name: float(gaps.get(name, float("nan"))) for name in LOGP_GAPS},
    }


def response_stats(lengths: pl.Series, truncated: pl.Series, extracted: pl.Series) -> dict[str, float]:
    """Length quantiles (p50, p90: nearest rank; max) of the responses, the fraction cut at
    max_new_tokens, and the fraction in which no answer was found.

    >>> stats = response_stats(pl.Series(range(1, 11)), pl.Series([False] * 9 + [True]), pl.Series(["1"] * 8 + [None] * 2))
    >>> [stats[k] for k in ("response_len_p50", "response_len_p90", "response_len_max", "truncated_frac", "no_answer_frac")]
    [5.0, 9.0, 10.0, 0.1, 0.2]
    """
    quantile = lambda q: float(lengths.quantile(q, interpolation="lower"))
    return {"response_len_p50": quantile(0.5), "response_len_p90": quantile(0.9), "response_len_max": float(lengths.max()),
            "truncated_frac": float(truncated.mean()), "no_answer_frac": float(extracted.is_null().mean())}


def stage_evaluate(s: Session, step: int, *, include_teacher: bool = False) -> StageOutput:
    """Held-out evaluation of the student (and the teacher) after `step`; step −1 is the
    baseline before training (offline/eval_baseline.parquet). An evaluation file, once written,
    is the record: it is returned as is, never recomputed. The student evaluated is the
    session's, which must be at `step` (for the baseline of a resumed run: the initial weights,
    loaded again)."""
    cfg = s.cfg
    path = s.paths.offline / "eval_baseline.parquet" if step < 0 else s.paths.evaluation(step)
    if path.exists():
        return StageOutput(str(path), 0.0)
    if step >= 0 and step != s.next_step - 1:
        raise ValueError(f"cannot evaluate step {step}: the session's student is at step {s.next_step - 1}")

    def run():
        heldout = s.prompts.filter(pl.col("split") == "heldout")

        def passes(name: str, engine: RolloutEngine) -> pl.DataFrame:
            return evaluate_passes(engine, heldout, step=step, model_name=name, k=cfg.run.eval_samples,
                                   temperature=cfg.run.eval_temperature, greedy=cfg.run.eval_greedy,
                                   max_new_tokens=cfg.rollout.max_new_tokens, reward_cfg=cfg.reward,
                                   seed=step_seed(cfg.run.seed, -1))

        if step < 0 and s.next_step > 0:  # the baseline of a resumed run: the initial weights again
            initial = load_causal_lm(s.student_path, dtype=cfg.model.dtype, device=cfg.model.device)
            frames = [passes("student", HFRolloutEngine(initial, s.tokenizer, batch_size=cfg.rollout.batch_size))]
        else:
            frames = [passes("student", s.student_engine)]
        if include_teacher and s.teacher_path:
            frames.append(passes("teacher", s.teacher_sampler()))
        s.release_teacher()
        maybe_fault("evaluate", step)
        return write_table(pl.concat(frames), path, table="evaluations", metadata=s.metadata)

    return _timed(run)


def evaluation_due(cfg: RunConfig, step: int) -> bool:
    """Evaluate after `step`? Every run.eval_every steps and after the last one."""
    return step == cfg.run.steps - 1 or bool(cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0)


def run_iteration(s: Session, step: int) -> dict[str, float]:
    """generate → rewards → teacher → update for one step; returns the metrics row."""
    seconds = {
        "generate": stage_generate(s, step).seconds,
        "reward": stage_rewards(s, step).seconds,
        "teacher": stage_teacher(s, step).seconds,
    }
    stage_update(s, step, seconds)
    return read_table(s.paths.metrics(step), table="step_metrics").row(0, named=True)


def format_step(m: dict) -> str:
    cut = f" cut {m['truncated_frac']:.0%}" if m.get("truncated_frac") else ""
    return (f"[step {m['step']:4d}] reward {m['reward_mean']:.3f}  len {m['response_len_mean']:.1f} "
            f"(p90 {m['response_len_p90']:.0f}, max {m['response_len_max']:.0f}{cut})  kl {m['kl_k1_mean']:+.4f}  "
            f"β {m['beta']:.4f}  loss {m['loss']:+.4f}  {m['time_total_s']:.2f}s "
            f"(gen {m['time_generate_s']:.2f} / teacher {m['time_teacher_s']:.2f} / update {m['time_update_s']:.2f}"
            + (f" / sync {m['time_sync_s']:.2f}, gap {m['sync_logp_gap_max']:.1e}" if m.get("time_sync_s") else "") + ")")


def before_after(paths: RunPaths, last_step: int) -> pl.DataFrame:
    """Held-out summary before training (baseline) and after `last_step`, with a `when` column."""
    before = summarize_evaluation(read_table(paths.offline / "eval_baseline.parquet", table="evaluations"))
    after = summarize_evaluation(read_table(paths.evaluation(last_step), table="evaluations"))
    return pl.concat([before.with_columns(pl.lit("before").alias("when")), after.with_columns(pl.lit("after").alias("when"))])


def train(cfg: RunConfig, run_dir: Path, *, log: Callable[[str], None] = print) -> pl.DataFrame:
    """Train (or resume) the run in `run_dir` without Prefect; returns the before/after summary."""
    s = open_session(cfg, run_dir, log=log)
    try:
        if cfg.rollout.source == "teacher":
            stage_teacher_samples(s)
        baseline = s.paths.offline / "eval_baseline.parquet"
        if not baseline.exists():
            stage_evaluate(s, -1, include_teacher=True)
        log(format_summary("before training (held-out)", summarize_evaluation(read_table(baseline, table="evaluations"))))
        resumed_after = s.next_step - 1  # killed during the evaluation after a checkpointed step?
        if resumed_after >= 0 and evaluation_due(cfg, resumed_after) and not s.paths.evaluation(resumed_after).exists():
            stage_evaluate(s, resumed_after)
        for step in range(s.next_step, cfg.run.steps):
            log(format_step(run_iteration(s, step)))
            if evaluation_due(cfg, step):
                out = stage_evaluate(s, step)
                log(format_summary(f"after step {step}", summarize_evaluation(read_table(out.path, table="evaluations"))))
        return before_after(s.paths, cfg.run.steps - 1)
    finally:
        s.close()


def format_summary(title: str, summary: pl.DataFrame) -> str:
    lines = [f"== {title}"]
    for row in summary.iter_rows(named=True):
        lines.append(f"   {row['model']:8s} pass@1 {row['pass_at_1']:.3f}  mean len {row['mean_len']:.1f}  "
                     f"p90 len {row['p90_len']}  ({row['num_prompts']} prompts, T={row['temperature']:g})")
    return "\n".join(lines)
