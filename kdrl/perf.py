"""Model FLOPs and utilisation (MFU): what `perf/mfu` and scripts/gpu_check.py report.

FLOPs follow the usual rule (PaLM, verl's FlopsCounter, nanoGPT): 2·N per token forward, 6·N per
token trained (≈ 4·N where the base weights are frozen, as with LoRA: no weight gradients), N the
matmul parameters (every linear layer and the output head; the input embedding is a lookup),
attention's quadratic term and gradient checkpointing's recompute not counted. MFU divides them
by the device's dense bf16 tensor-core peak, from NVIDIA's datasheets; a device without a known
peak (any CPU) has none, and MFU is NaN.
"""

from __future__ import annotations

import torch

BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "H20": 148e12, "A100": 312e12, "A800": 312e12,
             "L40S": 362e12, "B200": 2250e12}
"""Dense bf16 tensor-core peaks (FLOP/s) by name fragment (SXM parts)."""


def bf16_peak(device: torch.device | str) -> float | None:
    """The dense bf16 peak of a CUDA device whose name is in BF16_PEAK, else None.

    >>> bf16_peak("cpu") is None
    True
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


def matmul_params(model: torch.nn.Module) -> int:
    """N of the 2·N / 6·N rule: the weights of every linear layer and the output head (tied or
    not: the head is a matmul); not the input embedding (a lookup), norms or biases.

    >>> m = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    >>> matmul_params(m)
    12
    """
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def train_flops(model: torch.nn.Module, tokens: int) -> float:
    """Model FLOPs of one training pass over `tokens` tokens: 2·N forward + 2·N input gradients
    + 2·N_trained weight gradients per token, i.e. 6·N for a fully trained model and ≈ 4·N for a
    LoRA student (its frozen base has no weight gradients).

    >>> frozen, adapter = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2)
    >>> _ = frozen.requires_grad_(False)
    >>> train_flops(torch.nn.Linear(4, 3), 10), train_flops(torch.nn.Sequential(frozen, adapter), 10)
    (720.0, 960.0)
    """
    trained = sum(m.weight.numel() for m in model.modules()
                  if isinstance(m, torch.nn.Linear) and m.weight.requires_grad)
    return float((4 * matmul_params(model) + 2 * trained) * tokens)


def mfu(flops: float, seconds: float, peak: float | None, devices: int = 1) -> float:
    """flops / (seconds × peak × devices); NaN without a peak.

    >>> mfu(989.4e12, 2.0, 989.4e12), mfu(1.0, 1.0, None)
    (0.5, nan)
    """
    if not peak or seconds <= 0:
        return float("nan")
    return flops / (seconds * peak * devices)


CPU_TOKENS_PER_PASS = 1024
"""On a CPU, the most padded tokens one teacher-scoring forward or one update forward/backward
takes: smaller passes keep the activations in cache and ran faster there than the configured
GPU-sized ones (embedded chain task, a 16x8 batch, 1 thread: teacher scoring 1.9x faster than
one 16k-token pass, the update 1.2x faster than 64-row micro-batches; docs/benchmarks.md).
A configured budget below it is kept; on a GPU the configured budgets apply as set."""


def pass_token_budget(configured: int, device: torch.device | str) -> int:
    """The token budget of one pass on `device`: `configured` (0 = no budget), capped at
    `CPU_TOKENS_PER_PASS` on a CPU. Every budget is a maximum, so the cap changes how rows are
    split, never what is computed (up to the rounding of sums).

    >>> pass_token_budget(16384, "cpu"), pass_token_budget(0, "cpu"), pass_token_budget(512, "cpu")
    (1024, 1024, 512)
    >>> pass_token_budget(16384, "cuda"), pass_token_budget(0, "cuda")
    (16384, 0)
    """
    if torch.device(device).type != "cpu":
        return configured
    return min(configured, CPU_TOKENS_PER_PASS) if configured else CPU_TOKENS_PER_PASS
