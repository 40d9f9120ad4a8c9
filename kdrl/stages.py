"""One function per pipeline stage: engines and models in, a table (polars, declared schema) out.

`kdrl.pipeline` wraps them (read the input files → call a stage → write Parquet). None of them
does I/O, so a notebook can call them too.

    prompts ─▶ generate_rollouts ─▶ rollouts ─▶ score_rewards ─▶ rewards
    rollouts + rewards ─▶ score_teacher (skips KD-masked responses) ─▶ teacher
    rollouts + rewards + teacher ─▶ collate ─▶ train.update_step ─▶ batch_table, metrics
"""

from __future__ import annotations

import polars as pl
import torch

from kdrl.config import LossConfig, RewardConfig
from kdrl.engines.base import RolloutEngine, TeacherScorer
from kdrl.rewards import score_batch
from kdrl.runs import summarize_evaluation  # noqa: F401  (re-exported: it moved to kdrl.runs)
from kdrl.storage import ADVANTAGES, EVALUATIONS, KEY, REWARDS, ROLLOUTS, TEACHER_LOGPROBS
from kdrl.train import UpdateResult, kd_mask_B


def generate_rollouts(
    engine: RolloutEngine,
    prompts: pl.DataFrame,
    *,
    step: int,
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int,
) -> pl.DataFrame:
    """`n` samples for each row of `prompts` (PROMPTS rows) → a ROLLOUTS table for `step`."""
    out = engine.generate(
        prompts["prompt_token_ids"].to_list(), n=n, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, seed=seed,
    )
    prompt_ids = prompts["prompt_id"].to_list()
    return pl.DataFrame(
        {
            "step": [step] * len(out),
            "prompt_id": [prompt_ids[i] for i in out.prompt_index],
            "sample_idx": out.sample_index,
            "prompt_token_ids": out.prompt_token_ids,
            "completion_token_ids": out.completion_token_ids,
            "sampler_logprobs": out.sampler_logprobs,
            "finish_reason": out.finish_reason,
            "completion_text": out.completion_text,
        },
        schema=ROLLOUTS,
    )


def score_rewards(rollouts: pl.DataFrame, prompts: pl.DataFrame, cfg: RewardConfig) -> pl.DataFrame:
    """Binary rule-based reward of every rollout against its prompt's reference answer."""
    golds = rollouts.select("prompt_id").join(prompts.select("prompt_id", "answer"), on="prompt_id", how="left",
                                              maintain_order="left")
    if golds["answer"].null_count():
        bad = golds.filter(pl.col("answer").is_null())["prompt_id"][0]
        raise ValueError(f"rollouts reference prompt_id {bad}, which is not in the prompts table")
    scored = score_batch(
        rollouts["completion_text"].to_list(), golds["answer"].to_list(), rollouts["finish_reason"].to_list(),
        mode=cfg.extract, thinking=cfg.thinking, timeout_s=cfg.timeout_s,
    )
    return pl.DataFrame(
        {
            "step": rollouts["step"],
            "prompt_id": rollouts["prompt_id"],
            "sample_idx": rollouts["sample_idx"],
            "extracted_answer": [answer for answer, _ in scored],
            "reward": [reward for _, reward in scored],
            "truncated": rollouts["finish_reason"] == "length",
        },
        schema=REWARDS,
    )


def kd_needed(rollouts: pl.DataFrame, rewards: pl.DataFrame, cfg: LossConfig) -> pl.Series:
    """Which rollouts the reward-guided mask keeps for KD (the teacher only scores those)."""
    joined = rollouts.select(*KEY, "finish_reason").join(
        rewards.select(*KEY, "reward"), on=list(KEY), how="left", maintain_order="left"
    ).with_row_index("row").sort("prompt_id", "sample_idx")
    if joined["reward"].null_count():
        raise ValueError(f"no reward for rollout {joined.filter(pl.col('reward').is_null()).select(KEY).row(0)}")
    sizes = joined.group_by("prompt_id").len()["len"].unique().to_list()
    if len(sizes) != 1:
        raise ValueError(f"every prompt needs the same number of samples; found group sizes {sorted(sizes)}")
    rewards_PG = torch.tensor(joined["reward"].to_list(), dtype=torch.float32).view(-1, sizes[0])
    truncated_B = torch.tensor((joined["finish_reason"] == "length").to_list())
    keep_B = kd_mask_B(rewards_PG, truncated_B, cfg) > 0  # the one definition the update uses too
    return joined.with_columns(pl.Series("kd_needed", keep_B.tolist())).sort("row")["kd_needed"]


def score_teacher(scorer: TeacherScorer, rollouts: pl.DataFrame, needed: pl.Series, *, top_k: int = 0) -> pl.DataFrame:
    """TEACHER_LOGPROBS for every rollout; rows not `needed` are left null (never scored)."""
    picked = rollouts.filter(needed)
    scores = scorer.score(picked["prompt_token_ids"].to_list(), picked["completion_token_ids"].to_list(), top_k=top_k)
    logp = [None] * len(rollouts)
    topk_ids = [None] * len(rollouts)
    topk_logp = [None] * len(rollouts)
    rows = [i for i, flag in enumerate(needed.to_list()) if flag]
    for j, row in enumerate(rows):
        logp[row] = scores.logprobs[j]
        if scores.topk_ids is not None:
            topk_ids[row], topk_logp[row] = scores.topk_ids[j], scores.topk_logprobs[j]
    return pl.DataFrame(
        {
            "step": rollouts["step"],
            "prompt_id": rollouts["prompt_id"],
            "sample_idx": rollouts["sample_idx"],
            "teacher_logprobs": logp,
            "topk_ids": topk_ids,
            "topk_logprobs": topk_logp,
        },
        schema=TEACHER_LOGPROBS,
    )


def batch_table(keys: pl.DataFrame, result: UpdateResult, rewards_PG: torch.Tensor,
                mask_BT: torch.Tensor) -> pl.DataFrame:
    """The ADVANTAGES table: what the update used and saw, per sample (rows in batch order)."""
    lengths = mask_BT.sum(dim=1).long().tolist()
    trim = lambda x_BT: [row[:n] for row, n in zip(x_BT.tolist(), lengths)]  # noqa: E731
    return pl.DataFrame(
        {
            **keys.to_dict(),
            "reward": rewards_PG.reshape(-1).tolist(),
            "advantage": result.advantages_B.tolist(),
            "kd_mask": result.kd_mask_B.tolist(),
            "beta": [result.metrics["beta"]] * len(lengths),
            "num_tokens": lengths,
            "student_logprobs": trim(result.student_logp_BT),
            "kd_per_token": trim(result.kd_per_token_BT),
        },
        schema=ADVANTAGES,
    )


def grade_samples(
    engine: RolloutEngine,
    prompts: pl.DataFrame,
    *,
    step: int,
    model_name: str,
    k: int,
    temperature: float,
    max_new_tokens: int,
    reward_cfg: RewardConfig,
    seed: int,
    top_p: float = 1.0,
) -> pl.DataFrame:
    """EVALUATIONS rows: k samples per held-out prompt (greedy when temperature is 0), each with
    its prompt's split (PROMPTS' split column; "heldout" where `prompts` has none)."""
    rollouts = generate_rollouts(engine, prompts, step=step, n=k, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, seed=seed)
    rewards = score_rewards(rollouts, prompts, reward_cfg)
    split_of = dict(zip(prompts["prompt_id"], prompts["split"])) if "split" in prompts.columns else {}
    return pl.DataFrame(
        {
            "step": rollouts["step"],
            "prompt_id": rollouts["prompt_id"],
            "sample_idx": rollouts["sample_idx"],
            "split": [split_of.get(i, "heldout") for i in rollouts["prompt_id"].to_list()],
            "model": [model_name] * len(rollouts),
            "temperature": [temperature] * len(rollouts),
            "completion_text": rollouts["completion_text"],
            "completion_len": rollouts["completion_token_ids"].list.len(),
            "finish_reason": rollouts["finish_reason"],
            "extracted_answer": rewards["extracted_answer"],
            "correct": rewards["reward"] > 0,
        },
        schema=EVALUATIONS,
    )


def evaluate_passes(
    engine: RolloutEngine,
    prompts: pl.DataFrame,
    *,
    step: int,
    model_name: str,
    k: int,
    temperature: float,
    greedy: bool,
    max_new_tokens: int,
    reward_cfg: RewardConfig,
    seed: int,
    top_p: float = 1.0,
) -> pl.DataFrame:
    """`grade_samples` with k samples at `temperature`, plus one greedy decode per prompt when
    `greedy` and temperature > 0 (its rows have temperature 0): pass@1 and greedy accuracy."""
    passes = [(k, temperature)] + ([(1, 0.0)] if greedy and temperature > 0 else [])
    return pl.concat([
        grade_samples(engine, prompts, step=step, model_name=model_name, k=n, temperature=t,
                      max_new_tokens=max_new_tokens, reward_cfg=reward_cfg, seed=seed, top_p=top_p if t > 0 else 1.0)
        for n, t in passes
    ])
