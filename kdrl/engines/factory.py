"""The one place where engines are built: what a stage's config asks for, on a model folder or
an in-memory module.

Every caller (the rollout worker, the teacher's sampler and scorer, the baseline of a resumed
run, `kdrl eval`) describes its engine with an `EngineSpec` built from its own config section,
so they cannot disagree on the settings (dtype, vLLM options, seed, top-k capacity).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from kdrl.config import VLLMConfig
from kdrl.engines.base import RolloutEngine


@dataclass(frozen=True)
class EngineSpec:
    """An engine, as a stage's config describes it."""

    kind: Literal["hf", "vllm"]
    model_path: str
    dtype: str
    vllm: VLLMConfig
    batch_size: int
    seed: int
    max_logprobs: int = 20
    """The largest top-k a request may ask for (vLLM only)."""


def build_engine(spec: EngineSpec, tokenizer, *, module: torch.nn.Module | None = None,
                 log: Callable[[str], None] = print, name: str = "rollout") -> RolloutEngine:
    """An engine that samples from `spec.model_path`.

    hf: runs on `module` (required), the very weights in memory. vllm: loads the folder and, when
    `module` is given, takes that module as the weights `sync_weights` pushes (the trainer's)."""
    if spec.kind == "hf":
        from kdrl.engines.hf import HFRolloutEngine

        if module is None:
            raise ValueError("an hf engine runs on a module in memory: pass module=")
        return HFRolloutEngine(module, tokenizer, batch_size=spec.batch_size)
    from kdrl.engines.vllm import VLLMRolloutEngine, VLLMSettings, build_llm

    settings = VLLMSettings.from_config(spec.vllm, model_dtype=spec.dtype)
    started = time.perf_counter()
    llm = build_llm(spec.model_path, settings=settings, seed=spec.seed, max_logprobs=spec.max_logprobs)
    log(f"[kdrl] vLLM {name} engine on {spec.model_path} started in {time.perf_counter() - started:.1f}s")
    return VLLMRolloutEngine(llm, tokenizer, trainer_model=module, sleep_mode=settings.sleeps)
