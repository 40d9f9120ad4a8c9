"""The nouns the engines hand back: columnar, plain-Python records (one row per response).

Token alignment, used everywhere: for a response with completion ids o_0..o_{T-1},
``sampler_logprobs[t]`` and a teacher's ``logprobs[t]`` are log π(o_t | prompt, o_<t).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Rollouts:
    """Sampled responses, row r belongs to prompt ``prompt_index[r]`` (index into the prompt list
    given to the engine) and is its ``sample_index[r]``-th sample (0..G-1)."""

    prompt_index: list[int]
    sample_index: list[int]
    prompt_token_ids: list[list[int]]
    completion_token_ids: list[list[int]]
    sampler_logprobs: list[list[float]]
    finish_reason: list[FinishReason]
    completion_text: list[str]

    def __len__(self) -> int:
        return len(self.prompt_index)


@dataclass(frozen=True)
class TeacherScores:
    """Teacher log-probs of given completions, aligned to their completion tokens.
    ``topk_ids``/``topk_logprobs`` are [row][t][k] when top-k was asked for, else None."""

    logprobs: list[list[float]]
    topk_ids: list[list[list[int]]] | None = None
    topk_logprobs: list[list[list[float]]] | None = None
