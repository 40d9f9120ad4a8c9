"""Parquet rows → padded tensors: the only place padding happens.

Layout of one sequence row (width S = W + T):

    [ pad … pad | prompt tokens ][ completion tokens | pad … pad ]
      ← left-padded to W →        ← right-padded to T →

so completion token t of every row sits at column W + t, and the logits that predict it are at
column W + t − 1. Position ids count real tokens only (cumsum of the attention mask − 1), the
same convention as transformers' ``generate``, so trainer log-probs match the sampler's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import polars as pl
import torch

from kdrl.storage import KEY


@dataclass(frozen=True)
class StepBatch:
    """One rollout batch as tensors; rows sorted by (prompt_id, sample_idx), G rows per prompt."""

    input_ids_BS: torch.Tensor
    attention_mask_BS: torch.Tensor
    position_ids_BS: torch.Tensor
    completion_ids_BT: torch.Tensor
    completion_mask_BT: torch.Tensor
    sampler_logp_BT: torch.Tensor
    rewards_PG: torch.Tensor
    truncated_B: torch.Tensor
    teacher_logp_BT: torch.Tensor | None
    teacher_topk_ids_BTK: torch.Tensor | None
    teacher_topk_logp_BTK: torch.Tensor | None
    keys: pl.DataFrame
    """(step, prompt_id, sample_idx) of each row, in row order."""

    @property
    def num_rows(self) -> int:
        return self.input_ids_BS.shape[0]

    def rows(self, start: int, stop: int) -> StepBatch:
        """A micro-batch view of rows [start, stop) (per-prompt tensors are not sliced)."""
        return self._per_row(lambda value: value[start:stop], lambda keys: keys.slice(start, stop - start))

    def take(self, index: torch.Tensor) -> StepBatch:
        """The rows in the order of `index` (per-prompt tensors are not reordered)."""
        return self._per_row(lambda value: value[index.to(value.device)], lambda keys: keys[index.tolist()])

    def _per_row(self, tensor_rows, key_rows) -> StepBatch:
        """`tensor_rows` applied to every per-row tensor, `key_rows` to the keys; per-prompt (_PG)
        tensors and None fields as they are."""
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "keys":
                value = key_rows(value)
            elif isinstance(value, torch.Tensor) and not f.name.endswith("_PG"):
                value = tensor_rows(value)
            picked[f.name] = value
        return StepBatch(**picked)

    def groups(self, start: int, stop: int) -> StepBatch:
        """Prompt groups [start, stop): their G rows each and their rows of the per-prompt
        tensors (a data-parallel rank's share, `kdrl.distributed`)."""
        G = self.rewards_PG.shape[1]
        share = self.rows(start * G, stop * G)
        return replace(share, rewards_PG=self.rewards_PG[start:stop])

    def trimmed(self) -> StepBatch:
        """The same rows without the padding columns they all share: the left-padding columns
        no row's prompt reaches and the completion columns past the longest completion. Values at
        real tokens (and their position ids) are unchanged; a micro-batch of short rows costs its
        own length, not the batch's longest."""
        W = self.input_ids_BS.shape[1] - self.completion_ids_BT.shape[1]
        prompt_len_B = self.attention_mask_BS[:, :W].sum(dim=1)
        lead = W - int(prompt_len_B.max()) if self.num_rows else 0
        T = max(1, int(self.completion_mask_BT.sum(dim=1).max())) if self.num_rows else 1
        cut = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and "_BS" in f.name:
                value = value[:, lead : W + T]
            elif isinstance(value, torch.Tensor) and "_BT" in f.name:
                value = value[:, :T]
            cut[f.name] = value
        return StepBatch(**cut)

    def to(self, device: torch.device) -> StepBatch:
        moved = {
            f.name: (getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor)
                     else getattr(self, f.name))
            for f in fields(self)
        }
        return StepBatch(**moved)


def _pad_right(seqs: list[list], width: int, value, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(seqs), width), value, dtype=dtype)
    for i, seq in enumerate(seqs):
        if seq:
            out[i, : len(seq)] = torch.tensor(seq, dtype=dtype)
    return out


def _pad_left(seqs: list[list], width: int, value, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(seqs), width), value, dtype=dtype)
    for i, seq in enumerate(seqs):
        if seq:
            out[i, width - len(seq) :] = torch.tensor(seq, dtype=dtype)
    return out


def _pad_topk(rows: list[list[list]] | None, width: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros((len(rows), width, k), dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


def join_step_tables(rollouts: pl.DataFrame, rewards: pl.DataFrame, teacher: pl.DataFrame | None) -> pl.DataFrame:
    """Rollouts ⋈ rewards (⋈ teacher) on the key, sorted by (prompt_id, sample_idx); every rollout
    must have a reward, and a teacher row when a teacher table is given (rows the KD mask skipped
    are present with null log-probs)."""
    joined = rollouts.join(rewards, on=list(KEY), how="left", validate="1:1")
    missing = joined.filter(pl.col("reward").is_null())
    if len(missing):
        raise ValueError(f"rewards table lacks {len(missing)} rollouts, first key {missing.select(KEY).row(0)}")
    if teacher is not None:
        joined = joined.join(teacher, on=list(KEY), how="left", validate="1:1")
    return joined.sort("prompt_id", "sample_idx")


def collate(joined: pl.DataFrame, *, pad_token_id: int) -> StepBatch:
    """Pad a joined step table (see `join_step_tables`) into a StepBatch. Every prompt must have
    the same number G of samples (the GRPO group)."""
    counts = joined.group_by("prompt_id").len()["len"].unique()
    if len(counts) != 1:
        raise ValueError(f"every prompt needs the same number of samples; found group sizes {sorted(counts.to_list())}")
    G = int(counts[0])
    prompts = joined["prompt_token_ids"].to_list()
    completions = joined["completion_token_ids"].to_list()
    W = max(len(p) for p in prompts)
    T = max(1, max(len(c) for c in completions))
    prompt_ids_BW = _pad_left(prompts, W, pad_token_id, torch.long)
    prompt_mask_BW = _pad_left([[1] * len(p) for p in prompts], W, 0, torch.long)
    completion_ids_BT = _pad_right(completions, T, pad_token_id, torch.long)
    completion_mask_BT = _pad_right([[1] * len(c) for c in completions], T, 0, torch.long)
    attention_mask_BS = torch.cat([prompt_mask_BW, completion_mask_BT], dim=1)
    position_ids_BS = (attention_mask_BS.cumsum(dim=1) - 1).clamp(min=0)

    teacher_logp_BT = topk_ids_BTK = topk_logp_BTK = None
    if "teacher_logprobs" in joined.columns:
        scored = [row if row is not None else [] for row in joined["teacher_logprobs"].to_list()]
        teacher_logp_BT = _pad_right(scored, T, 0.0, torch.float32)
        ids = joined["topk_ids"].to_list()
        if any(r is not None for r in ids):
            k = max(len(r[0]) for r in ids if r)
            topk_ids_BTK = _pad_topk([r or [] for r in ids], T, k, torch.long)
            topk_logp_BTK = _pad_topk([r or [] for r in joined["topk_logprobs"].to_list()], T, k, torch.float32)
    return StepBatch(
        input_ids_BS=torch.cat([prompt_ids_BW, completion_ids_BT], dim=1),
        attention_mask_BS=attention_mask_BS,
        position_ids_BS=position_ids_BS,
        completion_ids_BT=completion_ids_BT,
        completion_mask_BT=completion_mask_BT.float(),
        sampler_logp_BT=_pad_right(joined["sampler_logprobs"].to_list(), T, 0.0, torch.float32),
        rewards_PG=torch.tensor(joined["reward"].to_list(), dtype=torch.float32).view(-1, G),
        truncated_B=torch.tensor((joined["finish_reason"] == "length").to_list(), dtype=torch.bool),
        teacher_logp_BT=teacher_logp_BT,
        teacher_topk_ids_BTK=topk_ids_BTK,
        teacher_topk_logp_BTK=topk_logp_BTK,
        keys=joined.select(KEY),
    )


def micro_batch_plan(prompt_lens: list[int], completion_lens: list[int], *, max_rows: int,
                     max_tokens: int = 0) -> tuple[list[int] | None, list[tuple[int, int]]]:
    """The row order and the [start, stop) micro-batches (over that order) an update runs.

    Each micro-batch is trimmed to its own longest prompt and completion, so rows of similar
    lengths side by side carry less padding: the rows sorted by (completion, prompt) length are
    taken when that splits into fewer padded tokens than the batch order (order None = the batch
    order; one micro-batch always keeps it: nothing to save, and the same sums).

    >>> micro_batch_plan([2, 2, 2, 2], [9, 1, 8, 2], max_rows=2)  # 2·(2+9) + 2·(2+2) vs 4·(2+9)
    ([1, 3, 2, 0], [(0, 2), (2, 4)])
    >>> micro_batch_plan([2, 2, 2, 2], [9, 1, 8, 2], max_rows=4)
    (None, [(0, 4)])
    """
    plain = micro_batches(prompt_lens, completion_lens, max_rows=max_rows, max_tokens=max_tokens)
    order = sorted(range(len(prompt_lens)), key=lambda r: (completion_lens[r], prompt_lens[r]))
    P, C = [prompt_lens[r] for r in order], [completion_lens[r] for r in order]
    by_length = micro_batches(P, C, max_rows=max_rows, max_tokens=max_tokens)

    def padded(bounds, P, C):
        return sum((b - a) * (max(P[a:b]) + max(C[a:b])) for a, b in bounds)

    if len(plain) > 1 and padded(by_length, P, C) < padded(plain, prompt_lens, completion_lens):
        return order, by_length
    return None, plain


def micro_batches(prompt_lens: list[int], completion_lens: list[int], *, max_rows: int,
                  max_tokens: int = 0) -> list[tuple[int, int]]:
    """Split rows 0..B-1, in order, into [start, stop) micro-batches of at most `max_rows` rows
    whose padded size once trimmed, rows × (longest prompt + longest completion among them), stays within
    `max_tokens` (0 = no token budget). A row longer than the budget alone gets a micro-batch of
    its own. Rows stay in order (a GRPO group's rows stay together where they fit).

    >>> micro_batches([2, 2, 2, 2], [3, 3, 10, 1], max_rows=4)
    [(0, 4)]
    >>> micro_batches([2, 2, 2, 2], [3, 3, 10, 1], max_rows=4, max_tokens=12)
    [(0, 2), (2, 3), (3, 4)]
    >>> micro_batches([2, 2, 2], [3, 3, 3], max_rows=2, max_tokens=100)
    [(0, 2), (2, 3)]
    >>> micro_batches([9, 1], [1, 9], max_rows=2, max_tokens=20)  # 2 × (9 + 9) > 20
    [(0, 1), (1, 2)]
    """
    bounds, start, longest_p, longest_c = [], 0, 0, 0
    for row, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        width = max(longest_p, p) + max(longest_c, c)  # what `StepBatch.trimmed` keeps
        if row > start and (row - start >= max_rows or (max_tokens and (row - start + 1) * width > max_tokens)):
            bounds.append((start, row))
            start, longest_p, longest_c = row, 0, 0
        longest_p, longest_c = max(longest_p, p), max(longest_c, c)
    if len(prompt_lens) > start:
        bounds.append((start, len(prompt_lens)))
    return bounds
