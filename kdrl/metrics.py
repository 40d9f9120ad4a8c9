"""The numbers a run reports: the STEP_METRICS row of an update, response-length statistics,
the train/inference log-prob gap, and the lines the CLI and the flow log."""

from __future__ import annotations

import polars as pl
import torch

from kdrl.perf import mfu
from kdrl.runs import summarize_evaluation
from kdrl.storage import LOGP_GAPS, RunPaths, read_table


def rollout_logprob_gap(trainer_logp_BT: torch.Tensor, sampler_logp_BT: torch.Tensor,
                        mask_BT: torch.Tensor) -> dict[str, float]:
    """Train/inference mismatch of the batch an update trained on: mean and max over completion
    tokens of |log π_trainer − log π_sampler|, the trainer's log-probs taken before the update
    (≈ 1e-6 with HF in fp32; bf16 vLLM sampling or a stale sync shows up here)."""
    gap_BT = (trainer_logp_BT.float() - sampler_logp_BT.to(trainer_logp_BT.device).float()).abs() * mask_BT
    count = float(mask_BT.sum())
    return {"rollout_logp_gap_mean": float(gap_BT.sum()) / max(count, 1.0),
            "rollout_logp_gap_max": float(gap_BT.max()) if count else 0.0}


def step_metrics(step, update_metrics, rewards, rollouts, teacher, times, gaps=None, *, peak_flops=None,
                 devices: int = 1) -> dict:
    """The STEP_METRICS row: update scalars, rewards, lengths, tokens, per-stage seconds, the
    train/inference log-prob gaps (NaN where not measured) and the update's MFU against
    `peak_flops` per device (NaN without one)."""
    lengths = rollouts["completion_token_ids"].list.len()
    truncated = rollouts["finish_reason"] == "length"
    gaps = gaps or {}
    total = sum(times.get(k, 0.0) for k in ("generate", "reward", "teacher", "update", "sync"))
    teacher_tokens = 0 if teacher is None else int(teacher["teacher_logprobs"].list.len().sum() or 0)
    row = {name: float(update_metrics.get(name, 0.0)) for name in
           ("loss", "pg_loss", "kd_loss", "nll_loss", "beta", "lr", "grad_norm", "kl_k1_mean", "clip_frac",
            "kd_token_frac")}
    return {
        "step": step, **row,
        "reward_mean": float(rewards["reward"].mean()),
        "response_len_mean": float(lengths.mean()),
        **response_stats(lengths, truncated, rewards["extracted_answer"]),
        **reward_stats(rewards),
        "kd_signal_share": float(update_metrics.get("kd_signal_share", float("nan"))),
        "entropy": float(update_metrics.get("entropy", float("nan"))),
        "model_flops": float(update_metrics.get("model_flops", float("nan"))),
        "mfu": mfu(update_metrics.get("model_flops", 0.0), times.get("update", 0.0), peak_flops, devices),
        "num_tokens": int(lengths.sum()),
        "teacher_tokens": teacher_tokens,
        "time_generate_s": times.get("generate", 0.0), "time_reward_s": times.get("reward", 0.0),
        "time_teacher_s": times.get("teacher", 0.0), "time_update_s": times.get("update", 0.0),
        "time_sync_s": times.get("sync", 0.0), "time_total_s": total,
        "tokens_per_s": float(lengths.sum()) / max(total, 1e-9),
        **{name: float(gaps.get(name, float("nan"))) for name in LOGP_GAPS},
    }


def response_stats(lengths: pl.Series, truncated: pl.Series, extracted: pl.Series) -> dict[str, float]:
    """Length quantiles (p50, p90: nearest rank; max) of the responses, the fraction cut at
    max_new_tokens, and the fraction in which no answer was found.

    >>> stats = response_stats(pl.Series(range(1, 11)), pl.Series([False] * 9 + [True]),
    ...                        pl.Series(["1"] * 8 + [None] * 2))
    >>> [stats[k] for k in ("response_len_p50", "response_len_p90", "response_len_max", "truncated_frac",
    ...                     "no_answer_frac")]
    [5.0, 9.0, 10.0, 0.1, 0.2]
    """
    quantile = lambda q: float(lengths.quantile(q, interpolation="lower"))
    return {"response_len_p50": quantile(0.5), "response_len_p90": quantile(0.9),
            "response_len_max": float(lengths.max()),
            "truncated_frac": float(truncated.mean()), "no_answer_frac": float(extracted.is_null().mean())}


def reward_stats(rewards: pl.DataFrame) -> dict[str, float]:
    """The std of the rewards (population, over all responses) and the fraction of prompt groups
    whose responses all have the same reward, hence advantage 0 and no GRPO signal.

    >>> reward_stats(pl.DataFrame({"prompt_id": [0, 0, 1, 1], "reward": [1.0, 1.0, 0.0, 1.0]}))
    {'reward_std': 0.4330127018922193, 'zero_std_group_frac': 0.5}
    """
    groups = rewards.group_by("prompt_id").agg(flat=pl.col("reward").max() == pl.col("reward").min())
    return {"reward_std": float(rewards["reward"].std(ddof=0)), "zero_std_group_frac": float(groups["flat"].mean())}


def format_step(m: dict) -> str:
    cut = f" cut {m['truncated_frac']:.0%}" if m.get("truncated_frac") else ""
    return (f"[step {m['step']:4d}] reward {m['reward_mean']:.3f}  len {m['response_len_mean']:.1f} "
            f"(p90 {m['response_len_p90']:.0f}, max {m['response_len_max']:.0f}{cut})  kl {m['kl_k1_mean']:+.4f}  "
            f"β {m['beta']:.4f}  loss {m['loss']:+.4f}  {m['time_total_s']:.2f}s "
            f"(gen {m['time_generate_s']:.2f} / teacher {m['time_teacher_s']:.2f} / update {m['time_update_s']:.2f}"
            + (f" / sync {m['time_sync_s']:.2f}, gap {m['sync_logp_gap_max']:.1e}" if m.get("time_sync_s") else "")
            + ")")


def before_after(paths: RunPaths, last_step: int) -> pl.DataFrame:
    """Held-out summary before training (baseline) and after `last_step`, with a `when` column."""
    before = summarize_evaluation(read_table(paths.offline / "eval_baseline.parquet", table="evaluations"))
    after = summarize_evaluation(read_table(paths.evaluation(last_step), table="evaluations"))
    return pl.concat([before.with_columns(pl.lit("before").alias("when")),
                      after.with_columns(pl.lit("after").alias("when"))])


def format_summary(title: str, summary: pl.DataFrame) -> str:
    lines = [f"== {title}"]
    for row in summary.iter_rows(named=True):
        lines.append(f"   {row['model']:8s} pass@1 {row['pass_at_1']:.3f}  mean len {row['mean_len']:.1f}  "
                     f"p90 len {row['p90_len']}  ({row['num_prompts']} prompts, T={row['temperature']:g})")
    return "\n".join(lines)
