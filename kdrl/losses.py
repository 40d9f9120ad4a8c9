"""The KDRL objective: GRPO + β · reverse-KL distillation, as pure tensor functions.

Paper: Xu et al., "KDRL", arXiv 2506.02208, Eq. 8: J = J_GRPO − β · D^{k2}_KL(π_θ ‖ π_T). As a
loss over one rollout batch of B responses with completion mask m_BT (1 on real tokens):

    L = pg_coef · (1/N) Σ_{i,t} −min(ρ Â, clip(ρ, 1−ε_lo, 1+ε_hi) Â)        GRPO, token-mean
      + β_s     · (1/N_kd) Σ_{i,t} kdmask_i · sg(ρ) · kd_{i,t}             reverse KL (k2 default)
      + nll_coef· (1/N) Σ_{i,t} −log π_θ(o_{i,t})                            SFT on given samples

with R_{i,t} = log π_T(o_t) − log π_θ(o_t) (teacher detached) and the per-token estimators
k2 = ½R², k3 = e^R − R − 1, or an exact KL over the teacher's top-k support. k1 = −R has zero
expected gradient as a loss, so it only exists in *reward* form: Â_{i,t} ← Â_i − β·(N/N_kd)·sg(k1_{i,t}),
the on-policy distillation of TRL/Tinker; the N/N_kd factor puts it on the KD term's scale
(β/N_kd per distilled token), so `kd_denominator` means the same for every estimator. N is the
batch's completion-token count and N_kd the KD denominator (all tokens, or only the KD-unmasked
ones); both are passed in, so micro-batches sum to the full-batch loss. Departures from the
paper, all options: the std in Â, the KD denominator, the clipping bounds, the sg(ρ) weight on
KD (=1 in value when on-policy, needed for an unbiased gradient over several PPO epochs).

"Unbiased" for k2 means per prefix, with the visited prefixes held fixed: the gradient carries
no reward-to-go credit from later tokens to earlier ones.
"""

from __future__ import annotations

import torch


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # log-softmax in bf16 loses ~3 digits; never compute divergences below float32
    return x.to(torch.promote_types(x.dtype, torch.float32))


def reverse_kl_k1_BT(logp_BT: torch.Tensor, teacher_logp_BT: torch.Tensor) -> torch.Tensor:
    """k1 = log π_θ(o_t) − log π_T(o_t) = −R. Its mean estimates KL(π_θ‖π_T); use it as a
    detached per-token *reward* only — as a loss its expected gradient is 0.

    >>> import math
    >>> reverse_kl_k1_BT(torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.9)]]))
    tensor([[-0.5878]])
    """
    return logp_BT - teacher_logp_BT


def reverse_kl_k2_BT(logp_BT: torch.Tensor, teacher_logp_BT: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π_θ(o_t) − log π_T(o_t))²: unbiased per-prefix gradient of KL(π_θ‖π_T).

    p_s = 0.5, p_t = 0.9: ½ · 0.587787² = 0.172747.

    >>> import math
    >>> reverse_kl_k2_BT(torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.9)]]))
    tensor([[0.1727]])
    """
    return 0.5 * (logp_BT - teacher_logp_BT).square()


def reverse_kl_k3_BT(logp_BT: torch.Tensor, teacher_logp_BT: torch.Tensor) -> torch.Tensor:
    """k3 = e^R − R − 1, R = log π_T − log π_θ. Unbiased *value* of KL(π_θ‖π_T), but as a loss its
    expected gradient is that of the forward KL(π_T‖π_θ) (ablation only).

    p_s = 0.5, p_t = 0.9: e^0.587787 − 0.587787 − 1 = 1.8 − 1.587787 = 0.212213.

    >>> import math
    >>> reverse_kl_k3_BT(torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.9)]]))
    tensor([[0.2122]])
    """
    log_ratio_BT = teacher_logp_BT - logp_BT
    return torch.expm1(log_ratio_BT) - log_ratio_BT


def reverse_kl_topk_BT(
    student_logp_BTK: torch.Tensor, teacher_logp_BTK: torch.Tensor
) -> torch.Tensor:
    """Exact KL(q_θ‖q_T) over the teacher's top-k token ids at each position, where both
    distributions are renormalised over those K ids: q = softmax(log p restricted to the K ids).

    Inputs are log-probabilities (any normalisation) at the same K ids. The mass outside the
    top-k is dropped, so this is a biased, lower-variance surrogate (the paper found it unstable).

    >>> import math
    >>> s = torch.log(torch.tensor([[[0.25, 0.25]]]))  # renormalises to [0.5, 0.5]
    >>> t = torch.log(torch.tensor([[[0.9, 0.1]]]))
    >>> reverse_kl_topk_BT(s, t)  # KL([.5,.5] ‖ [.9,.1]) = 0.510826
    tensor([[0.5108]])
    """
    q_logp_BTK = torch.log_softmax(_at_least_fp32(student_logp_BTK), dim=-1)
    t_logp_BTK = torch.log_softmax(_at_least_fp32(teacher_logp_BTK), dim=-1)
    return (q_logp_BTK.exp() * (q_logp_BTK - t_logp_BTK)).sum(dim=-1)


def reverse_kl_full_BT(student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor) -> torch.Tensor:
    """Exact per-position KL(π_θ‖π_T) = Σ_v π_θ(v) (log π_θ(v) − log π_T(v)) over the whole
    vocabulary. Needs both full logits at hand (in-memory teacher); never stored in Parquet.

    >>> s = torch.log(torch.tensor([[[0.5, 0.5]]]))
    >>> t = torch.log(torch.tensor([[[0.9, 0.1]]]))
    >>> reverse_kl_full_BT(s, t)
    tensor([[0.5108]])
    """
    s_logp_BTV = torch.log_softmax(_at_least_fp32(student_logits_BTV), dim=-1)
    t_logp_BTV = torch.log_softmax(_at_least_fp32(teacher_logits_BTV), dim=-1)
    return (s_logp_BTV.exp() * (s_logp_BTV - t_logp_BTV)).sum(dim=-1)


def beta_constant(step: int, *, beta_init: float) -> float:
    """β_s = β_init for every optimizer step s."""
    return beta_init


def beta_linear(step: int, *, beta_init: float, beta_min: float, delta: float) -> float:
    """β_s = max(β_init − δ·s, β_min), s the optimizer step (0-based). Paper: 5e-3, 1e-3, 5e-5.

    >>> beta_linear(0, beta_init=5e-3, beta_min=1e-3, delta=5e-5)
    0.005
    >>> round(beta_linear(40, beta_init=5e-3, beta_min=1e-3, delta=5e-5), 6)
    0.003
    >>> beta_linear(200, beta_init=5e-3, beta_min=1e-3, delta=5e-5)
    0.001
    """
    return max(beta_init - delta * step, beta_min)


def kd_mask_none_PG(correct_PG: torch.Tensor) -> torch.Tensor:
    """KD on every response."""
    return torch.ones_like(correct_PG, dtype=torch.float32)


def kd_mask_response_PG(correct_PG: torch.Tensor) -> torch.Tensor:
    """KD only on responses that are wrong (reward 0).

    >>> kd_mask_response_PG(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    tensor([[0., 1.],
            [1., 1.]])
    """
    return (correct_PG <= 0).float()


def kd_mask_group_PG(correct_PG: torch.Tensor) -> torch.Tensor:
    """KD only in groups where every response is wrong (where GRPO's advantage is 0 anyway).

    >>> kd_mask_group_PG(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    tensor([[0., 0.],
            [1., 1.]])
    """
    all_wrong_P1 = (correct_PG <= 0).all(dim=1, keepdim=True)
    return all_wrong_P1.expand_as(correct_PG).float()


def policy_gradient_BT(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate −min(ρA, clip(ρ, 1−ε_lo, 1+ε_hi)A), ρ = π_θ/π_old.

    Strictly on-policy (old = sg(logp)) ρ = 1 in value, clipping never acts and the gradient is
    −A ∇log π_θ. Returns (loss_BT, clipped_BT) where clipped_BT flags tokens the clip bound.
    """
    ratio_BT = torch.exp(logp_BT - old_logp_BT)
    unclipped_BT = ratio_BT * advantages_BT
    clipped_BT = torch.clamp(ratio_BT, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantages_BT
    loss_BT = -torch.minimum(unclipped_BT, clipped_BT)
    return loss_BT, (clipped_BT < unclipped_BT).float()


def kdrl_loss(
    *,
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    kd_BT: torch.Tensor | None,
    kd_reward_BT: torch.Tensor | None,
    kd_mask_B: torch.Tensor,
    beta: float,
    num_tokens: torch.Tensor | float,
    num_kd_tokens: torch.Tensor | float,
    pg_coef: float = 1.0,
    nll_coef: float = 0.0,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO + β·KD + NLL over one (micro-)batch; the only place the terms meet.

    kd_BT is the per-token KD loss (k2, k3 or top-k) or None; kd_reward_BT is k1 in reward
    form (detached here) or None. Both must be finite wherever kd_mask_B·mask_BT is 0 (0·inf is
    NaN): `kdrl.train` sets R = 0 there before any exponential. kd_mask_B is the reward-guided
    mask per response. num_tokens and num_kd_tokens are the *global* denominators over the whole
    rollout batch; a fully masked batch (zero denominators) gives a zero loss, never NaN.
    Presets: GRPO = (kd None, β 0), KD-RKL = (pg_coef 0), SFT = (pg_coef 0, β 0, nll_coef 1).
    """
    dtype = logp_BT.dtype
    mask_BT = mask_BT.to(dtype)
    kd_mask_BT = kd_mask_B.to(dtype)[:, None] * mask_BT
    n = torch.as_tensor(num_tokens, dtype=dtype).clamp(min=1.0)
    n_kd = torch.as_tensor(num_kd_tokens, dtype=dtype).clamp(min=1.0)

    advantages_BT = advantages_B.to(dtype)[:, None].expand_as(logp_BT)
    if kd_reward_BT is not None:  # k1 in reward form, per distilled token like the KD loss: β/N_kd after the 1/N below
        advantages_BT = advantages_BT - beta * (n / n_kd) * kd_reward_BT.detach() * kd_mask_BT
    pg_BT, clipped_BT = policy_gradient_BT(
        logp_BT, old_logp_BT, advantages_BT, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high
    )
    pg_loss = (pg_BT * mask_BT).sum() / n
    nll_loss = (-logp_BT * mask_BT).sum() / n
    ratio_BT = torch.exp(logp_BT - old_logp_BT).detach()
    kd_loss = logp_BT.new_zeros(())
    if kd_BT is not None:
        kd_loss = (ratio_BT * kd_BT * kd_mask_BT).sum() / n_kd

    loss = pg_coef * pg_loss + beta * kd_loss + nll_coef * nll_loss
    metrics = {
        "loss": loss.detach(),
        "pg_loss": pg_loss.detach(),
        "kd_loss": kd_loss.detach(),
        "nll_loss": nll_loss.detach(),
        "clip_frac": (clipped_BT * mask_BT).sum().detach() / n,
        "kd_token_frac": kd_mask_BT.sum().detach() / n,
    }
    return loss, metrics


def signal_norms_sq(
    *,
    estimator: str,
    logp_BT: torch.Tensor,
    teacher_logp_BT: torch.Tensor | None,
    mask_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    kd_mask_B: torch.Tensor,
    beta: float,
    num_tokens: torch.Tensor | float,
    num_kd_tokens: torch.Tensor | float,
    pg_coef: float = 1.0,
) -> torch.Tensor:
    """[‖g_kd‖², ‖g_pg‖²]: squared norms, over the batch's tokens, of each term's coefficient of
    ∂L/∂log π_θ(o_{i,t}) in `kdrl_loss` on-policy (ρ = 1, nothing clipped). The KD signal share
    is √(first / second): how large the distillation's push on each sampled token's log-prob is
    beside the GRPO one's, without another backward.

        g_pg = −pg_coef · Â_i / N
        g_kd = β · kdmask_i · c_{i,t} / N_kd,  c = ∂kd/∂log π_θ: k2 → log π_θ − log π_T (= k1),
               k3 → 1 − π_T/π_θ, k1 (reward form, inside the GRPO term) → pg_coef · k1

    The top-k estimator has no coefficient on the sampled token: its first entry is NaN. Masked
    tokens count 0; sums, so ranks add them (`kdrl.distributed`).

    One token, Â = 0.5, p_θ = 0.5, p_T = 0.9, β = 0.1, N = N_kd = 1, k2: g_pg = −0.5,
    g_kd = 0.1 · ln(0.5/0.9) = −0.0587787; share 0.117557.

    >>> import math
    >>> sq = signal_norms_sq(estimator="k2", logp_BT=torch.tensor([[math.log(0.5)]]),
    ...                      teacher_logp_BT=torch.tensor([[math.log(0.9)]]), mask_BT=torch.ones(1, 1),
    ...                      advantages_B=torch.tensor([0.5]), kd_mask_B=torch.ones(1), beta=0.1,
    ...                      num_tokens=1, num_kd_tokens=1)
    >>> round(math.sqrt(sq[0] / sq[1]), 6)
    0.117557
    """
    logp_BT = _at_least_fp32(logp_BT)
    dtype = logp_BT.dtype
    mask_BT = mask_BT.to(dtype)
    n = torch.as_tensor(num_tokens, dtype=dtype).clamp(min=1.0)
    n_kd = torch.as_tensor(num_kd_tokens, dtype=dtype).clamp(min=1.0)
    pg_sq = ((pg_coef * advantages_B.to(dtype)[:, None] / n).square() * mask_BT).sum()
    if teacher_logp_BT is None or beta == 0:
        return torch.stack([pg_sq.new_zeros(()), pg_sq])
    if estimator == "topk":
        return torch.stack([pg_sq.new_tensor(float("nan")), pg_sq])
    kd_mask_BT = kd_mask_B.to(dtype)[:, None] * mask_BT
    # where no KD applies the teacher log-prob may be a fill value: R = 0 there (as `kdrl.train` does)
    k1_BT = reverse_kl_k1_BT(logp_BT, torch.where(kd_mask_BT > 0, teacher_logp_BT.to(dtype), logp_BT))
    coef_BT = {"k1": pg_coef * k1_BT, "k2": k1_BT, "k3": -torch.expm1(-k1_BT)}[estimator]
    kd_sq = ((beta * coef_BT / n_kd).square() * kd_mask_BT).sum()
    return torch.stack([kd_sq, pg_sq])
