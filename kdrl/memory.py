"""How much memory a training run needs on its training device: an estimate printed at start.

`estimate_memory` adds up what the trainer holds (student weights, AdamW moments, a teacher
kept on the device, vLLM engines' reserved fractions) and, per phase of an iteration, what
comes and goes (generation's KV cache, teacher scoring's logits, the update's gradients and
activations, the optimizer step's scratch); the peak is the resident part plus the largest
phase. Parameter counts are exact (the model built on the meta device from its config); the
rest is arithmetic over the shapes, each row showing it. `check_memory` runs it in
`kdrl.workers.load_run` before any weights load and, with ``run.memory_check=refuse``, stops a
run whose estimate exceeds the device with `MemoryEstimateError`, naming what to change.

What the update keeps per token and decoder layer (transformers' Llama/Qwen2 layers, SDPA), in
bytes, with d the parameter dtype's size, h hidden, I intermediate, n heads × head_dim:

    two RMSNorms 2·(4h + 4 + 2·d·h)    the float32 upcast of the input, rsqrt, the normalised input of
                                      the weight multiply, its output (the projections' input)
    attention    4·d·n + 4·heads      q, k and v (repeated to every head: a padding mask rules out
                                      SDPA's GQA path), the output, the log-sum-exp
    MLP          4·d·I                gate, SiLU(gate), up, their product
    mask         d·S                  SDPA's float copy of the boolean padding mask, per layer (S = row length)

Without gradient checkpointing every layer's activations live until the backward reaches it,
plus one layer's gradients; with it, one hidden state per layer (the checkpoint's input) plus one
layer recomputed and its gradients. The LM head holds three float32 [rows, V] tensors at once
(logits, their exponentials and their gradient): all of a micro-batch's rows where that is at most
`UNCHUNKED_LOGITS_BYTES`, else chunks of `LOGPROB_CHUNK_TOKENS` rows under activation checkpointing
(`logprob_chunk_tokens`, used by `kdrl.train.completion_logprobs_BT`).

Left out (hence `MARGIN_FRACTION` of the estimate and, on CUDA, `CUDA_CONTEXT_BYTES`): allocator
fragmentation and caching, the CUDA context and kernels' workspaces, a LoRA student's own small
extra activations, vLLM on CPU (its weights and VLLM_CPU_KVCACHE_SPACE), and memory other
processes hold. docs/benchmarks.md compares the estimate with measured peaks
(scripts/gpu_check.py). AdamW keeps its two moments in the parameters' dtype: with bfloat16
weights there is no float32 master copy in kdrl, and updates below half a bfloat16 step of a
weight are lost (at lr 1e-6 nearly all of them), which is why data/configs/paper_1p5b.yaml
trains a float32 student.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kdrl.config import RunConfig

GiB = 1024**3
LOGPROB_CHUNK_TOKENS = 4096
"""Rows of the LM head per float32 chunk, where `logprob_chunk_tokens` chunks it."""
UNCHUNKED_LOGITS_BYTES = 256 * 2**20
"""The most float32 LM-head memory (logits, their exponentials and their gradient: 12 B per token
per vocabulary entry) a pass holds at once rather than chunk the head under activation
checkpointing, whose backward runs every chunk's head matmul again."""
CUDA_CONTEXT_BYTES = GiB // 2
"""The CUDA context and cuBLAS/cuDNN workspaces, outside PyTorch's allocator statistics."""
MARGIN_FRACTION = 0.10
"""Added to the estimate for what it leaves out (fragmentation, allocator caching)."""
ASSUMED_PROMPT_TOKENS = 1024
"""Longest prompt the estimate assumes before the prompts are tokenized (a resumed run reads its
prompts table; vllm.max_model_len or a model's context may bound it lower)."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def logprob_chunk_tokens(tokens: int, vocab: int) -> int | None:
    """Rows per LM-head chunk of a log-prob pass over `tokens` positions (`kdrl.train.completion_logprobs_BT`),
    or None: the whole head at once, without checkpointing. Chunks (each recomputed in the
    backward) only where they save memory: a large vocabulary or a long batch, i.e. more than
    `UNCHUNKED_LOGITS_BYTES` of float32 logits.

    >>> logprob_chunk_tokens(16 * 8 * 48, 80)  # the embedded models: 7 MiB of logits
    >>> logprob_chunk_tokens(8 * 1024, 151_936)  # Qwen2.5's vocabulary: 14 GiB at once
    4096
    >>> logprob_chunk_tokens(20, 151_936)  # 35 MiB
    """
    return None if tokens * vocab * 12 <= UNCHUNKED_LOGITS_BYTES else LOGPROB_CHUNK_TOKENS


class MemoryEstimateError(ValueError):
    """The run's estimated peak memory exceeds its training device; the message shows the
    arithmetic and what to change."""


@dataclass(frozen=True)
class DeviceMemory:
    """A training device and how much memory it has."""

    type: str
    """"cuda" or "cpu"."""
    total_bytes: int
    name: str


def device_memory(device: str) -> DeviceMemory:
    """The memory of `device` ("cuda", "cuda:1", "cpu", "auto"): the GPU's total memory, or the
    machine's RAM (os.sysconf)."""
    from kdrl.models import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return DeviceMemory("cuda", props.total_memory, props.name)
    return DeviceMemory("cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM")


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of an architecture, read from its transformers config."""

    arch: str
    params: int
    """Exact: the model built on the meta device (tied embeddings counted once)."""
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    linears: tuple[tuple[str, int, int], ...]
    """(module name, in_features, out_features) of every linear layer but the output head."""

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        head = model.get_output_embeddings()
        text = config.get_text_config()
        heads = text.num_attention_heads
        return cls(
            arch=type(model).__name__, params=sum(p.numel() for p in model.parameters()),
            layers=text.num_hidden_layers, hidden=text.hidden_size, heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            intermediate=text.intermediate_size, vocab=text.vocab_size,
            linears=tuple((name, m.in_features, m.out_features) for name, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and m is not head),
        )

    def lora_params(self, r: int, target_modules: list[str] | str) -> int:
        """Adapter parameters: r·(in + out) per adapted linear (A is r×in, B is out×r); "all-linear"
        is every linear but the output head (peft's rule), a list matches names or their last parts."""
        def adapted(name: str) -> bool:
            return target_modules == "all-linear" or any(name == t or name.endswith("." + t) for t in target_modules)

        return sum(r * (n_in + n_out) for name, n_in, n_out in self.linears if adapted(name))

    def layer_bytes_per_token(self, d: int, row_tokens: int) -> int:
        """Bytes one decoder layer keeps for the backward per token (module docstring), the
        padding mask's float copy (d·S) included."""
        h, n = self.hidden, self.heads * self.head_dim
        return 2 * (4 * h + 4 + 2 * d * h) + 4 * d * n + 4 * self.heads + 4 * d * self.intermediate + d * row_tokens


@dataclass(frozen=True)
class MemoryRow:
    item: str
    arithmetic: str
    bytes: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Rows resident through the iteration, rows per phase, and the device; peak = resident +
    the largest phase, plus the margin."""

    device: DeviceMemory
    resident: tuple[MemoryRow, ...]
    phases: tuple[tuple[str, tuple[MemoryRow, ...]], ...]
    notes: tuple[str, ...] = ()
    """Where the shapes come from (printed under the header)."""

    def phase_bytes(self, name: str) -> int:
        return sum(row.bytes for row in dict(self.phases)[name])

    @property
    def peak_phase(self) -> str:
        return max((name for name, _ in self.phases), key=self.phase_bytes)

    @property
    def margin(self) -> MemoryRow:
        base = sum(r.bytes for r in self.resident) + self.phase_bytes(self.peak_phase)
        context = CUDA_CONTEXT_BYTES if self.device.type == "cuda" else 0
        what = f"{MARGIN_FRACTION:.0%} of {base / GiB:.2f} GiB" + (" + CUDA context 0.5 GiB" if context else "")
        return MemoryRow("margin", what + " (fragmentation, caching, not modelled)",
                         int(MARGIN_FRACTION * base) + context)

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.resident) + self.phase_bytes(self.peak_phase) + self.margin.bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.device.total_bytes

    def format(self) -> str:
        """The table printed at start: one line per item with its arithmetic, in GiB; the peak is
        the resident rows plus the largest phase (phases come one after another)."""
        width = max(len(r.item) for _, rows in (("", self.resident), *self.phases) for r in rows) + 2
        line = lambda r: f"  {r.item:<{width}}{r.bytes / GiB:8.2f} GiB  {r.arithmetic}"
        resident, peak = sum(r.bytes for r in self.resident), self.peak_phase
        out = [(f"[kdrl] memory estimate on {self.device.type} ({self.device.name}, "
                f"{self.device.total_bytes / GiB:.1f} GiB):"),
               *(f"  {note}" for note in self.notes), f" resident ({resident / GiB:.2f} GiB):",
               *map(line, self.resident)]
        for name, rows in self.phases:
            mark = ", the peak" if name == peak else ""
            out += [f" {name} ({self.phase_bytes(name) / GiB:.2f} GiB{mark}):", *map(line, rows)]
        verdict = "fits" if self.fits else "does NOT fit"
        total = f"  {'total':<{width}}{self.total_bytes / GiB:8.2f} GiB  resident + {peak} + margin"
        out += [line(self.margin), f"{total}, of {self.device.total_bytes / GiB:.1f} GiB: {verdict}"]
        return "\n".join(out)


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def update_rows(shape: ModelShape, *, d: int, tokens: int, row_tokens: int, checkpointing: bool,
                trainable: int, trainable_d: int) -> tuple[MemoryRow, ...]:
    """The update of one micro-batch of `tokens` padded tokens whose longest row has `row_tokens`:
    gradients of the `trainable` parameters, activations, the padding mask, the LM head chunk."""
    L, h = shape.layers, shape.hidden
    layer = shape.layer_bytes_per_token(d, row_tokens)
    terms = (f"norms 2·(4+4+2·{d})·{h} + attention 4·{d}·{shape.heads * shape.head_dim} "
             f"+ MLP 4·{d}·{shape.intermediate} + mask {d}·{row_tokens}")
    if checkpointing:
        acts = [MemoryRow("checkpointed inputs", f"{tokens:,} tok × {L} layers × {h} × {d} B", tokens * L * h * d),
                MemoryRow("recomputed layer ×2", f"{tokens:,} tok × 2 × {layer:,} B ({terms}; its gradients)",
                          tokens * 2 * layer)]
    else:
        acts = [MemoryRow("layer activations",
                          f"{tokens:,} tok × ({L} + 1) layers × {layer:,} B ({terms}; +1: gradients)",
                          tokens * (L + 1) * layer)]
    chunk = min(logprob_chunk_tokens(tokens, shape.vocab) or tokens, tokens)
    return (
        MemoryRow("gradients", f"{trainable:,} × {trainable_d} B", trainable * trainable_d),
        *acts,
        MemoryRow("boolean mask", f"{tokens:,} tok × {row_tokens:,} × 1 B (B × S × S, shared by the layers)",
                  tokens * row_tokens),
        MemoryRow("final norm, head, rotary", f"{tokens:,} tok × (4·{h} + 3·{d}·{h} + 2·{d}·{shape.head_dim} + 12) B",
                  tokens * (4 * h + 3 * d * h + 2 * d * shape.head_dim + 12)),
        MemoryRow("log-prob chunk", f"{chunk:,} × {shape.vocab:,} vocab × 4 B × 3 (float32 logits, exp, gradient)",
                  chunk * shape.vocab * 12),
    )


def kv_cache_row(shape: ModelShape, *, d: int, seqs: int, row_tokens: int) -> MemoryRow:
    """transformers `generate`'s KV cache: keys and values of every layer for `seqs` rows."""
    kv = seqs * row_tokens * 2 * shape.layers * shape.kv_heads * shape.head_dim * d
    return MemoryRow("HF generate KV cache", f"{seqs} seqs × {row_tokens:,} tok × 2 × {shape.layers} layers × "
                     f"{shape.kv_heads} × {shape.head_dim} × {d} B", kv)


def teacher_logits_row(shape: ModelShape, *, d: int, tokens: int, completion_tokens: int) -> MemoryRow:
    """`HFTeacherScorer`: logits of a packed batch of `tokens` positions in the teacher's dtype,
    then one row's float32 copy and log-softmax at a time."""
    return MemoryRow("teacher logits", f"{tokens:,} tok × {shape.vocab:,} vocab × {d} B + one row "
                     f"{completion_tokens + 1:,} × {shape.vocab:,} × 4 B × 2 (float32 log-softmax)",
                     tokens * shape.vocab * d + (completion_tokens + 1) * shape.vocab * 8)


def micro_batch_tokens(cfg: RunConfig, row_tokens: int) -> tuple[int, str]:
    """The largest micro-batch in padded tokens (rows × longest row) and how it follows from the config."""
    optim, rows = cfg.optim, min(cfg.optim.micro_batch_size,
                                 cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt)
    by_rows = rows * row_tokens
    if optim.max_tokens_per_microbatch > 0 and optim.max_tokens_per_microbatch < by_rows:
        return (max(optim.max_tokens_per_microbatch, row_tokens),
                f"optim.max_tokens_per_microbatch={optim.max_tokens_per_microbatch}")
    return by_rows, f"{rows} rows (optim.micro_batch_size) × {row_tokens} tokens"


def row_tokens(cfg: RunConfig, student_config: Any, teacher_config: Any | None, *,
               prompt_tokens: int | None = None) -> tuple[int, str]:
    """The longest prompt + response: the longest prompt (`prompt_tokens`, from a run's prompts
    table; else `ASSUMED_PROMPT_TOKENS`, since prompts are tokenized after this check), capped by
    the run's prompt limit (`kdrl.data.run_prompt_limit`; `teacher_config` None: the teacher's
    context is not known), plus rollout.max_new_tokens."""
    from kdrl.data import run_prompt_limit

    new = cfg.rollout.max_new_tokens
    limit = run_prompt_limit(cfg, student_config, None, teacher=teacher_config)
    prompt, why = (prompt_tokens, "the run's longest prompt") if prompt_tokens is not None else \
        (ASSUMED_PROMPT_TOKENS, f"prompts assumed ≤ {ASSUMED_PROMPT_TOKENS} tokens (not tokenized yet)")
    if limit is not None and limit.tokens <= prompt:
        prompt, why = limit.tokens, f"prompts ≤ {limit.why}"
    return prompt + new, f"{why}: {prompt} + rollout.max_new_tokens {new}"


def _is_vllm(requested: str, device: DeviceMemory, vllm_installed: bool, *, must_release: bool = False) -> bool:
    """Whether a stage's engine resolves to vLLM on this CUDA device (`choose_engine`'s rule)."""
    if device.type != "cuda" or requested == "hf":
        return False
    return requested == "vllm" or (vllm_installed and not must_release)


def estimate_memory(cfg: RunConfig, student: ModelShape, teacher: ModelShape | None = None, *, device: DeviceMemory,
                    row: tuple[int, str], vllm_installed: bool = False) -> MemoryEstimate:
    """The estimate of `cfg` on `device` for the given architectures; `row` is `row_tokens`' answer."""
    d = DTYPE_BYTES[cfg.model.dtype]
    resident = [MemoryRow("student params", f"{student.params:,} × {d} B ({cfg.model.dtype})", student.params * d)]
    trainable, trainable_d = student.params, d
    if cfg.model.lora is not None:
        trainable, trainable_d = student.lora_params(cfg.model.lora.r, cfg.model.lora.target_modules), 4
        resident.append(MemoryRow("LoRA adapter",
                                  f"{trainable:,} × 4 B (r={cfg.model.lora.r}; float32: peft upcasts adapters)",
                                  trainable * 4))
    note = "; no float32 master copy" if trainable_d < 4 else ""
    resident.append(MemoryRow("AdamW moments", f"2 × {trainable:,} × {trainable_d} B (the parameters' dtype{note})",
                              2 * trainable * trainable_d))

    rows, why_row = row
    tokens, why_tokens = micro_batch_tokens(cfg, rows)
    update = update_rows(student, d=d, tokens=tokens, row_tokens=rows, checkpointing=cfg.model.gradient_checkpointing,
                         trainable=trainable, trainable_d=trainable_d)
    notes = (f"longest row {rows:,} tokens: {why_row}", f"largest micro-batch {tokens:,} tokens: {why_tokens}")
    generate: list[MemoryRow] = []
    scoring: list[MemoryRow] = []
    rollout_vllm = _is_vllm(cfg.rollout.engine, device, vllm_installed)
    if rollout_vllm:
        frac = cfg.rollout.vllm.gpu_memory_utilization
        r = MemoryRow("vLLM rollout engine",
                      f"{frac:g} × {_gib(device.total_bytes)} (rollout.vllm.gpu_memory_utilization)",
                      int(frac * device.total_bytes))
        (generate if cfg.rollout.vllm.enable_sleep_mode else resident).append(r)
    else:
        seqs = min(cfg.rollout.batch_size, cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt)
        generate.append(kv_cache_row(student, d=d, seqs=seqs, row_tokens=rows))

    from kdrl.models import resolve_device

    if cfg.uses_teacher and teacher is not None:
        td = DTYPE_BYTES[cfg.teacher.dtype]
        offload = cfg.teacher.offload
        if _is_vllm(cfg.teacher.engine, device, vllm_installed,
                    must_release=offload and not cfg.teacher.vllm.enable_sleep_mode):
            frac = cfg.teacher.vllm.gpu_memory_utilization
            r = MemoryRow("vLLM teacher engine",
                          f"{frac:g} × {_gib(device.total_bytes)} (teacher.vllm.gpu_memory_utilization)",
                          int(frac * device.total_bytes))
            (scoring if offload else resident).append(r)
        elif resolve_device(cfg.teacher.device).type == device.type:
            r = MemoryRow("teacher params", f"{teacher.params:,} × {td} B ({cfg.teacher.dtype})", teacher.params * td)
            (scoring if offload else resident).append(r)
            batch = min(cfg.teacher.max_tokens_per_batch,
                        cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt * rows)
            scoring.append(teacher_logits_row(teacher, d=td, tokens=batch,
                                              completion_tokens=cfg.rollout.max_new_tokens))
    largest = max([n_in * n_out for _, n_in, n_out in student.linears] + [student.vocab * student.hidden])
    scratch = trainable if device.type == "cuda" else min(trainable, largest)
    how = "foreach: one moment-sized temporary" if device.type == "cuda" else "one tensor at a time"
    step = (update[0], MemoryRow("AdamW scratch", f"{scratch:,} × {trainable_d} B ({how})", scratch * trainable_d))
    phases = [("generate", tuple(generate)), ("teacher scoring", tuple(scoring)), ("update", update),
              ("optimizer step", step)]
    return MemoryEstimate(device, tuple(resident), tuple((name, rows_) for name, rows_ in phases if rows_), notes)


def _fixes(cfg: RunConfig, estimate: Callable[[RunConfig], MemoryEstimate]) -> list[str]:
    """Config changes that lower the estimate, each with the total it would give."""
    candidates: list[tuple[str, dict[str, dict[str, Any]]]] = []
    if not cfg.model.gradient_checkpointing:
        candidates.append(("model.gradient_checkpointing=true", {"model": {"gradient_checkpointing": True}}))
    budget = cfg.optim.max_tokens_per_microbatch
    if budget == 0 or budget > 4096:
        target = max(2048, budget // 4) if budget else 16384
        candidates.append((f"optim.max_tokens_per_microbatch={target}",
                           {"optim": {"max_tokens_per_microbatch": target}}))
    if cfg.uses_teacher and not cfg.teacher.offload:
        candidates.append(("teacher.offload=true (+ teacher.vllm.enable_sleep_mode=true for a vLLM teacher)",
                           {"teacher": {"offload": True,
                                        "vllm": cfg.teacher.vllm.model_copy(update={"enable_sleep_mode": True})}}))
    if not cfg.rollout.vllm.enable_sleep_mode:
        candidates.append(("rollout.vllm.enable_sleep_mode=true (vLLM on CUDA)",
                           {"rollout": {"vllm": cfg.rollout.vllm.model_copy(update={"enable_sleep_mode": True})}}))
    if cfg.model.lora is None:
        from kdrl.config import LoraConfig

        candidates.append(("model.lora={r: 16} (adapter-only gradients and AdamW state)",
                           {"model": {"lora": LoraConfig()}}))
    now = estimate(cfg).total_bytes
    lines = []
    for text, change in candidates:
        changed = cfg.model_copy(update={sec: getattr(cfg, sec).model_copy(update=vals)
                                         for sec, vals in change.items()})
        after = estimate(changed)
        if after.total_bytes < now:
            lines.append(f"  {text}: {_gib(after.total_bytes)}{' (fits)' if after.fits else ''}")
    return lines


def _longest_prompt(run_dir: str | os.PathLike | None) -> int | None:
    if run_dir is None:
        return None
    from kdrl.storage import RunPaths, read_table

    paths = RunPaths(run_dir)
    if not paths.prompts.exists():
        return None
    return int(read_table(paths.prompts, table="prompts")["prompt_token_ids"].list.len().max() or 0)


def check_memory(cfg: RunConfig, student_path: str, teacher_path: str | None, *,
                 run_dir: str | os.PathLike | None = None, log: Callable[[str], None] = print,
                 device: DeviceMemory | None = None) -> MemoryEstimate | None:
    """Estimate the run on its training device, print the table, and with run.memory_check=refuse
    raise `MemoryEstimateError` when it does not fit ("warn": print only; "off": nothing). A
    `run_dir` that already has its prompts table gives the real longest prompt."""
    if cfg.run.memory_check == "off":
        return None
    from transformers import AutoConfig

    from kdrl.engines.vllm import vllm_available

    configs = {"student": AutoConfig.from_pretrained(student_path)}
    if teacher_path is not None:
        configs["teacher"] = AutoConfig.from_pretrained(teacher_path)  # its context bounds the prompts
    try:  # the teacher's memory counts only where it scores on the device (uses_teacher)
        shapes = {k: ModelShape.from_config(c) for k, c in configs.items() if k == "student" or cfg.uses_teacher}
    except (AttributeError, TypeError, ValueError) as err:  # an architecture without the usual config fields
        log(f"[kdrl] memory estimate skipped: {err}")
        return None
    device = device or device_memory(cfg.model.device)
    row = row_tokens(cfg, configs["student"], configs.get("teacher"), prompt_tokens=_longest_prompt(run_dir))
    installed = vllm_available()

    def estimate(c: RunConfig) -> MemoryEstimate:
        return estimate_memory(c, shapes["student"], shapes.get("teacher"), device=device, row=row,
                               vllm_installed=installed)

    result = estimate(cfg)
    log(result.format())
    if not result.fits:
        fixes = _fixes(cfg, estimate)
        advice = ("\nWhat lowers it (estimated total):\n" + "\n".join(fixes)) if fixes else ""
        message = (f"run.memory_check: the estimated peak, {_gib(result.total_bytes)}, exceeds the "
                   f"{device.type} device's {_gib(device.total_bytes)}:\n{result.format()}{advice}\n"
                   "or run.memory_check=warn to start anyway (the estimate is rough: docs/benchmarks.md).")
        if cfg.run.memory_check == "refuse":
            raise MemoryEstimateError(message)
        log("[kdrl] WARNING " + message)
    return result
