"""One GPU check of kdrl's own pieces at the paper config's real shapes: speed and peak memory,
beside `kdrl.memory`'s estimate of the same shapes.

    scripts/gpu_check.sh              # one H100/H200, under 8 minutes, no network (see the .sh for wheels)
    scripts/gpu_check.sh --tiny       # tiny models on CPU in seconds: proves the script runs (tests/test_memory.py)

Random-init models built from data/fixtures/arch/*/config.json (the architectures of
data/configs/paper_1p5b.yaml), at reduced lengths. Sections, each timed after a warm-up:

  generate          kdrl's HFRolloutEngine (transformers generate, KV cache) on the bf16 student
  teacher scoring   kdrl's HFTeacherScorer (forward, float32 log-softmax, gather) on the bf16 teacher
  update            kdrl.train.update_step on a synthetic step batch (collate of kdrl's tables), with
                    gradient checkpointing and optim.max_tokens_per_microbatch, float32 and bf16 students
  update, LoRA      the same on a kdrl.lora student (skipped without peft)
  update, data-parallel  kdrl.distributed's path (NCCL on CUDA): update_step with a one-rank
                    DataParallel equals update_step without one (a 2-layer cut of the student),
                    then the same with the model FSDP2-sharded (trainer.strategy fsdp2: fully_shard,
                    the registered log-prob forward, reduce-scatter); a one-GPU machine cannot run
                    two NCCL ranks (tests/test_ray.py runs two with gloo)

Peak memory is torch.cuda.max_memory_allocated over the section, each section starting from an
empty device; the estimate is `kdrl.memory`'s rows for exactly those shapes without the margin.
Each section is a function returning `Result`s.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config

from kdrl.memory import GiB, ModelShape, kv_cache_row, teacher_logits_row, update_rows
from kdrl.perf import bf16_peak as kdrl_bf16_peak
from kdrl.perf import matmul_params

ROOT = Path(__file__).resolve().parents[1]
ARCH = ROOT / "data/fixtures/arch"


@dataclass(frozen=True)
class Result:
    section: str
    tokens: int
    seconds: float
    peak_bytes: int | None
    """torch.cuda.max_memory_allocated over the section (None on CPU)."""
    estimate_bytes: int
    note: str = ""
    flops: float = 0.0
    """Model FLOPs of the section's useful work (2·N per token forward, 6·N per token trained; N the
    matmul parameters, attention's quadratic term left out; checkpointing's recompute not counted)."""


@dataclass(frozen=True)
class Plan:
    """The shapes of one check: full (GPU) or tiny (CPU)."""

    student: PretrainedConfig
    teacher: PretrainedConfig
    device: str
    prompts: int
    samples: int
    prompt_tokens: int
    new_tokens: int
    token_budget: int
    dtype: torch.dtype
    wide_prompts: int
    """Prompts of the wide generate measurement (× samples rows, new_tokens / 4 each)."""
    trl_prompts: int
    trl_new_tokens: int
    """P (× samples rows) and the completion length of the kdrl vs TRL step (`--vs-trl`)."""


def full_plan() -> Plan:
    return Plan(student=Qwen2Config.from_pretrained(ARCH / "deepseek-r1-distill-qwen-1.5b"),
                teacher=Qwen2Config.from_pretrained(ARCH / "skywork-or1-math-7b"), device="cuda",
                prompts=2, samples=4, prompt_tokens=256, new_tokens=2048, token_budget=16384, dtype=torch.bfloat16,
                wide_prompts=32, trl_prompts=16, trl_new_tokens=128)


def tiny_plan() -> Plan:
    small = {"vocab_size": 512, "max_position_embeddings": 256, "tie_word_embeddings": False, "num_key_value_heads": 2}
    return Plan(student=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    **small),
                teacher=LlamaConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                                    **small),
                device="cpu", prompts=2, samples=2, prompt_tokens=8, new_tokens=24, token_budget=64,
                dtype=torch.bfloat16, wide_prompts=4, trl_prompts=4, trl_new_tokens=8)


class IdsOnly:
    """What kdrl's HF engines ask of a tokenizer, for random models whose text means nothing."""

    pad_token_id = 0

    def __init__(self, eos: int):
        self.eos_token_id = eos

    def batch_decode(self, ids, **_):
        return ["" for _ in ids]


def build(config: PretrainedConfig, plan: Plan, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(plan.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def bf16_peak() -> float | None:
    return kdrl_bf16_peak("cuda")


def measured(fn):
    """(fn's result, seconds, peak bytes or None) from an emptied device (the previous section's
    models are gone: each section's locals die with it). Every call starts from `empty_cache`, so
    the caching allocator is cold in each, as on a run's first step. (Pre-reserving 80% of the free
    memory as one block to warm it was tried once on the H200: that run's generate section did not
    finish in 5 minutes, cause not isolated; do not bring it back without measuring.)"""
    gc.collect()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start, torch.cuda.max_memory_allocated() if cuda else None


def prompt_ids(plan: Plan, vocab: int, count: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    step = max(1, plan.prompt_tokens // 16)  # a little padding between prompts, as real ones have
    return [torch.randint(3, vocab - 1, (plan.prompt_tokens - step * (i % 4),), generator=g).tolist()
            for i in range(count)]


def section_generate(plan: Plan) -> list[Result]:
    from kdrl.engines.hf import HFRolloutEngine

    shape = ModelShape.from_config(plan.student)
    model = build(plan.student, plan, plan.dtype).eval()
    engine = HFRolloutEngine(model, IdsOnly(eos=plan.student.vocab_size - 1), batch_size=plan.prompts * plan.samples)
    prompts = prompt_ids(plan, plan.student.vocab_size, plan.prompts)
    engine.generate(prompts, n=1, max_new_tokens=4, seed=0)  # warm-up
    rollouts, seconds, peak = measured(lambda: engine.generate(prompts, n=plan.samples, max_new_tokens=plan.new_tokens,
                                                               seed=0))
    tokens = sum(len(c) for c in rollouts.completion_token_ids)
    d = plan.dtype.itemsize
    kv = kv_cache_row(shape, d=d, seqs=plan.prompts * plan.samples, row_tokens=plan.prompt_tokens + plan.new_tokens)
    n = matmul_params(model)
    results = [Result("generate", tokens, seconds, peak, shape.params * d + kv.bytes,
                      f"{plan.prompts}×{plan.samples} rows, {kv.arithmetic}", flops=2 * n * tokens)]
    # The same rows through bare transformers generate (no sampled-log-prob recorder, no EOS cut, no
    # .tolist()): what kdrl's engine costs on top of the library it wraps (issue 18's generation gap).
    from kdrl.engines.hf import _left_pad

    rows = [p for p in prompts for _ in range(plan.samples)]
    ids, mask = _left_pad(rows, 0, model.device)

    def bare(new_tokens: int):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                  top_p=1.0, max_new_tokens=new_tokens, pad_token_id=0,
                                  eos_token_id=plan.student.vocab_size - 1)

    # A B A B at a quarter of the length (the order and the allocator's state alike for both arms)
    short = plan.new_tokens // 4
    kdrl_s, bare_s = [], []
    for _ in range(2):
        kdrl_s.append(measured(lambda: engine.generate(prompts, n=plan.samples, max_new_tokens=short, seed=0))[1])
        out, bare_seconds, bare_peak = measured(lambda: bare(short))
        bare_s.append(bare_seconds)
    bare_tokens = int(out[:, ids.shape[1]:].numel())
    ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(kdrl_s, bare_s))
    results.append(Result(f"generate, bare transformers ({short} tokens)", bare_tokens, min(bare_s), bare_peak, 0,
                          f"model.generate on the same rows, A B A B with kdrl's engine: "
                          f"kdrl / bare = {ratios}× (kdrl best {min(kdrl_s):.2f} s)", flops=2 * n * bare_tokens))
    # A batch as wide as a real step's (the paper's P×G is 256×8: HF generate decodes one token of
    # every row per forward, so width is where its throughput comes from), at a quarter of the length.
    wide_prompts = prompt_ids(plan, plan.student.vocab_size, plan.wide_prompts)
    engine.batch_size = plan.wide_prompts * plan.samples
    wide, wide_seconds, wide_peak = measured(lambda: engine.generate(wide_prompts, n=plan.samples,
                                                                     max_new_tokens=plan.new_tokens // 4, seed=0))
    wide_tokens = sum(len(c) for c in wide.completion_token_ids)
    kv = kv_cache_row(shape, d=d, seqs=plan.wide_prompts * plan.samples,
                      row_tokens=plan.prompt_tokens + plan.new_tokens // 4)
    results.append(Result(f"generate, {plan.wide_prompts * plan.samples} rows", wide_tokens, wide_seconds, wide_peak,
                          shape.params * d + kv.bytes, f"{plan.wide_prompts}×{plan.samples} rows, {kv.arithmetic}",
                          flops=2 * n * wide_tokens))
    return results


def section_teacher(plan: Plan) -> list[Result]:
    from kdrl.engines.hf import HFTeacherScorer

    shape = ModelShape.from_config(plan.teacher)
    model = build(plan.teacher, plan, plan.dtype).eval()
    rows = plan.prompts * plan.samples
    prompts = prompt_ids(plan, plan.teacher.vocab_size, rows)
    g = torch.Generator().manual_seed(2)
    completions = [torch.randint(3, plan.student.vocab_size - 1, (plan.new_tokens - 8 * i,), generator=g).tolist()
                   for i in range(rows)]
    budget = plan.token_budget
    scorer = HFTeacherScorer(model, IdsOnly(eos=2), max_tokens_per_batch=budget)
    scorer.score(prompts[:1], [completions[0][:8]])  # warm-up
    _, seconds, peak = measured(lambda: scorer.score(prompts, completions))
    d = plan.dtype.itemsize
    logits = teacher_logits_row(shape, d=d, tokens=budget, completion_tokens=plan.new_tokens)
    scored = sum(map(len, completions)) + sum(map(len, prompts))
    return [Result("teacher scoring", sum(map(len, completions)), seconds, peak, shape.params * d + logits.bytes,
                   f"{rows} rows packed ≤ {budget} tokens; {logits.arithmetic}",
                   flops=2 * matmul_params(model) * scored)]


def step_batch(plan: Plan, vocab: int):
    """A synthetic step through kdrl's own tables and collate: P prompts × G samples, completions of
    decreasing length (so rows are padded, as real ones are), teacher log-probs on every row."""
    import polars as pl

    from kdrl.batching import collate, join_step_tables
    from kdrl.storage import REWARDS, ROLLOUTS, TEACHER_LOGPROBS

    rows = plan.prompts * plan.samples
    prompts = prompt_ids(plan, vocab, plan.prompts)
    g = torch.Generator().manual_seed(3)
    lengths = [plan.new_tokens - (plan.new_tokens // (2 * rows)) * i for i in range(rows)]
    completions = [torch.randint(3, vocab - 1, (n,), generator=g).tolist() for n in lengths]
    key = {"step": [0] * rows, "prompt_id": [i // plan.samples for i in range(rows)],
           "sample_idx": [i % plan.samples for i in range(rows)]}
    rollouts = pl.DataFrame({**key, "prompt_token_ids": [prompts[i // plan.samples] for i in range(rows)],
                             "completion_token_ids": completions, "sampler_logprobs": [[-1.0] * n for n in lengths],
                             "finish_reason": ["stop"] * rows, "completion_text": [""] * rows}, schema=ROLLOUTS)
    rewards = pl.DataFrame({**key, "extracted_answer": [None] * rows, "reward": [float(i % 2) for i in range(rows)],
                            "truncated": [False] * rows}, schema=REWARDS)
    teacher = pl.DataFrame({**key, "teacher_logprobs": [[-1.5] * n for n in lengths], "topk_ids": [None] * rows,
                            "topk_logprobs": [None] * rows}, schema=TEACHER_LOGPROBS)
    return collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=0)


def section_update(plan: Plan, *, dtype: torch.dtype, lora: bool) -> list[Result]:
    from kdrl.batching import micro_batches
    from kdrl.config import LoraConfig, LossConfig, OptimConfig
    from kdrl.train import build_optimizer, update_step

    name = "update, LoRA" if lora else f"update {str(dtype).removeprefix('torch.')}"
    if lora:
        try:
            from kdrl.lora import apply_lora
        except ImportError as err:
            return [Result(name, 0, 0.0, None, 0, f"skipped: {err}")]
    shape = ModelShape.from_config(plan.student)
    model = build(plan.student, plan, dtype)
    # as kdrl.workers.load_run does
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n = matmul_params(model)  # the base model's: a LoRA student's adapter FLOPs are left out
    if lora:
        model = apply_lora(model, LoraConfig(r=16), seed=0).to(plan.device)
    batch = step_batch(plan, plan.student.vocab_size).to(torch.device(plan.device))
    optim_cfg = OptimConfig(lr=1e-6, micro_batch_size=64, max_tokens_per_microbatch=plan.token_budget)
    optimizer, scheduler = build_optimizer(model, optim_cfg, total_steps=4)
    loss_cfg = LossConfig(beta_init=5e-3)
    step = lambda i: update_step(model, optimizer, scheduler, batch, loss_cfg=loss_cfg, optim_cfg=optim_cfg,
                                 optimizer_step=i)
    step(0)  # warm-up, and AdamW's moments exist from here on, as in a run's later steps
    _, seconds, peak = measured(lambda: step(1))
    T = batch.completion_ids_BT.shape[1]
    prompt_lens = batch.attention_mask_BS[:, :-T].sum(dim=1).tolist()
    completion_lens = batch.completion_mask_BT.sum(dim=1).int().tolist()
    bounds = micro_batches(prompt_lens, completion_lens, max_rows=64, max_tokens=plan.token_budget)
    widths = [(b - a, max(prompt_lens[a:b]) + max(completion_lens[a:b])) for a, b in bounds]
    rows, width = max(widths, key=lambda w: w[0] * w[1])
    d = dtype.itemsize
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable_d = 4 if lora else d
    phase = update_rows(shape, d=d, tokens=rows * width, row_tokens=width, checkpointing=True, trainable=trainable,
                        trainable_d=trainable_d)
    adapter = trainable * 4 if lora else 0
    resident = shape.params * d + adapter + 2 * trainable * trainable_d
    on_cuda = plan.device == "cuda"
    estimate = resident + max(sum(r.bytes for r in phase), trainable * trainable_d * (2 if on_cuda else 1))
    trained = sum(completion_lens) + sum(prompt_lens)
    # A LoRA backward computes the input gradients but no gradient of a frozen base weight: 4·N per token.
    per_token = 4 * n if lora else 6 * n
    return [Result(name, sum(completion_lens), seconds, peak, estimate,
                   f"{len(bounds)} micro-batches, largest {rows}×{width} tokens, gradient checkpointing",
                   flops=per_token * trained)]


def section_data_parallel(plan: Plan) -> list[Result]:
    """kdrl.distributed on this device's backend (NCCL on CUDA, gloo on CPU): update_step with a
    DataParallel of one rank (a one-GPU machine), which must equal update_step
    without one bit for bit. Proves the NCCL join, the all-reduced denominators and the bucketed
    gradient sum run on CUDA tensors; a 2-layer cut of the student keeps it to seconds."""
    import copy
    import socket

    from kdrl.config import LossConfig, OptimConfig
    from kdrl.distributed import DataParallel, full_state_dict, shard_model
    from kdrl.train import build_optimizer, sharded_logprobs, update_step

    backend = "nccl" if plan.device == "cuda" else "gloo"
    name = f"update, data-parallel ({backend}, 1 rank)"
    config = copy.deepcopy(plan.student)
    config.num_hidden_layers = 2
    batch = step_batch(plan, config.vocab_size).to(torch.device(plan.device))
    optim_cfg = OptimConfig(lr=1e-4, micro_batch_size=64, max_tokens_per_microbatch=plan.token_budget)
    loss_cfg = LossConfig(beta_init=5e-3)

    def updated(dp):
        model = build(config, plan, torch.float32)
        optimizer, scheduler = build_optimizer(model, optim_cfg, total_steps=4)
        update_step(model, optimizer, scheduler, batch, loss_cfg=loss_cfg, optim_cfg=optim_cfg, optimizer_step=0,
                    dp=dp)
        return model

    def sharded():
        model = build(config, plan, torch.float32)
        shard_model(model, sharded_logprobs)
        fsdp = DataParallel(0, 1)  # the same process group, the model sharded over it
        fsdp.sharded = True
        optimizer, scheduler = build_optimizer(model, optim_cfg, total_steps=4)
        update_step(model, optimizer, scheduler, batch, loss_cfg=loss_cfg, optim_cfg=optim_cfg, optimizer_step=0,
                    dp=fsdp)
        return full_state_dict(model)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dp = DataParallel.join(rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}", backend=backend)
    try:
        alone = updated(None)
        together, seconds, peak = measured(lambda: updated(dp))
        gathered, fsdp_seconds, fsdp_peak = measured(sharded)
    finally:
        dp.close()
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(alone.parameters(), together.parameters()))
    reference = alone.state_dict()
    fsdp_diff = max(float((gathered[k].to(v.device) - v).detach().abs().max()) for k, v in reference.items())
    tokens = int(batch.completion_mask_BT.sum())
    if plan.device == "cuda":
        # CUDA's memory-efficient attention backward is nondeterministic (atomics; even under
        # torch.use_deterministic_algorithms): two plain updates differ, by ~4e-6 on an H200.
        # Data parallelism must add nothing beyond that.
        again = updated(None)
        noise = max(float((a - b).detach().abs().max()) for a, b in zip(alone.parameters(), again.parameters()))
        bound, fsdp_bound = f"≤ 2× run-to-run {noise:.1e}", f"≤ 2× run-to-run {noise:.1e}"
        ok = diff <= 2 * noise and fsdp_diff <= 2 * noise
    else:
        bound, fsdp_bound = "must be 0", "must be ≤ 1e-6"
        ok = diff == 0 and fsdp_diff <= 1e-6
    verdict = "ok" if ok else "FAILED"
    return [Result(name, tokens, seconds, peak, 0,
                   f"largest weight difference to no data parallelism: {diff:.1e} ({bound}) {verdict}"),
            Result(f"update, FSDP2 ({backend}, 1 rank)", tokens, fsdp_seconds, fsdp_peak, 0,
                   f"largest weight difference to no data parallelism: {fsdp_diff:.1e} ({fsdp_bound}) {verdict}")]


def word_tokenizer(vocab: int):
    """A tokenizer for random-init models that TRL can drive too: token i is the word "t<i>"
    (WordLevel, split on whitespace), so a prompt's text round-trips to its ids and a completion
    decodes to words; 0 pads, 1 is unknown, the last id is EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    # special tokens match anywhere in a text ("t1" inside "t116"): names no word contains
    words.update({"<pad>": 0, "<unk>": 1, "<eos>": vocab - 1})
    del words["t0"], words["t1"], words[f"t{vocab - 1}"]
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def section_vs_trl(plan: Plan) -> list[Result]:
    """kdrl's step and TRL's on the same random-init student and teacher, the same prompts
    (token ids), P×G, sampling (T = 1, no top-k/top-p), length and reward, one optimizer step
    per generation batch, alternated A B A B: kdrl's stage functions (HF engine, rewards,
    teacher scorer, `update_step`, without the Parquet and flow around them, which the CPU
    benchmark measures) against TRL's `GRPOTrainer` with the teacher's β·(log p_T − log p_S)
    added to the advantage (scripts/bench_vs_trl.py's `timed_trainer`). Each arm's first step
    is a warm-up; a TRL step is the time between two generation starts. Gradient checkpointing
    in both, bf16 weights in both (AdamW moments in bf16)."""
    try:
        import datasets  # noqa: F401  (TRL's own import: a clear skip, not a traceback)
        import trl  # noqa: F401
    except ImportError as err:
        return [Result("kdrl vs TRL", 0, 0.0, None, 0, f"skipped: {err} (scripts/gpu_check.sh --download-wheels)")]
    import polars as pl
    from bench_vs_trl import timed_trainer, trl_reward
    from datasets import Dataset
    from trl import GRPOConfig

    from kdrl.batching import collate, join_step_tables
    from kdrl.config import LossConfig, OptimConfig, RewardConfig
    from kdrl.engines.hf import HFRolloutEngine, HFTeacherScorer
    from kdrl.stages import generate_rollouts, kd_needed, score_rewards, score_teacher
    from kdrl.train import build_optimizer, update_step

    P, G, new_tokens, beta, micro = plan.trl_prompts, plan.samples, plan.trl_new_tokens, 5e-3, 64
    vocab = plan.student.vocab_size
    tokenizer = word_tokenizer(vocab)
    student = build(plan.student, plan, plan.dtype)
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    teacher = build(plan.teacher, plan, plan.dtype).eval()
    prompts = prompt_ids(plan, vocab, P)
    table = pl.DataFrame({"prompt_id": list(range(P)), "prompt_token_ids": prompts, "answer": ["7"] * P})
    loss_cfg, reward_cfg = LossConfig(beta_init=beta), RewardConfig()
    optim_cfg = OptimConfig(lr=1e-6, micro_batch_size=micro, max_tokens_per_microbatch=plan.token_budget)
    optimizer, scheduler = build_optimizer(student, optim_cfg, total_steps=100)
    engine = HFRolloutEngine(student, tokenizer, batch_size=P * G)
    scorer = HFTeacherScorer(teacher, tokenizer, max_tokens_per_batch=plan.token_budget)
    device = torch.device(plan.device)

    def kdrl_step(i: int) -> int:
        rollouts = generate_rollouts(engine, table, step=i, n=G, max_new_tokens=new_tokens, temperature=1.0, seed=i)
        rewards = score_rewards(rollouts, table, reward_cfg)
        scores = score_teacher(scorer, rollouts, kd_needed(rollouts, rewards, loss_cfg), top_k=0)
        batch = collate(join_step_tables(rollouts, rewards, scores), pad_token_id=0).to(device)
        update_step(student, optimizer, scheduler, batch, loss_cfg=loss_cfg, optim_cfg=optim_cfg, optimizer_step=i)
        return int(batch.completion_mask_BT.sum())

    reward = trl_reward(reward_cfg, tokenizer.eos_token_id)
    texts = [" ".join(f"t{i}" for i in ids) for ids in prompts]
    scratch = tempfile.mkdtemp(prefix="kdrl-gpu-check-trl-")  # TRL's output_dir (nothing is saved)

    def trl_steps(rep: int) -> tuple[float, int]:
        """Three TRL steps on the same student; the second is timed (start of its generation to
        the start of the third's)."""
        starts, tokens, sent = [], [], []
        config = GRPOConfig(
            output_dir=scratch, use_cpu=plan.device == "cpu", bf16=plan.device == "cuda",
            per_device_train_batch_size=min(micro, P * G), gradient_accumulation_steps=max(1, P * G // micro),
            num_generations=G, max_completion_length=new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
            num_iterations=1, shuffle_dataset=False, learning_rate=1e-6, max_grad_norm=1.0,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_steps=3, logging_steps=1,
            report_to="none", save_strategy="no", disable_tqdm=True, seed=rep, dataloader_num_workers=0,
            log_completions=False, gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False})
        cls = timed_trainer(teacher, beta=beta, micro=micro, starts=starts, tokens=tokens, step_prompts=sent)
        trainer = cls(model=student, reward_funcs=reward, args=config, processing_class=tokenizer,
                      train_dataset=Dataset.from_dict({"prompt": texts * 3, "answer": ["7"] * (3 * P)}))
        trainer.train()
        if [row for batch in sent[:1] for row in batch[::G]] != prompts:
            raise RuntimeError(f"TRL tokenized the prompts differently: {sent[0][::G][:2]} vs {prompts[:2]}")
        return starts[2] - starts[1], tokens[1]

    kdrl_step(0)  # warm-up (kernels, allocator)
    kdrl_s, trl_s, kdrl_tokens, trl_tokens = [], [], [], []
    for rep in range(2):
        start = time.perf_counter()
        kdrl_tokens.append(kdrl_step(rep + 1))
        if device.type == "cuda":
            torch.cuda.synchronize()
        kdrl_s.append(time.perf_counter() - start)
        seconds, count = trl_steps(rep)
        trl_s.append(seconds)
        trl_tokens.append(count)
    shutil.rmtree(scratch, ignore_errors=True)
    ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(kdrl_s, trl_s))
    shape = f"{P}×{G} rows, {plan.prompt_tokens}-token prompts, {new_tokens} new"
    return [Result("kdrl step (stage functions)", kdrl_tokens[-1], min(kdrl_s), None, 0,
                   f"{shape}; kdrl / TRL per repetition = {ratios}×"),
            Result("TRL GRPOTrainer step + teacher", trl_tokens[-1], min(trl_s), None, 0,
                   f"{shape}; steps {', '.join(f'{t:.2f}' for t in trl_s)} s")]


def size(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def mfu(r: Result, peak: float | None) -> str:
    """Model FLOPs over the device's dense bf16 peak (float32 sections too: the column says how far
    from the tensor cores' best each runs)."""
    if not peak or not r.flops or not r.seconds:
        return ""
    return f"{r.flops / r.seconds / peak:.1%}"


def summary(results: list[Result], peak: float | None = None) -> str:
    lines = ["| section | tokens | seconds | tokens/s | TFLOP/s | MFU (bf16 peak) | peak | estimate | peak/estimate "
             "| note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = "" if r.peak_bytes is None or not r.estimate_bytes else f"{r.peak_bytes / r.estimate_bytes:.2f}"
        rate = f"{r.tokens / r.seconds:,.0f}" if r.seconds else ""
        tflops = f"{r.flops / r.seconds / 1e12:.1f}" if r.flops and r.seconds else ""
        lines.append(f"| {r.section} | {r.tokens:,} | {r.seconds:.2f} | {rate} | {tflops} | {mfu(r, peak)} "
                     f"| {size(r.peak_bytes)} | {size(r.estimate_bytes)} | {ratio} | {r.note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (seconds): checks that the script runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--vs-trl", action="store_true", help="only the kdrl vs TRL step (needs trl, datasets)")
    args = parser.parse_args()
    plan = tiny_plan() if args.tiny else full_plan()
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny on CPU")
    import transformers

    device = torch.cuda.get_device_name() if plan.device == "cuda" else "cpu"
    print(f"== gpu_check: torch {torch.__version__}, transformers {transformers.__version__}, {device}", flush=True)
    sections = [("generate", lambda: section_generate(plan)), ("teacher scoring", lambda: section_teacher(plan)),
                ("update float32", lambda: section_update(plan, dtype=torch.float32, lora=False)),
                ("update bfloat16", lambda: section_update(plan, dtype=torch.bfloat16, lora=False)),
                ("update, LoRA", lambda: section_update(plan, dtype=torch.bfloat16, lora=True)),
                ("update, data-parallel", lambda: section_data_parallel(plan))]
    if args.vs_trl:
        sections = [("kdrl vs TRL", lambda: section_vs_trl(plan))]
    results: list[Result] = []
    failed: list[str] = []
    for title, run in sections:
        print(f"== {title}", flush=True)
        try:
            section = run()
        except Exception:  # one section's failure (an OOM, another library version) must not cost the rest
            traceback.print_exc()
            failed.append(title)
            continue
        for r in section:
            results.append(r)
            print(f"   {r.tokens:,} tokens in {r.seconds:.2f} s; peak {size(r.peak_bytes)}, "
                  f"estimate {size(r.estimate_bytes)}; {r.note}", flush=True)
        if args.json:  # after every section: what finished survives a timeout
            args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2))
    peak = bf16_peak()
    print(f"== summary (MFU against {peak / 1e12:.1f} TFLOP/s dense bf16)" if peak else "== summary", flush=True)
    print(summary(results, peak), flush=True)
    failed += [r.section for r in results if r.note.endswith("FAILED")]
    if failed:
        raise SystemExit(f"gpu_check: failed sections: {', '.join(failed)}")


if __name__ == "__main__":
    main()
