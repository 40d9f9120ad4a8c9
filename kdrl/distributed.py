"""Data parallelism across processes with torch.distributed: what makes W ranks' update equal
one process's update on the whole batch (`kdrl.train.update_step(dp=...)`).

Every rank holds the whole model and optimizer and gets whole prompt groups of the batch (GRPO
advantages and the reward-guided KD mask are per group, so they need nothing from other ranks).
Then three sums across ranks, and nothing else, make the update the single-process one:

1. the global token denominators N and N_kd: each rank counts its rows' tokens, `sum` adds them,
   so every micro-batch on every rank divides by the batch's N (not its own share's);
2. the gradients: each rank's backward gives Σ over its tokens of ∂loss/N; `sum_gradients` adds
   them (bucketed all-reduce, as DistributedDataParallel does), so every rank holds the whole
   batch's gradient before clipping and the (identical) optimizer step;
3. the loss metrics, which are sums over tokens / N too.

A different world size sums the same terms in another order: weights equal to float rounding
(~1e-7 relative), not bit for bit. The same world size is deterministic (gloo and NCCL reduce in
a fixed order for a fixed world size on one machine).

With trainer.strategy "fsdp2" (`shard_model`), each rank holds 1/W of every parameter, gradient
and optimizer moment (FSDP2's `fully_shard`: one group per decoder layer, the embeddings, final
norm and head in the root's). Sum 2 is then FSDP's reduce-scatter after each micro-batch's
backward (a sum: the divide factor is set to 1, the denominators being global already), and every
forward all-gathers a layer's weights, so all ranks must run the same number of micro-batch
passes in lockstep: a rank with fewer runs zero-weighted ones (`update_step`), and a non-finite
loss stops all ranks at the same micro-batch.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

BUCKET_BYTES = 25 * 2**20
"""Gradients are all-reduced in flat buckets of about this size (DDP's default)."""


SHARDED_LOGPROBS = "kdrl_completion_logprobs"
"""The attribute of a sharded model through which `kdrl.train.completion_logprobs_BT` runs."""


class DataParallel:
    """This process's place in a data-parallel group (an initialized default process group).
    `sharded`: the model is FSDP2-sharded (`shard_model`), not replicated."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.sharded = False

    @classmethod
    def join(cls, *, rank: int, world_size: int, init_method: str, backend: str = "gloo",
             timeout_s: float = 600.0) -> DataParallel:
        """Join the group (every rank calls it; it returns once all have). `backend` is for the
        tensors on the device: "nccl" joins as "cpu:gloo,cuda:nccl", since the counts, flags and
        metrics are summed on the CPU."""
        if backend == "nccl":
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank, world_size)

    def sum(self, value: torch.Tensor | float) -> torch.Tensor:
        """The sum of `value` over the ranks (a new tensor; `value` is left as it is)."""
        total = torch.as_tensor(value).detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def sum_values(self, values: dict[str, float]) -> dict[str, float]:
        """Per key, the sum over the ranks (float64; every rank must pass the same keys)."""
        keys = sorted(values)
        totals = self.sum(torch.tensor([values[k] for k in keys], dtype=torch.float64))
        return dict(zip(keys, totals.tolist()))

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (every rank must call it)."""
        return bool(self.sum(torch.tensor(int(flag))).item())

    def from_rank0(self, value):
        """Rank 0's `value` (any picklable object) on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
        return box[0]

    def max(self, value: int) -> int:
        """The largest `value` over the ranks."""
        total = torch.tensor(int(value))
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
        return int(total.item())

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter], bucket_bytes: int = BUCKET_BYTES) -> None:
        """Replace every trainable parameter's gradient by its sum over the ranks. A parameter
        with a gradient on some rank but not on this one counts as zero here; one with none on any
        rank keeps none (the optimizer skips it, as it would in one process)."""
        params = [p for p in parameters if p.requires_grad]
        has_grad = self.sum(torch.tensor([p.grad is not None for p in params], dtype=torch.int32))
        params = [p for p, n in zip(params, has_grad.tolist()) if n > 0]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets(params, bucket_bytes):
            grads = [p.grad for p in bucket]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(summed)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """Leave the group (the process group is destroyed)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def shard_model(model: torch.nn.Module, completion_logprobs: Callable, device: torch.device | None = None) -> None:
    """FSDP2 in place: every decoder layer its own group (all-gathered for its forward and
    backward, resharded after), the rest (embeddings, final norm, LM head) the root's.

    The log-prob path (`completion_logprobs(model, batch, ...)`) calls the decoder and the head
    itself, not the model's forward, so it is registered as a forward method of the root: FSDP
    all-gathers the root's parameters around it and reduce-scatters their gradients after the
    backward. Gradients are summed across ranks, not averaged (the loss has global denominators).
    The model's own forward (the weight-sync check) works too; every rank must call either together.
    The shards go to `device` (default: where the model is; a model loaded on the CPU is moved
    shard by shard, so no rank ever holds the whole model on its GPU). Build the optimizer after
    this: the parameters are replaced by sharded ones (DTensors)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    device = device or next(model.parameters()).device
    mesh = DeviceMesh.from_group(dist.group.WORLD, device_type=device.type)

    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"trainer.strategy fsdp2: {type(model).__name__}'s decoder has no `layers` list to shard; "
                         "use trainer.strategy ddp")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    setattr(model, SHARDED_LOGPROBS, functools.partial(_cloned, completion_logprobs, model))
    register_fsdp_forward_method(model, SHARDED_LOGPROBS)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # a plain sum (gloo has no pre-multiplied sum)
            module.set_force_sum_reduction_for_comms(True)


def _cloned(fn: Callable, *args, **kwargs) -> tuple:
    """`fn`'s tensors, not views of its internals: FSDP hooks an output for its backward, and a
    view's hook is lost to any in-place use."""
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in fn(*args, **kwargs))


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU, gathered from a sharded model on rank 0 (an empty
    dict on the other ranks; every rank must call it), or the model's own state_dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _buckets(params: list[torch.nn.Parameter], bucket_bytes: int) -> list[list[torch.nn.Parameter]]:
    """Consecutive parameters of one dtype and device, about `bucket_bytes` each."""
    buckets: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        last = buckets[-1][-1] if buckets else None
        if last is None or size + nbytes > bucket_bytes or (last.dtype, last.device) != (p.dtype, p.device):
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets


def group_shards(num_groups: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges of `num_groups` prompt groups for `parts` ranks, as even as
    can be (the first ones one larger); a rank may get none when there are fewer groups.

    >>> group_shards(5, 2), group_shards(1, 2)
    ([(0, 3), (3, 5)], [(0, 1), (1, 1)])
    """
    base, extra = divmod(num_groups, parts)
    bounds, start = [], 0
    for part in range(parts):
        stop = start + base + (part < extra)
        bounds.append((start, stop))
        start = stop
    return bounds
