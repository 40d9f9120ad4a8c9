"""The KDRL objective: hand-computed values, exact-expectation gradient checks, invariances.

Gradient checks enumerate every token sequence of a tiny vocabulary, so expectations over the
sampling distribution are exact sums (float64, tolerance 1e-10), not Monte Carlo estimates.
"""

import itertools
import math

import pytest
import torch

from kdrl.advantages import group_advantages_PG, token_count
from kdrl.losses import (
    beta_constant,
    beta_linear,
    kd_mask_group_PG,
    kd_mask_none_PG,
    kd_mask_response_PG,
    kdrl_loss,
    policy_gradient_BT,
    reverse_kl_full_BT,
    reverse_kl_k1_BT,
    reverse_kl_k2_BT,
    reverse_kl_k3_BT,
    reverse_kl_topk_BT,
    signal_norms_sq,
)

LOG = math.log


# ---------------------------------------------------------------- hand-computed values


def test_estimators_on_the_worked_token():
    # p_s = 0.5, p_t = 0.9 → log p_s − log p_t = ln(5/9) = −0.587787
    s, t = torch.tensor([[LOG(0.5)]], dtype=torch.float64), torch.tensor([[LOG(0.9)]], dtype=torch.float64)
    assert reverse_kl_k1_BT(s, t).item() == pytest.approx(-0.587787, abs=1e-6)
    # k2 = ½ · 0.587787² = 0.172747
    assert reverse_kl_k2_BT(s, t).item() == pytest.approx(0.172747, abs=1e-6)
    # k3 = e^{0.587787} − 0.587787 − 1 = 1.8 − 1.587787 = 0.212213
    assert reverse_kl_k3_BT(s, t).item() == pytest.approx(0.212213, abs=1e-6)


def test_full_kl_direction_is_pinned_by_a_two_token_example():
    # KL(s‖t) = .5 ln(.5/.9) + .5 ln(.5/.1) = 0.510826 ; KL(t‖s) = .9 ln(.9/.5) + .1 ln(.1/.5) = 0.368064
    s = torch.log(torch.tensor([[[0.5, 0.5]]], dtype=torch.float64))
    t = torch.log(torch.tensor([[[0.9, 0.1]]], dtype=torch.float64))
    assert reverse_kl_full_BT(s, t).item() == pytest.approx(0.510826, abs=1e-6)
    assert reverse_kl_full_BT(t, s).item() == pytest.approx(0.368064, abs=1e-6)


def test_divergences_are_zero_on_identical_inputs_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    logits_BTV = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    assert torch.allclose(reverse_kl_full_BT(logits_BTV, logits_BTV), torch.zeros(3, 4, dtype=torch.float64))
    assert torch.allclose(reverse_kl_topk_BT(logits_BTV, logits_BTV), torch.zeros(3, 4, dtype=torch.float64))
    other_BTV = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    assert (reverse_kl_full_BT(logits_BTV, other_BTV) > 0).all()
    logp_BT = torch.randn(3, 4, generator=g, dtype=torch.float64)
    assert torch.equal(reverse_kl_k2_BT(logp_BT, logp_BT), torch.zeros_like(logp_BT))
    assert torch.equal(reverse_kl_k3_BT(logp_BT, logp_BT), torch.zeros_like(logp_BT))
    assert (reverse_kl_k3_BT(logp_BT, logp_BT + 0.3) > 0).all()


def test_topk_renormalises_over_the_teacher_support():
    # Student mass 0.2 + 0.2 on the two ids → renormalised [0.5, 0.5]; teacher [0.6, 0.2] → [0.75, 0.25]
    # KL = .5 ln(.5/.75) + .5 ln(.5/.25) = .5(−0.405465) + .5(0.693147) = 0.143841
    s = torch.log(torch.tensor([[[0.2, 0.2]]], dtype=torch.float64))
    t = torch.log(torch.tensor([[[0.6, 0.2]]], dtype=torch.float64))
    assert reverse_kl_topk_BT(s, t).item() == pytest.approx(0.143841, abs=1e-6)


def test_group_advantages_worked_numbers():
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    # mean 0.5; unbiased std = sqrt(4·0.25/3) = 0.57735 → ±0.5/0.57735 = ±0.866025
    assert torch.allclose(group_advantages_PG(r, unbiased=True), torch.tensor([[1, -1, 1, -1]]) * 0.866025, atol=1e-5)
    # population std = 0.5 → ±1
    assert torch.allclose(group_advantages_PG(r, unbiased=False), torch.tensor([[1.0, -1.0, 1.0, -1.0]]), atol=1e-5)
    assert torch.equal(group_advantages_PG(r, std_normalize=False), torch.tensor([[0.5, -0.5, 0.5, -0.5]]))
    # all-equal groups and single-sample groups: exactly zero, never NaN
    assert torch.equal(group_advantages_PG(torch.ones(2, 4)), torch.zeros(2, 4))
    assert torch.equal(group_advantages_PG(torch.ones(3, 1)), torch.zeros(3, 1))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("std_normalize", [True, False])
def test_group_advantages_reference_twin(seed, unbiased, std_normalize):
    g = torch.Generator().manual_seed(seed)
    rewards_PG = (torch.rand(6, 5, generator=g) > 0.5).float()
    expected = torch.zeros(6, 5)
    for p in range(6):
        row = rewards_PG[p].tolist()
        mean = sum(row) / len(row)
        var = sum((x - mean) ** 2 for x in row) / (len(row) - (1 if unbiased else 0))
        for j, x in enumerate(row):
            expected[p, j] = (x - mean) / (math.sqrt(var) + 1e-6) if std_normalize else x - mean
    got = group_advantages_PG(rewards_PG, std_normalize=std_normalize, unbiased=unbiased)
    assert torch.allclose(got, expected, atol=1e-6)


def test_beta_schedules():
    # paper numbers: 5e-3 − 5e-5·s, floor 1e-3 reached at s = 80
    assert beta_constant(123, beta_init=5e-3) == 5e-3
    assert beta_linear(0, beta_init=5e-3, beta_min=1e-3, delta=5e-5) == 5e-3
    assert beta_linear(20, beta_init=5e-3, beta_min=1e-3, delta=5e-5) == pytest.approx(4e-3)
    assert beta_linear(79, beta_init=5e-3, beta_min=1e-3, delta=5e-5) == pytest.approx(1.05e-3)
    assert beta_linear(80, beta_init=5e-3, beta_min=1e-3, delta=5e-5) == pytest.approx(1e-3)
    assert beta_linear(280, beta_init=5e-3, beta_min=1e-3, delta=5e-5) == 1e-3
    betas = [beta_linear(s, beta_init=5e-3, beta_min=1e-3, delta=5e-5) for s in range(200)]
    assert all(a >= b for a, b in zip(betas, betas[1:]))


def test_reward_guided_masks_by_hand():
    correct_PG = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert torch.equal(kd_mask_none_PG(correct_PG), torch.ones(3, 3))
    assert torch.equal(kd_mask_response_PG(correct_PG), torch.tensor([[0.0, 1, 1], [1, 1, 1], [0, 0, 0]]))
    assert torch.equal(kd_mask_group_PG(correct_PG), torch.tensor([[0.0, 0, 0], [1, 1, 1], [0, 0, 0]]))


def test_clipping_acts_only_off_policy():
    # A = +1, ρ = e^{0.5} = 1.6487 > 1.2 → clipped term 1.2 is the min → loss −1.2, flagged
    logp = torch.tensor([[0.5, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0]])
    loss_BT, clipped_BT = policy_gradient_BT(logp, old, adv, clip_eps_low=0.2, clip_eps_high=0.2)
    assert loss_BT[0].tolist() == pytest.approx([-1.2, -1.0])
    assert clipped_BT.tolist() == [[1.0, 0.0]]
    loss_BT.sum().backward()
    # the clipped token carries no gradient; the on-policy one has −A·ρ = −1
    assert logp.grad[0].tolist() == pytest.approx([0.0, -1.0])


# ---------------------------------------------------------------- the combined loss


def _batch(seed, B=6, T=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask_BT = (torch.arange(T)[None, :] < lengths[:, None]).float()
    theta_BT = torch.randn(B, T, generator=g, dtype=dtype)
    teacher_BT = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    adv_B = torch.randn(B, generator=g, dtype=dtype)
    kd_mask_B = (torch.rand(B, generator=g) > 0.3).float()
    return mask_BT, theta_BT, teacher_BT, adv_B, kd_mask_B


def _loss(theta_BT, teacher_BT, mask_BT, adv_B, kd_mask_B, n, n_kd, **kw):
    logp_BT = torch.nn.functional.logsigmoid(theta_BT)  # any differentiable log-prob parametrisation
    return kdrl_loss(
        logp_BT=logp_BT, old_logp_BT=logp_BT.detach(), mask_BT=mask_BT, advantages_B=adv_B,
        kd_BT=reverse_kl_k2_BT(logp_BT, teacher_BT), kd_reward_BT=None, kd_mask_B=kd_mask_B,
        beta=0.3, num_tokens=n, num_kd_tokens=n_kd, **kw,
    )


@pytest.mark.parametrize("seed", range(3))
def test_loss_is_invariant_to_micro_batching(seed):
    mask_BT, theta_BT, teacher_BT, adv_B, kd_mask_B = _batch(seed, dtype=torch.float64)
    n = token_count(mask_BT)
    n_kd = token_count(kd_mask_B[:, None] * mask_BT)
    full = theta_BT.clone().requires_grad_()
    loss_full, m_full = _loss(full, teacher_BT, mask_BT, adv_B, kd_mask_B, n, n_kd, nll_coef=0.1)
    loss_full.backward()

    split = theta_BT.clone().requires_grad_()
    total = 0.0
    metric_sum = {k: 0.0 for k in m_full}
    for idx in (slice(0, 1), slice(1, 4), slice(4, 6)):
        loss_mb, m_mb = _loss(split[idx], teacher_BT[idx], mask_BT[idx], adv_B[idx], kd_mask_B[idx], n, n_kd,
                              nll_coef=0.1)
        loss_mb.backward()
        total += loss_mb.item()
        metric_sum = {k: metric_sum[k] + m_mb[k].item() for k in m_mb}
    assert total == pytest.approx(loss_full.item(), abs=1e-12)
    assert torch.allclose(split.grad, full.grad, atol=1e-12)
    for key in m_full:  # metrics are additive over micro-batches too
        assert metric_sum[key] == pytest.approx(m_full[key].item(), abs=1e-12)


def test_fully_masked_batch_gives_zero_not_nan():
    mask_BT, theta_BT, teacher_BT, adv_B, _ = _batch(0)
    theta = theta_BT.clone().requires_grad_()
    # every response KD-masked, zero KD denominator
    loss, metrics = _loss(theta, teacher_BT, mask_BT, torch.zeros_like(adv_B), torch.zeros(6), token_count(mask_BT),
                          0.0)
    loss.backward()
    assert loss.item() == 0.0 and metrics["kd_loss"].item() == 0.0
    assert torch.isfinite(theta.grad).all() and theta.grad.abs().sum() == 0
    # no completion tokens at all
    theta2 = theta_BT.clone().requires_grad_()
    loss2, metrics2 = _loss(theta2, teacher_BT, torch.zeros_like(mask_BT), adv_B, torch.ones(6), 0.0, 0.0)
    loss2.backward()
    assert loss2.item() == 0.0 and all(torch.isfinite(v) for v in metrics2.values())
    assert theta2.grad.abs().sum() == 0


def test_kd_denominator_choice_by_hand():
    # two responses of 2 tokens; only the second is KD-unmasked; k2 values 0.5 and 1.5 on it
    # (log-ratio 1 and √3). "all": (0.5+1.5)/4 = 0.5 ; "unmasked": (0.5+1.5)/2 = 1.0
    logp = torch.zeros(2, 2)
    teacher = torch.tensor([[0.0, 0.0], [-1.0, -math.sqrt(3.0)]])
    kd_BT = reverse_kl_k2_BT(logp, teacher)
    common = dict(logp_BT=logp, old_logp_BT=logp, mask_BT=torch.ones(2, 2), advantages_B=torch.zeros(2),
                  kd_BT=kd_BT, kd_reward_BT=None, kd_mask_B=torch.tensor([0.0, 1.0]), beta=1.0, num_tokens=4.0)
    assert kdrl_loss(**common, num_kd_tokens=4.0)[1]["kd_loss"].item() == pytest.approx(0.5)
    assert kdrl_loss(**common, num_kd_tokens=2.0)[1]["kd_loss"].item() == pytest.approx(1.0)


# ---------------------------------------------------------------- exact expected gradients
#
# A "model" over sequences of 2 tokens from a vocabulary of V: logits θ0 (V,) for position 0 and
# θ1 (V, V) for position 1 given the first token. All V² sequences are enumerated, each weighted by
# its (detached) probability under the student, so E[∇ loss] is exact.

V = 3


def _tables(seed):
    g = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    theta1 = torch.randn(V, V, generator=g, dtype=torch.float64, requires_grad=True)
    t0 = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
    t1 = torch.log_softmax(torch.randn(V, V, generator=g, dtype=torch.float64), -1)
    return theta0, theta1, t0, t1


def _expected_grad(seed, per_sequence_loss):
    """Σ_seq sg(π(seq)) ∇ loss(seq); loss(seq) gets the student/teacher log-probs of its 2 tokens."""
    theta0, theta1, t0, t1 = _tables(seed)
    s0, s1 = torch.log_softmax(theta0, -1), torch.log_softmax(theta1, -1)
    total = 0.0
    for a, b in itertools.product(range(V), repeat=2):
        logp_1T = torch.stack([s0[a], s1[a, b]])[None]
        teacher_1T = torch.stack([t0[a], t1[a, b]])[None]
        weight = (s0[a] + s1[a, b]).exp().detach()
        total = total + weight * per_sequence_loss(logp_1T, teacher_1T)
    total.backward()
    return theta0.grad, theta1.grad


def _per_prefix_grad(seed, divergence):
    """∇ [D(π0, T0) + Σ_a sg(π0(a)) D(π1(·|a), T1(·|a))]: visited prefixes held fixed."""
    theta0, theta1, t0, t1 = _tables(seed)
    s0, s1 = torch.log_softmax(theta0, -1), torch.log_softmax(theta1, -1)
    objective = divergence(s0, t0) + sum(s0[a].exp().detach() * divergence(s1[a], t1[a]) for a in range(V))
    objective.backward()
    return theta0.grad, theta1.grad


def _rkl(logp_s, logp_t):
    return (logp_s.exp() * (logp_s - logp_t)).sum()


def _fkl(logp_s, logp_t):
    return (logp_t.exp() * (logp_t - logp_s)).sum()


def _via_kdrl_loss(kd_fn=None, reward_form=False, beta=1.0):
    def per_sequence(logp_1T, teacher_1T):
        loss, _ = kdrl_loss(
            logp_BT=logp_1T, old_logp_BT=logp_1T.detach(), mask_BT=torch.ones(1, 2), advantages_B=torch.zeros(1),
            kd_BT=None if kd_fn is None else kd_fn(logp_1T, teacher_1T),
            kd_reward_BT=reverse_kl_k1_BT(logp_1T, teacher_1T) if reward_form else None,
            kd_mask_B=torch.ones(1), beta=beta, num_tokens=1.0, num_kd_tokens=1.0, pg_coef=1.0,
        )
        return loss
    return per_sequence


@pytest.mark.parametrize("seed", range(4))
def test_k2_expected_gradient_is_the_reverse_kl_gradient(seed):
    got = _expected_grad(seed, _via_kdrl_loss(reverse_kl_k2_BT))
    want = _per_prefix_grad(seed, _rkl)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-10)
    assert want[0].abs().max() > 1e-3  # the check is not vacuous


@pytest.mark.parametrize("seed", range(4))
def test_k3_expected_gradient_is_the_forward_kl_gradient(seed):
    got = _expected_grad(seed, _via_kdrl_loss(reverse_kl_k3_BT))
    for g, w in zip(got, _per_prefix_grad(seed, _fkl)):
        assert torch.allclose(g, w, atol=1e-10)
    # ... and therefore not the reverse-KL gradient
    assert not torch.allclose(got[0], _per_prefix_grad(seed, _rkl)[0], atol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_k1_as_a_loss_has_zero_expected_gradient(seed):
    got = _expected_grad(seed, lambda s, t: reverse_kl_k1_BT(s, t).sum())
    for g in got:
        assert torch.allclose(g, torch.zeros_like(g), atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_k1_in_reward_form_gives_the_reverse_kl_gradient(seed):
    beta = 0.7
    got = _expected_grad(seed, _via_kdrl_loss(None, reward_form=True, beta=beta))
    for g, w in zip(got, _per_prefix_grad(seed, _rkl)):
        assert torch.allclose(g, beta * w, atol=1e-10)


def test_topk_with_full_support_equals_full_kl_and_its_gradient():
    g = torch.Generator().manual_seed(3)
    s_logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    full = reverse_kl_full_BT(s_logits, t_logits)
    ids = torch.argsort(t_logits, dim=-1, descending=True)  # K = V: the whole support
    topk = reverse_kl_topk_BT(torch.log_softmax(s_logits, -1).gather(-1, ids),
                              torch.log_softmax(t_logits, -1).gather(-1, ids))
    assert torch.allclose(full, topk, atol=1e-12)
    (grad_full,) = torch.autograd.grad(full.sum(), s_logits)
    (grad_topk,) = torch.autograd.grad(topk.sum(), s_logits)
    assert torch.allclose(grad_full, grad_topk, atol=1e-12)


# ---------------------------------------------------------------- KD signal share


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_the_signal_norms_are_those_of_each_terms_gradient_on_the_sampled_log_probs(estimator):
    """signal_norms_sq against autograd: ‖∂L/∂log π‖ of kdrl_loss with only the KD term on
    (its GRPO part subtracted for k1, which lives inside the GRPO term) and with only GRPO on."""
    torch.manual_seed(0)
    B, T = 6, 5
    logp = -torch.rand(B, T, dtype=torch.float64) * 3
    teacher = -torch.rand(B, T, dtype=torch.float64) * 3
    mask = (torch.rand(B, T) > 0.2).double()
    kd_mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    advantages = torch.randn(B, dtype=torch.float64)
    n, n_kd = mask.sum(), (kd_mask[:, None] * mask).sum()
    beta, pg_coef = 0.3, 0.7
    kd_fn = {"k1": None, "k2": reverse_kl_k2_BT, "k3": reverse_kl_k3_BT}[estimator]

    def grad(beta_, pg_coef_):
        x = logp.clone().requires_grad_(True)
        kd = None if kd_fn is None else kd_fn(x, teacher)
        kd_reward = reverse_kl_k1_BT(x, teacher) if kd_fn is None else None
        loss, _ = kdrl_loss(logp_BT=x, old_logp_BT=x.detach(), mask_BT=mask, advantages_B=advantages, kd_BT=kd,
                            kd_reward_BT=kd_reward, kd_mask_B=kd_mask, beta=beta_, num_tokens=n,
                            num_kd_tokens=n_kd, pg_coef=pg_coef_, clip_eps_low=10.0, clip_eps_high=10.0)
        return torch.autograd.grad(loss, x)[0]

    pg = grad(0.0, pg_coef)
    kd = grad(beta, pg_coef) - pg if estimator == "k1" else grad(beta, 0.0)
    sq = signal_norms_sq(estimator=estimator, logp_BT=logp, teacher_logp_BT=teacher, mask_BT=mask,
                         advantages_B=advantages, kd_mask_B=kd_mask, beta=beta, num_tokens=n, num_kd_tokens=n_kd,
                         pg_coef=pg_coef)
    assert sq[1].item() == pytest.approx(pg.square().sum().item(), rel=1e-10)
    assert sq[0].item() == pytest.approx(kd.square().sum().item(), rel=1e-10)
    assert sq[0] > 0


def test_the_signal_norms_without_a_teacher_or_with_top_k():
    args = dict(logp_BT=torch.zeros(1, 2), mask_BT=torch.ones(1, 2), advantages_B=torch.tensor([1.0]),
                kd_mask_B=torch.ones(1), beta=0.1, num_tokens=2, num_kd_tokens=2)
    assert signal_norms_sq(estimator="k2", teacher_logp_BT=None, **args).tolist() == [0.0, 0.5]
    kd_sq, pg_sq = signal_norms_sq(estimator="topk", teacher_logp_BT=torch.zeros(1, 2), **args).tolist()
    assert math.isnan(kd_sq) and pg_sq == 0.5
