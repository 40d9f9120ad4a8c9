"""A plain-Python KDRL training loop over the stages, writing the run directory as it goes.

It is the reference driver (notebooks, debugging, the embedded default) and the exact sequence
the Prefect flow runs: prompts → [generate → rewards → teacher → update → checkpoint] × steps,
with held-out evaluation before, every `run.eval_every` steps and after. Every intermediate is a
Parquet file under ``runs/<run_id>/``; rerunning a run id resumes from its latest checkpoint.

Seeds: rollouts of step s are sampled with seed (run.seed, s) and prompts chosen by a pure
function of (seed, s), so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl
import torch

from kdrl.batching import collate, join_step_tables
from kdrl.config import RunConfig, dump_config
from kdrl.data import build_prompts, sample_prompt_ids
from kdrl.embedded import resolve_model_path
from kdrl.engines.hf import HFRolloutEngine, HFTeacherScorer
from kdrl.models import load_causal_lm, load_tokenizer
from kdrl.stages import (
    batch_table,
    evaluate,
    generate_rollouts,
    kd_needed,
    score_rewards,
    score_teacher,
    summarize_evaluation,
)
from kdrl.storage import STEP_METRICS, RunPaths, read_table, write_table
from kdrl.train import beta_at, build_optimizer, load_trainer_state, save_checkpoint, update_step


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of iteration `step` (distinct per step, stable across restarts)."""
    return seed * 1_000_003 + step


@dataclass
class Session:
    """Everything resident between iterations: models, engines, optimizer, prompts."""

    cfg: RunConfig
    paths: RunPaths
    prompts: pl.DataFrame
    tokenizer: object
    student: torch.nn.Module
    teacher: torch.nn.Module | None
    student_engine: HFRolloutEngine
    teacher_engine: HFRolloutEngine | None
    scorer: HFTeacherScorer | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    optimizer_step: int = 0
    log: Callable[[str], None] = print

    @property
    def metadata(self) -> dict[str, str]:
        return {"kdrl.config_hash": self.cfg.hash(), "kdrl.run_id": self.paths.root.name}


def open_session(cfg: RunConfig, run_dir: Path, *, log: Callable[[str], None] = print) -> Session:
    """Load (training the embedded models on first use) student, teacher and prompts."""
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    torch.manual_seed(cfg.run.seed)
    paths = RunPaths(Path(run_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.config.write_text(dump_config(cfg))
    student_path = resolve_model_path(cfg.model.name_or_path, cfg, log=log)
    tokenizer = load_tokenizer(student_path)
    student = load_causal_lm(student_path, dtype=cfg.model.dtype, device=cfg.model.device)
    teacher = scorer = teacher_engine = None
    if cfg.uses_teacher or cfg.rollout.source == "teacher":
        teacher_path = resolve_model_path(cfg.teacher.name_or_path, cfg, log=log)
        teacher = load_causal_lm(teacher_path, dtype=cfg.teacher.dtype, device=cfg.teacher.device)
        scorer = HFTeacherScorer(teacher, load_tokenizer(teacher_path), student_tokenizer=tokenizer,
                                 max_tokens_per_batch=cfg.teacher.max_tokens_per_batch)
        teacher_engine = HFRolloutEngine(teacher, tokenizer, batch_size=cfg.rollout.batch_size)
    if paths.prompts.exists():
        prompts = read_table(paths.prompts, table="prompts")
    else:
        prompts = build_prompts(cfg.data, tokenizer)
        write_table(prompts, paths.prompts, table="prompts", metadata={"kdrl.config_hash": cfg.hash()})
    optimizer, scheduler = build_optimizer(student, cfg.optim, cfg.run.steps)
    return Session(cfg, paths, prompts, tokenizer, student, teacher,
                   HFRolloutEngine(student, tokenizer, batch_size=cfg.rollout.batch_size),
                   teacher_engine, scorer, optimizer, scheduler, log=log)


def run_iteration(s: Session, step: int) -> dict[str, float]:
    """One rollout batch → one update; writes rollouts, rewards, teacher, batch, metrics."""
    cfg, paths, meta = s.cfg, s.paths, s.metadata
    times: dict[str, float] = {}
    clock = time.perf_counter()
    train_ids = s.prompts.filter(pl.col("split") == "train")["prompt_id"].to_list()
    chosen = sample_prompt_ids(train_ids, step=step, count=cfg.rollout.prompts_per_step, seed=cfg.run.seed)
    prompts = s.prompts.filter(pl.col("prompt_id").is_in(chosen)).sort("prompt_id")
    engine = s.teacher_engine if cfg.rollout.source == "teacher" else s.student_engine
    rollouts = generate_rollouts(engine, prompts, step=step, n=cfg.rollout.samples_per_prompt,
                                 max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                 top_p=cfg.rollout.top_p, seed=step_seed(cfg.run.seed, step))
    write_table(rollouts, paths.rollouts(step), table="rollouts", metadata=meta)
    times["generate"], clock = time.perf_counter() - clock, time.perf_counter()

    rewards = score_rewards(rollouts, s.prompts, cfg.reward)
    write_table(rewards, paths.rewards(step), table="rewards", metadata=meta)
    times["reward"], clock = time.perf_counter() - clock, time.perf_counter()

    teacher = None
    if s.scorer is not None and cfg.uses_teacher and beta_at(s.optimizer_step, cfg.loss) > 0:
        teacher = score_teacher(s.scorer, rollouts, kd_needed(rollouts, rewards, cfg.loss), top_k=cfg.teacher.top_k)
        write_table(teacher, paths.teacher(step), table="teacher_logprobs", metadata=meta)
    times["teacher"], clock = time.perf_counter() - clock, time.perf_counter()

    batch = collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=s.tokenizer.pad_token_id)
    device = next(s.student.parameters()).device
    result = update_step(s.student, s.optimizer, s.scheduler, batch.to(device), loss_cfg=cfg.loss, optim_cfg=cfg.optim,
                         optimizer_step=s.optimizer_step, temperature=cfg.rollout.temperature)
    s.optimizer_step += cfg.loss.ppo_epochs
    s.student_engine.sync_weights()
    write_table(batch_table(batch.keys, result, batch.rewards_PG, batch.completion_mask_BT), paths.advantages(step),
                table="advantages", metadata=meta)
    times["update"] = time.perf_counter() - clock
    metrics = _step_metrics(step, result.metrics, rewards, rollouts, teacher, times)
    write_table(pl.DataFrame([metrics], schema=STEP_METRICS), paths.metrics(step), table="step_metrics", metadata=meta)
    return metrics


def _step_metrics(step, update_metrics, rewards, rollouts, teacher, times) -> dict:
    lengths = rollouts["completion_token_ids"].list.len()
    total = sum(times.values())
    teacher_tokens = 0 if teacher is None else int(teacher["teacher_logprobs"].list.len().sum() or 0)
    row = {name: float(update_metrics.get(name, 0.0)) for name in
           ("loss", "pg_loss", "kd_loss", "nll_loss", "beta", "lr", "grad_norm", "kl_k1_mean", "clip_frac", "kd_token_frac")}
    return {
        "step": step, **row,
        "reward_mean": float(rewards["reward"].mean()),
        "response_len_mean": float(lengths.mean()),
        "num_tokens": int(lengths.sum()),
        "teacher_tokens": teacher_tokens,
        "time_generate_s": times["generate"], "time_reward_s": times["reward"],
        "time_teacher_s": times["teacher"], "time_update_s": times["update"],
        "time_total_s": total, "tokens_per_s": float(lengths.sum()) / max(total, 1e-9),
    }


def evaluate_models(s: Session, step: int, *, include_teacher: bool = False) -> pl.DataFrame:
    """Held-out evaluation of the student (and the teacher); writes eval.parquet, returns the summary."""
    cfg = s.cfg
    heldout = s.prompts.filter(pl.col("split") == "heldout")
    engines = [("student", s.student_engine)] + ([("teacher", s.teacher_engine)] if include_teacher and s.teacher_engine else [])
    frames = [
        evaluate(engine, heldout, step=step, model_name=name, k=cfg.run.eval_samples, temperature=cfg.run.eval_temperature,
                 max_new_tokens=cfg.rollout.max_new_tokens, reward_cfg=cfg.reward, seed=step_seed(cfg.run.seed, -1))
        for name, engine in engines
    ]
    evaluations = pl.concat(frames)
    path = s.paths.offline / "eval_baseline.parquet" if step < 0 else s.paths.evaluation(step)
    write_table(evaluations, path, table="evaluations", metadata=s.metadata)
    return summarize_evaluation(evaluations)


def latest_checkpoint(paths: RunPaths) -> int | None:
    """The highest step with a complete checkpoint in the run directory, if any."""
    done = [int(p.parent.parent.name.split("_")[1]) for p in paths.root.glob("iter_*/checkpoint/trainer_state.pt")]
    return max(done) if done else None


def train(cfg: RunConfig, run_dir: Path, *, log: Callable[[str], None] = print) -> pl.DataFrame:
    """Train (or resume) the run in `run_dir`; returns the before/after evaluation summary."""
    s = open_session(cfg, run_dir, log=log)
    start = 0
    resumed = latest_checkpoint(s.paths)
    if resumed is not None:
        state = load_trainer_state(s.paths.checkpoint(resumed), model=s.student, optimizer=s.optimizer, scheduler=s.scheduler)
        s.optimizer_step, start = state["optimizer_step"], state["step"] + 1
        log(f"[kdrl] resuming {s.paths.root} after step {resumed}")
    before = evaluate_models(s, -1, include_teacher=True)
    log(_format_summary("before training (held-out)", before))
    for step in range(start, cfg.run.steps):
        m = run_iteration(s, step)
        log(f"[step {step:4d}] reward {m['reward_mean']:.3f}  len {m['response_len_mean']:.1f}  kl {m['kl_k1_mean']:+.4f}  "
            f"β {m['beta']:.4f}  loss {m['loss']:+.4f}  {m['time_total_s']:.2f}s "
            f"(gen {m['time_generate_s']:.2f} / teacher {m['time_teacher_s']:.2f} / update {m['time_update_s']:.2f})")
        last = step == cfg.run.steps - 1
        if last or (cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0):
            save_checkpoint(s.paths.checkpoint(step), model=s.student, tokenizer=s.tokenizer, optimizer=s.optimizer,
                            scheduler=s.scheduler, step=step, optimizer_step=s.optimizer_step)
        if not last and cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0:
            log(_format_summary(f"after step {step}", evaluate_models(s, step)))
    after = evaluate_models(s, cfg.run.steps - 1)
    table = pl.concat([before.with_columns(pl.lit("before").alias("when")), after.with_columns(pl.lit("after").alias("when"))])
    log(_format_summary("after training (held-out)", after))
    return table


def _format_summary(title: str, summary: pl.DataFrame) -> str:
    lines = [f"== {title}"]
    for row in summary.iter_rows(named=True):
        lines.append(f"   {row['model']:8s} pass@1 {row['pass_at_1']:.3f}  mean len {row['mean_len']:.1f}  "
                     f"p90 len {row['p90_len']}  ({row['num_prompts']} prompts, T={row['temperature']})")
    return "\n".join(lines)
