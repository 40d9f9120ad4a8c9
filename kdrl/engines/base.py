"""The two seams of the system: who samples responses, and who scores them with the teacher."""

from __future__ import annotations

from typing import Protocol

from kdrl.types import Rollouts, TeacherScores


def check_generate_args(prompt_token_ids: list[list[int]], *, n: int, max_new_tokens: int, temperature: float) -> None:
    """The arguments every `RolloutEngine.generate` refuses."""
    if n < 1 or max_new_tokens < 1 or temperature < 0:
        raise ValueError(f"need n >= 1, max_new_tokens >= 1, temperature >= 0 "
                         f"(got {n}, {max_new_tokens}, {temperature})")
    if any(len(p) == 0 for p in prompt_token_ids):
        raise ValueError("empty prompt: every prompt needs at least one token (e.g. <bos>)")


def check_score_args(prompt_token_ids: list[list[int]], completion_token_ids: list[list[int]]) -> None:
    """The arguments every `TeacherScorer.score` refuses."""
    if len(prompt_token_ids) != len(completion_token_ids):
        raise ValueError(f"{len(prompt_token_ids)} prompts vs {len(completion_token_ids)} completions")
    if any(len(p) == 0 for p, c in zip(prompt_token_ids, completion_token_ids) if c):
        raise ValueError("empty prompt: no position predicts the first completion token")


class RolloutEngine(Protocol):
    """Samples G responses per prompt from the current policy."""

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> Rollouts:
        """n samples per prompt; rows ordered prompt-major (prompt 0's n samples first)."""
        ...

    def sync_weights(self) -> float | None:
        """Make the next generate() use the trainer's current weights (seconds it took, or None
        when the engine runs on the trainer's own module)."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory until the next sync/generate (no-op where there is none to free)."""
        ...

    def wake(self) -> None:
        """Take the memory back after `sleep` (generate and sync_weights also do it)."""
        ...


class SyncedEngine(RolloutEngine, Protocol):
    """An engine holding its own copy of the trainer's weights (vLLM), which can drift."""

    def logprob_gap(self, prompt_token_ids: list[list[int]],
                    completion_token_ids: list[list[int]]) -> tuple[float, float]:
        """(max, mean) |log π_engine − log π_trainer| over the completion tokens given."""
        ...


class TeacherScorer(Protocol):
    """Scores completions the student generated, token by token, under the teacher."""

    def score(
        self,
        prompt_token_ids: list[list[int]],
        completion_token_ids: list[list[int]],
        *,
        top_k: int = 0,
    ) -> TeacherScores:
        """log π_T(o_t | prompt, o_<t) for every completion token (and top-k when top_k > 0)."""
        ...
