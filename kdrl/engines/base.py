"""The two seams of the system: who samples responses, and who scores them with the teacher."""

from __future__ import annotations

from typing import Protocol

from kdrl.types import Rollouts, TeacherScores


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
