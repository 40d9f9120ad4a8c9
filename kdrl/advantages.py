"""Group-relative advantages (GRPO, Shao et al. 2024) and the token-mean normaliser.

Variant: Â_i = (r_i − mean_G r) / (std_G r + ε), one scalar per response, broadcast to its
tokens. Dividing by the std is optional (Dr. GRPO drops it); which std is explicit:
``unbiased=True`` (Bessel, torch's default, what verl and TRL use) or the population std.
For rewards [[1, 0, 1, 0]]: ±0.8660 (unbiased) or ±1.0 (population).

Token-level normalisation is DAPO style: every per-token term is summed and divided by one
global token count N = Σ_i |o_i| over the whole rollout batch. N is passed in explicitly, so a
batch split into micro-batches gives the same loss and gradient as the whole batch.
"""

from __future__ import annotations

import torch


def group_advantages_PG(
    rewards_PG: torch.Tensor,
    *,
    std_normalize: bool = True,
    unbiased: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Â_{p,g} = (r_{p,g} − mean_g r_{p,·}) / (std_g r_{p,·} + ε), or without the division.

    Groups with identical rewards (all right or all wrong) get advantage 0 exactly. A group of
    one sample has no spread and gets 0 (its unbiased std would be NaN).

    >>> r = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    >>> group_advantages_PG(r, unbiased=False, eps=0.0)
    tensor([[ 1., -1.,  1., -1.]])
    >>> group_advantages_PG(r, unbiased=True).round(decimals=4)
    tensor([[ 0.8660, -0.8660,  0.8660, -0.8660]])
    """
    rewards_PG = rewards_PG.float()
    centred_PG = rewards_PG - rewards_PG.mean(dim=1, keepdim=True)
    if not std_normalize:
        return centred_PG
    G = rewards_PG.shape[1]
    if G < 2:
        return torch.zeros_like(rewards_PG)
    std_P1 = rewards_PG.std(dim=1, keepdim=True, correction=1 if unbiased else 0)
    return centred_PG / (std_P1 + eps)


def token_count(mask_BT: torch.Tensor) -> torch.Tensor:
    """The global denominator N = Σ mask: completion tokens of the whole rollout batch.

    Compute it once over the full batch and pass it to every micro-batch's loss.

    >>> token_count(torch.tensor([[1, 1, 0], [1, 0, 0]]))
    tensor(3.)
    """
    return mask_BT.float().sum()
