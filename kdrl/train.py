"""The policy update: student log-probs, the KDRL loss, one optimizer step; checkpoints.

`update_step` is the one place `backward()` runs. It is strictly on-policy by default: one
optimizer step per rollout batch, π_old = sg(π_θ), so ρ = 1 in value. With ``ppo_epochs > 1`` the
first pass's log-probs become π_old and each later pass is another optimizer step (ρ ≠ 1, clipping
acts, KD is weighted by sg(ρ)). β and the learning rate follow the *optimizer* step, so a run
makes run.steps × ppo_epochs optimizer steps and its schedule spans all of them.

A step whose loss terms or gradient norm are not finite is never applied: `update_step` raises
`TrainingDiverged` before `optimizer.step()`, naming the term, and `save_checkpoint` refuses
weights that are not finite, so a NaN never reaches a checkpoint.

Student log-probs are computed in float32 from the hidden states at the completion positions
only; where the B×T×V logits would be large (a big vocabulary, a long batch), in row chunks under
activation checkpointing, so at most one chunk of them exists.
"""

from __future__ import annotations

import copy
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from kdrl.advantages import group_advantages_PG, token_count
from kdrl.batching import StepBatch, micro_batch_plan
from kdrl.config import LossConfig, OptimConfig
from kdrl.distributed import SHARDED_LOGPROBS, DataParallel
from kdrl.lora import ADAPTER_DIR, is_lora, load_adapter_weights, save_lora_checkpoint
from kdrl.losses import (
    beta_constant,
    beta_linear,
    kd_mask_group_PG,
    kd_mask_none_PG,
    kd_mask_response_PG,
    kdrl_loss,
    reverse_kl_k1_BT,
    reverse_kl_k2_BT,
    reverse_kl_k3_BT,
    reverse_kl_topk_BT,
    signal_norms_sq,
)
from kdrl.memory import logprob_chunk_tokens
from kdrl.perf import pass_token_budget, train_flops
from kdrl.storage import describe_write_failure


class TrainingError(RuntimeError):
    """A training step or checkpoint that could not be done; the message says why and what to do."""


class TrainingDiverged(TrainingError):
    """A loss term or the gradient norm is NaN/inf: the update was not applied. `diagnostics`
    holds what was measured (terms, gradient norm, lr, β, the first non-finite gradients)."""

    def __init__(self, message: str, diagnostics: dict | None = None):
        super().__init__(message)
        self.diagnostics = diagnostics or {}

    def __reduce__(self):  # Prefect persists a failed task's exception: it must survive pickling
        return type(self), (str(self), self.diagnostics)


class CheckpointWriteError(TrainingError):
    """A checkpoint could not be written (e.g. the disk is full); its temporary folder is gone and
    every earlier checkpoint is untouched."""


KD_MASKS = {"none": kd_mask_none_PG, "response": kd_mask_response_PG, "group": kd_mask_group_PG}
KD_LOSSES = {"k2": reverse_kl_k2_BT, "k3": reverse_kl_k3_BT}


def beta_at(step: int, cfg: LossConfig) -> float:
    """β for optimizer step `step` under the configured schedule."""
    if cfg.beta_schedule == "linear":
        return beta_linear(step, beta_init=cfg.beta_init, beta_min=cfg.beta_min, delta=cfg.beta_delta)
    return beta_constant(step, beta_init=cfg.beta_init)


def kd_mask_B(rewards_PG: torch.Tensor, truncated_B: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Which responses receive KD: the reward-guided mask, minus truncated ones if so configured."""
    mask_B = KD_MASKS[cfg.kd_mask](rewards_PG).reshape(-1)
    if not cfg.kd_on_truncated:
        mask_B = mask_B * (~truncated_B).float()
    return mask_B


ENTROPY_ROWS = 512
"""Rows per slice of the entropy's softmax: its float32 [rows, V] buffer stays small beside the chunk's."""


def _entropy_N(logits_NV: torch.Tensor, logz_N1: torch.Tensor) -> torch.Tensor:
    """H(π(·|context)) = log Z − Σ_v p_v·logit_v per row, without a gradient, in row slices.

    >>> _entropy_N(torch.zeros(2, 8), torch.full((2, 1), math.log(8)))  # uniform over 8: log 8
    tensor([2.0794, 2.0794])
    """
    with torch.no_grad():
        parts = []
        for start in range(0, logits_NV.shape[0], ENTROPY_ROWS):
            logits, logz = logits_NV[start:start + ENTROPY_ROWS], logz_N1[start:start + ENTROPY_ROWS]
            parts.append(logz.squeeze(-1) - ((logits - logz).exp() * logits).sum(-1))
        return torch.cat(parts) if parts else logits_NV.new_zeros(0)


def _chunk_logprobs(hidden_NH, lm_head_weight, lm_head_bias, targets_N, topk_ids_NK, temperature, entropy=False):
    logits_NV = torch.nn.functional.linear(hidden_NH, lm_head_weight, lm_head_bias).float() / temperature
    logz_N1 = torch.logsumexp(logits_NV, dim=-1, keepdim=True)
    logp_N = logits_NV.gather(-1, targets_N[:, None]).squeeze(-1) - logz_N1.squeeze(-1)
    entropy_N = _entropy_N(logits_NV.detach(), logz_N1.detach()) if entropy else None
    if topk_ids_NK is None:
        return logp_N, None, entropy_N
    return logp_N, logits_NV.gather(-1, topk_ids_NK) - logz_N1, entropy_N


def completion_logprobs_BT(
    model: torch.nn.Module,
    batch: StepBatch,
    *,
    temperature: float = 1.0,
    topk_ids_BTK: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    stats: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π_θ(o_t | prompt, o_<t) (float32) for every completion position, and, if given the
    teacher's top-k ids, the student's log-probs at those ids (for the top-k KL). With a `stats`
    dict, also ``stats["entropy_BT"]``: the policy's entropy at each position (no gradient).

    Logits are divided by the sampling temperature, matching the distribution the rollout engine
    sampled from. The LM head runs on completion positions only: at once, or, where the float32
    logits of all positions would be large (`kdrl.memory.logprob_chunk_tokens`; or `chunk_tokens`
    when given), in chunks of rows, each under activation checkpointing. (Models whose head
    applies extra transforms, e.g. logit soft-capping, are not handled here.) An FSDP2-sharded
    model runs it as a forward method of its root (`kdrl.distributed.shard_model`), so its weights
    are gathered around it."""
    kwargs = {"temperature": temperature, "topk_ids_BTK": topk_ids_BTK, "chunk_tokens": chunk_tokens, "stats": stats}
    sharded = getattr(model, SHARDED_LOGPROBS, None)
    if sharded is not None:
        return sharded(batch, **kwargs)
    return _completion_logprobs_BT(model, batch, **kwargs)


def _completion_logprobs_BT(model: torch.nn.Module, batch: StepBatch, *, temperature: float,
                            topk_ids_BTK: torch.Tensor | None, chunk_tokens: int | None,
                            stats: dict[str, torch.Tensor] | None = None):
    """`completion_logprobs_BT` on the model's own modules (what a sharded root runs as its forward)."""
    T = batch.completion_ids_BT.shape[1]
    decoder = model.get_decoder()
    hidden_BSH = decoder(
        input_ids=batch.input_ids_BS,
        attention_mask=batch.attention_mask_BS,
        position_ids=batch.position_ids_BS,
    ).last_hidden_state
    hidden_BTH = hidden_BSH[:, -T - 1 : -1]
    B, _, H = hidden_BTH.shape
    hidden_NH = hidden_BTH.reshape(B * T, H)
    targets_N = batch.completion_ids_BT.reshape(B * T)
    topk_NK = None if topk_ids_BTK is None else topk_ids_BTK.reshape(B * T, -1)
    head = model.get_output_embeddings()
    if chunk_tokens is None:  # all rows at once unless their logits would be large
        chunk_tokens = logprob_chunk_tokens(B * T, head.weight.shape[0]) or max(B * T, 1)
    # A single chunk needs no checkpoint: its logits would be the peak either way.
    recompute = chunk_tokens < B * T and torch.is_grad_enabled()
    logp_parts, topk_parts, entropy_parts = [], [], []
    for start in range(0, B * T, chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        args = (hidden_NH[sl], head.weight, head.bias, targets_N[sl], None if topk_NK is None else topk_NK[sl],
                temperature, stats is not None)
        logp_N, topk_NK_out, entropy_N = (checkpoint(_chunk_logprobs, *args, use_reentrant=False)
                                          if recompute else _chunk_logprobs(*args))
        logp_parts.append(logp_N)
        topk_parts.append(topk_NK_out)
        entropy_parts.append(entropy_N)
    logp_BT = torch.cat(logp_parts).view(B, T)
    topk_logp_BTK = None if topk_NK is None else torch.cat(topk_parts).view(B, T, -1)
    if stats is not None:
        stats["entropy_BT"] = torch.cat(entropy_parts).view(B, T)
    return logp_BT, topk_logp_BTK


sharded_logprobs = _completion_logprobs_BT
"""What `kdrl.distributed.shard_model` registers as the sharded root's log-prob forward."""


@dataclass(frozen=True)
class UpdateResult:
    """What one update produced: scalar metrics and per-row arrays (rows in batch order)."""

    metrics: dict[str, float]
    advantages_B: torch.Tensor
    kd_mask_B: torch.Tensor
    student_logp_BT: torch.Tensor
    kd_per_token_BT: torch.Tensor


def _kd_terms(cfg: LossConfig, logp_BT, topk_logp_BTK, mb: StepBatch, kd_mask_BT: torch.Tensor):
    """(kd loss per token or None, k1 reward per token or None) for the configured estimator.

    Where KD does not apply (padding, masked or unscored responses) the teacher log-prob is a fill
    value: R is set to 0 there *before* any exponential, since e^R overflows above R ≈ 88 and the
    mask's inf·0 would make the whole step NaN (k3)."""
    if mb.teacher_logp_BT is None:
        return None, None
    teacher_logp_BT = torch.where(kd_mask_BT > 0, mb.teacher_logp_BT, logp_BT.detach())
    if cfg.kl_estimator == "k1":
        return None, reverse_kl_k1_BT(logp_BT, teacher_logp_BT)
    if cfg.kl_estimator == "topk":
        return reverse_kl_topk_BT(topk_logp_BTK, mb.teacher_topk_logp_BTK), None
    return KD_LOSSES[cfg.kl_estimator](logp_BT, teacher_logp_BT), None


LOSS_TERMS = {"pg_loss": "pg", "kd_loss": "kd", "nll_loss": "nll"}


def _pad_columns(x_BT: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad a micro-batch's [B, t] values with zeros to the batch's width (its padding)."""
    return torch.nn.functional.pad(x_BT, (0, width - x_BT.shape[1]))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), or the tensor: checks on it need no collective."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _drop_pending_backward(model: torch.nn.Module) -> None:
    """FSDP2: forget a forward whose backward will not run (all ranks stop; torch ≥ 2.13)."""
    if hasattr(model, "reset_iter_state"):
        model.reset_iter_state()


def _non_finite_grads(model: torch.nn.Module, limit: int = 10) -> list[str]:
    return [name for name, p in model.named_parameters()
            if p.grad is not None and not torch.isfinite(_local(p.grad)).all()][:limit]


def _diverged(what: str, *, model, optimizer, diagnostics: dict) -> TrainingDiverged:
    """Drop the step's gradients and describe it; the caller raises."""
    diagnostics["non_finite_grads"] = _non_finite_grads(model)
    optimizer.zero_grad(set_to_none=True)
    return TrainingDiverged(f"optimizer step {diagnostics['optimizer_step']}: {what}; the update was not applied",
                            diagnostics)


def update_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: StepBatch,
    *,
    loss_cfg: LossConfig,
    optim_cfg: OptimConfig,
    optimizer_step: int,
    temperature: float = 1.0,
    dp: DataParallel | None = None,
) -> UpdateResult:
    """Advantages, KD mask and β from the batch, then `ppo_epochs` optimizer steps over
    micro-batches with the global token denominators. `optimizer_step` is the count before.
    With `dp`, the batch is this rank's share (whole prompt groups) and the denominators, the
    gradients and the loss metrics are summed over the ranks (`kdrl.distributed`): every rank
    takes the optimizer step of the whole batch, and the returned rows are this rank's.
    Micro-batches are consecutive rows of the batch, or of the rows sorted by length where that
    saves padding (`kdrl.batching.micro_batch_plan`), at most optim.micro_batch_size of them and
    at most optim.max_tokens_per_microbatch tokens once trimmed of shared padding (on a CPU at
    most `kdrl.perf.CPU_TOKENS_PER_PASS`); the loss is the same for any split and order.

    Raises `TrainingDiverged` (gradients dropped, weights untouched by that optimizer step) at the
    first loss term (pg, kd, nll) or gradient norm that is not finite."""
    advantages_B = group_advantages_PG(batch.rewards_PG, std_normalize=loss_cfg.std_normalize,
                                       unbiased=loss_cfg.unbiased_std).reshape(-1)
    kd_mask = kd_mask_B(batch.rewards_PG, batch.truncated_B, loss_cfg)
    mask_BT = batch.completion_mask_BT
    if loss_cfg.sft_only_correct:
        mask_BT = mask_BT * (batch.rewards_PG.reshape(-1, 1) > 0)
    num_tokens = token_count(mask_BT)
    num_kd_tokens = token_count(kd_mask[:, None] * mask_BT) if loss_cfg.kd_denominator == "unmasked" else num_tokens
    if dp is not None:  # the batch's denominators, not this rank's share's
        num_tokens, num_kd_tokens = dp.sum(torch.stack([num_tokens, num_kd_tokens]))
    model.train()
    T = batch.completion_ids_BT.shape[1]
    prompt_lens = batch.attention_mask_BS[:, :-T].sum(dim=1).tolist()
    completion_lens = batch.completion_mask_BT.sum(dim=1).int().tolist()
    # Micro-batches over the rows sorted by length where that saves padding (`micro_batch_plan`:
    # ~18% of the tokens at 16x8 on the embedded tasks); the returned rows are in batch order.
    # On a CPU at most CPU_TOKENS_PER_PASS tokens per micro-batch (`pass_token_budget`: faster there).
    max_tokens = pass_token_budget(optim_cfg.max_tokens_per_microbatch, batch.completion_mask_BT.device)
    order, bounds = micro_batch_plan(prompt_lens, completion_lens, max_rows=optim_cfg.micro_batch_size,
                                     max_tokens=max_tokens)
    inverse = None
    rows_advantages_B, rows_kd_mask, rows_mask_BT = advantages_B, kd_mask, mask_BT
    micro_batch = batch.rows  # (start, stop) → the micro-batch's rows; gathered when sorted (no batch copy)
    if order is not None:
        order_B = torch.tensor(order, device=batch.completion_mask_BT.device)
        inverse = torch.empty_like(order_B)
        inverse[order_B] = torch.arange(len(order), device=order_B.device)
        rows_advantages_B, rows_kd_mask, rows_mask_BT = advantages_B[order_B], kd_mask[order_B], mask_BT[order_B]
        micro_batch = lambda start, stop: batch.take(order_B[start:stop])  # noqa: E731
    sharded = dp is not None and dp.sharded
    # FSDP2 gathers weights in every pass: all ranks make as many passes, some zero-weighted
    passes = dp.max(len(bounds)) if sharded else len(bounds)
    old_logp_BT = student_logp_BT = kd_per_token_BT = None
    totals: dict[str, float] = {}
    entropy_sum = torch.zeros((), device=batch.completion_mask_BT.device)
    for epoch in range(loss_cfg.ppo_epochs):
        beta = beta_at(optimizer_step + epoch, loss_cfg)
        sums: dict[str, float] = {}
        logp_parts, kd_parts = [], []
        failure: TrainingDiverged | None = None
        for index in range(passes):
            if index >= len(bounds):  # this rank's micro-batches are done: a pass that adds zeros
                logp_BT, _ = completion_logprobs_BT(model, micro_batch(*bounds[0]).trimmed(), temperature=temperature)
                if dp.any(False):
                    _drop_pending_backward(model)
                    break
                (torch.where(torch.isfinite(logp_BT), logp_BT, 0.0).sum() * 0.0).backward()
                continue
            start, stop = bounds[index]
            mb = micro_batch(start, stop).trimmed()
            t = mb.completion_ids_BT.shape[1]  # this micro-batch's longest completion
            mb_mask_BT = rows_mask_BT[start:stop, :t]
            stats = {} if epoch == 0 else None  # the policy's entropy, as it sampled (first epoch)
            logp_BT, topk_logp_BTK = completion_logprobs_BT(model, mb, temperature=temperature,
                                                            topk_ids_BTK=mb.teacher_topk_ids_BTK, stats=stats)
            if stats is not None:
                completion_BT = mb.completion_mask_BT
                entropy_sum = entropy_sum + (stats["entropy_BT"] * completion_BT).sum()
            kd_BT, kd_reward_BT = _kd_terms(loss_cfg, logp_BT, topk_logp_BTK, mb,
                                            rows_kd_mask[start:stop, None] * mb_mask_BT)
            old = logp_BT.detach() if old_logp_BT is None else old_logp_BT[start:stop, :t]
            loss, metrics = kdrl_loss(
                logp_BT=logp_BT, old_logp_BT=old, mask_BT=mb_mask_BT, advantages_B=rows_advantages_B[start:stop],
                kd_BT=kd_BT, kd_reward_BT=kd_reward_BT, kd_mask_B=rows_kd_mask[start:stop], beta=beta,
                num_tokens=num_tokens, num_kd_tokens=num_kd_tokens, pg_coef=loss_cfg.pg_coef,
                nll_coef=loss_cfg.nll_coef, clip_eps_low=loss_cfg.clip_eps_low, clip_eps_high=loss_cfg.clip_eps_high,
            )
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            if not math.isfinite(float(metrics["loss"])):
                bad = [term for key, term in LOSS_TERMS.items() if not math.isfinite(float(metrics[key]))] or ["loss"]
                batch_rows = list(range(start, stop)) if inverse is None else order[start:stop]
                diagnostics = {"optimizer_step": optimizer_step + epoch, "epoch": epoch, "rows": sorted(batch_rows),
                               "beta": beta, "lr": scheduler.get_last_lr()[0],
                               **{k: float(v) for k, v in metrics.items()}, "non_finite_terms": bad,
                               "non_finite_student_logp": int((~torch.isfinite(logp_BT)).sum())}
                failure = _diverged(f"the {', '.join(bad)} loss term{'s are' if len(bad) > 1 else ' is'} not finite "
                                    f"(a micro-batch of rows {min(batch_rows)}-{max(batch_rows)} of the "
                                    f"{'rank' if dp else 'batch'}"
                                    f"{f' {dp.rank} share' if dp else ''})", model=model, optimizer=optimizer,
                                    diagnostics=diagnostics)
            if sharded and dp.any(failure is not None):  # every rank stops at this micro-batch
                _drop_pending_backward(model)
                break
            if failure is not None:
                break
            loss.backward()
            logp_parts.append(_pad_columns(logp_BT.detach(), T))
            kd_source = kd_BT if kd_BT is not None else kd_reward_BT
            kd_parts.append(torch.zeros_like(logp_parts[-1]) if kd_source is None
                            else _pad_columns(kd_source.detach(), T))
        if dp is not None and dp.any(failure is not None):  # every rank stops together, or the sums would hang
            optimizer.zero_grad(set_to_none=True)
            raise failure or TrainingDiverged(f"optimizer step {optimizer_step + epoch}: a loss term is not finite on "
                                              "another rank; the update was not applied",
                                              {"optimizer_step": optimizer_step + epoch, "epoch": epoch})
        if failure is not None:
            raise failure
        if dp is not None:
            if not sharded:  # FSDP2 summed them (reduce-scatter) after each backward
                dp.sum_gradients(model.parameters())
            sums = dp.sum_values(sums)
        if old_logp_BT is None:  # in micro-batch row order; the returned rows in batch order
            old_logp_BT = student_logp_BT = torch.cat(logp_parts)
            kd_per_token_BT = torch.cat(kd_parts)
            if inverse is not None:
                student_logp_BT, kd_per_token_BT = student_logp_BT[inverse], kd_per_token_BT[inverse]
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # sharded: the norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        lr = scheduler.get_last_lr()[0]
        if not math.isfinite(float(grad_norm)):
            diagnostics = {"optimizer_step": optimizer_step + epoch, "epoch": epoch, "beta": beta, "lr": lr, **sums,
                           "grad_norm": float(grad_norm), "non_finite_terms": ["grad_norm"]}
            raise _diverged(f"the gradient norm is {float(grad_norm)} (loss terms finite: pg {sums['pg_loss']:.4g}, "
                            f"kd {sums['kd_loss']:.4g}, nll {sums['nll_loss']:.4g}; lr {lr:.3g})",
                            model=model, optimizer=optimizer, diagnostics=diagnostics)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        totals = {**sums, "beta": beta, "lr": lr, "grad_norm": float(grad_norm)}

    # policy entropy on the sampled responses' positions (verl's actor/entropy), before the update;
    # and the model FLOPs of the update's passes over prompt + completion tokens (kdrl.perf)
    entropy_tokens = token_count(batch.completion_mask_BT)
    flops = torch.tensor(train_flops(model, int(batch.attention_mask_BS.sum()) * loss_cfg.ppo_epochs),
                         dtype=torch.float64, device=entropy_sum.device)
    if dp is not None:
        entropy_sum, entropy_tokens = dp.sum(torch.stack([entropy_sum, entropy_tokens]))
        flops = dp.sum(flops)
    totals["model_flops"] = float(flops)
    totals["entropy"] = float(entropy_sum / entropy_tokens.clamp(min=1))
    if batch.teacher_logp_BT is not None:  # Monte Carlo KL(π_θ‖π_T) per token, over teacher-scored tokens
        scored_BT = kd_mask[:, None] * mask_BT
        k1_BT = reverse_kl_k1_BT(student_logp_BT, batch.teacher_logp_BT)
        k1_sum, k1_tokens = (k1_BT * scored_BT).sum(), token_count(scored_BT)
        if dp is not None:
            k1_sum, k1_tokens = dp.sum(torch.stack([k1_sum, k1_tokens]))
        totals["kl_k1_mean"] = float(k1_sum / k1_tokens.clamp(min=1))
    # the KD signal share: ‖β·KD‖ / ‖GRPO‖ per-token gradient coefficients, at the first epoch's β
    norms_sq = signal_norms_sq(
        estimator=loss_cfg.kl_estimator, logp_BT=student_logp_BT, teacher_logp_BT=batch.teacher_logp_BT,
        mask_BT=mask_BT, advantages_B=advantages_B, kd_mask_B=kd_mask, beta=beta_at(optimizer_step, loss_cfg),
        num_tokens=num_tokens, num_kd_tokens=num_kd_tokens, pg_coef=loss_cfg.pg_coef)
    if dp is not None:
        norms_sq = dp.sum(norms_sq)
    kd_sq, pg_sq = (float(x) for x in norms_sq)
    totals["kd_signal_share"] = (math.sqrt(kd_sq / pg_sq) if pg_sq > 0 else
                                 float("inf") if kd_sq > 0 else float("nan"))
    totals["num_tokens"] = float(num_tokens)
    return UpdateResult(totals, advantages_B, kd_mask, student_logp_BT, kd_per_token_BT)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, total_steps: int):
    """AdamW over the trainable parameters (all of them, or a LoRA student's adapter) and a
    LambdaLR: linear warm-up, then constant / cosine / linear decay to 0."""
    import math

    trainable = [p for p in model.parameters() if p.requires_grad]  # frozen weights get no Adam moments
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return {"constant": 1.0, "linear": 1.0 - progress,
                "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[cfg.schedule]

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_checkpoint(path: Path, *, model, tokenizer, optimizer, scheduler, step: int, optimizer_step: int,
                    sharded: tuple[dict, dict] | None = None) -> None:
    """Model (HF format, loadable by any HF tool) + trainer state (optimizer, scheduler, RNG,
    counters). Written to a temp dir and renamed, so a checkpoint dir is complete or absent.
    A LoRA student writes adapter/ (and merged/ with model.lora.save_merged) instead of model/.
    `sharded`: the (model, optimizer) state dicts gathered from an FSDP2 model (`gather_states`),
    written as one process's would be, so any world size or a local run resumes from them.

    Refuses non-finite weights (`TrainingDiverged`); a failed write (disk full, quota, permissions)
    removes the temp dir and raises `CheckpointWriteError` naming the folder and the free space."""
    path = Path(path)
    # requires_grad only: frozen ones cannot change
    weights = sharded[0] if sharded else {name: p for name, p in model.named_parameters() if p.requires_grad}
    bad = [name for name, p in weights.items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise TrainingDiverged(f"refusing to write {path}: {len(bad)} weight tensors are not finite (e.g. {bad[0]})",
                               {"optimizer_step": optimizer_step, "non_finite_weights": bad[:10]})
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    state = {
        "optimizer": sharded[1] if sharded else optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "optimizer_step": optimizer_step,
        "rng": {
            "python": random.getstate(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
    }
    try:
        if is_lora(model):
            save_lora_checkpoint(model, tokenizer, tmp)
        else:
            (_unsharded(model, sharded[0]) if sharded else model).save_pretrained(tmp / "model")
            tokenizer.save_pretrained(tmp / "model")
        torch.save(state, tmp / "trainer_state.pt")
    except Exception as err:  # a full disk: OSError (HF files), SafetensorError,
        # RuntimeError "[enforce fail at inline_container.cc" (torch)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"checkpoint {describe_write_failure(path, err)}") from err
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _unsharded(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain HF model of `model`'s config holding `weights` (no copy): what an FSDP2 model's
    gathered weights are saved through, so the folder names the model's own architecture."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config, dtype=next(iter(weights.values())).dtype)
    missing, _ = plain.load_state_dict(weights, strict=False, assign=True)
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)  # its eos ids, as the model folder had them
    still = [name for name, p in plain.named_parameters() if p.is_meta]
    if still:
        raise ValueError(f"the gathered weights lack {still[:3]} (missing: {missing[:3]})")
    return plain


def gather_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """An FSDP2 model's whole weights and optimizer state, on rank 0's CPU (empty dicts on the
    others; every rank must call it), the optimizer's keyed as one process's `state_dict()` is:
    by the index of each trainable parameter in `model.parameters()` order."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if not weights:
        return {}, {}
    index = {name: i for i, name in enumerate(_trainable_names(model))}
    return weights, _rekeyed(by_name, index)


def _trainable_names(model: torch.nn.Module) -> list[str]:
    """The names of the parameters `build_optimizer` trains, in its (index) order."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _rekeyed(optimizer_state: dict, keys) -> dict:
    """An optimizer state dict with every parameter key `k` replaced by `keys[k]` (index ↔ name)."""
    return {"state": {keys[k]: value for k, value in optimizer_state["state"].items()},
            "param_groups": [{**group, "params": [keys[k] for k in group["params"]]}
                             for group in optimizer_state["param_groups"]]}


def load_sharded_state(path: Path, *, model, optimizer, scheduler, dp: DataParallel) -> dict:
    """`load_trainer_state` for an FSDP2 model: rank 0 reads the checkpoint (written by any world
    size, or by one process) and the weights and optimizer state are scattered from it; every
    rank takes the schedule, counters and RNG. Every rank must call it; a checkpoint rank 0
    cannot read, or whose weights do not match the model, fails on every rank (none waits)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    weights, by_name, error = {}, {}, None
    if dp.rank == 0:
        try:
            weights, by_name = _read_for_sharding(path, model)
        except Exception as err:  # noqa: BLE001 - every rank must hear of it, or they wait in the scatter
            error = err
    problem = dp.from_rank0(None if error is None else str(error))
    if problem is not None:  # every rank says why
        raise error or ValueError(problem)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)  # keys checked above
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, by_name, options=options)
    state = torch.load(path / "trainer_state.pt", weights_only=False, mmap=True)  # mmap: the moments stay on disk
    return _restore_schedule(state, scheduler)


def _restore_schedule(state: dict, scheduler) -> dict:
    """The LR schedule and RNG of a checkpoint's trainer state; its {"step", "optimizer_step"}."""
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return {"step": state["step"], "optimizer_step": state["optimizer_step"]}


def _read_for_sharding(path: Path, model: torch.nn.Module) -> tuple[dict, dict]:
    """A checkpoint's whole weights (checked against `model`'s names: only a tied head may be
    absent) and its optimizer state keyed by parameter name, as `set_*_state_dict` take them."""
    from safetensors.torch import load_file

    files = sorted((path / "model").glob("*.safetensors"))
    if not files:
        raise ValueError(f"checkpoint {path}: no model/*.safetensors to resume a sharded trainer from")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(file))
    expected = set(model.state_dict())
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing, unexpected = sorted(expected - set(weights) - tied), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: its weights do not match the student's (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); resume with the model it was trained from")
    names = _trainable_names(model)
    saved = torch.load(path / "trainer_state.pt", weights_only=False, mmap=True)["optimizer"]
    held = sum(len(group["params"]) for group in saved["param_groups"])
    if held != len(names):
        raise ValueError(f"checkpoint {path}: its optimizer state holds {held} parameters, the student trains "
                         f"{len(names)}")
    return weights, _rekeyed(saved, names)


def load_trainer_state(path: Path, *, model, optimizer, scheduler) -> dict:
    """Restore weights (in place), optimizer, scheduler and RNG from `save_checkpoint` output;
    returns {"step", "optimizer_step"}. A LoRA student gets its adapter back, bit for bit."""
    path = Path(path)
    if is_lora(model) != (path / ADAPTER_DIR).is_dir():
        held = "a LoRA adapter (adapter/)" if (path / ADAPTER_DIR).is_dir() else "full weights (model/)"
        raise ValueError(f"checkpoint {path} holds {held}, but the student is "
                         f"{'a LoRA' if is_lora(model) else 'a full-weights'} "
                         "model; resume it with the model.lora setting it was trained with")
    if is_lora(model):
        load_adapter_weights(model, path / ADAPTER_DIR)
    else:
        saved = type(model).from_pretrained(path / "model", dtype=next(model.parameters()).dtype)  # handles shards
        model.load_state_dict(saved.state_dict())
        del saved
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    return _restore_schedule(state, scheduler)
