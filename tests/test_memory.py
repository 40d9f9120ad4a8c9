"""kdrl.memory: the start-up memory estimate (exact parameter counts, hand-checked arithmetic,
the paper config on 80/141 GB GPUs), the refusal with its arithmetic, and scripts/gpu_check.py."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, LlamaConfig

from kdrl.config import load_config
from kdrl.memory import (
    LOGPROB_CHUNK_TOKENS,
    UNCHUNKED_LOGITS_BYTES,
    DeviceMemory,
    MemoryEstimateError,
    ModelShape,
    check_memory,
    device_memory,
    logprob_chunk_tokens,
    estimate_memory,
    row_tokens,
)

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "data/configs/paper_1p5b.yaml"
# The hub names of paper_1p5b.yaml → their config.json under data/fixtures/arch (no network).
ARCH = {"deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": ROOT / "data/fixtures/arch/deepseek-r1-distill-qwen-1.5b",
        "Skywork/Skywork-OR1-Math-7B": ROOT / "data/fixtures/arch/skywork-or1-math-7b"}
H100 = DeviceMemory("cuda", 81559 * 2**20, "H100 80GB")  # nvidia-smi's 81559 MiB
H200 = DeviceMemory("cuda", 143771 * 2**20, "H200")  # nvidia-smi's 143771 MiB


def paper(*overrides: str):
    cfg = load_config(PAPER, overrides=list(overrides))
    return cfg, str(ARCH[cfg.model.name_or_path]), str(ARCH[cfg.teacher.name_or_path])


def paper_estimate(device: DeviceMemory, *overrides: str):
    cfg, student, teacher = paper(*overrides)
    s, t = AutoConfig.from_pretrained(student), AutoConfig.from_pretrained(teacher)
    return estimate_memory(cfg, ModelShape.from_config(s), ModelShape.from_config(t), device=device,
                           row=row_tokens(cfg, s, t))


def test_paper_architectures_have_the_published_sizes():
    # 1.5B: embeddings + untied head 2 × 151936 × 1536 = 466,747,392; per layer q 1536² + 1536 bias,
    # k and v 1536·256 + 256, o 1536², MLP 3 × 1536·8960, two norms 2·1536 = 46,797,824; × 28 layers
    # + final norm 1536 = 1,777,088,000 (the model card's 1.78B).
    shapes = {name: ModelShape.from_config(AutoConfig.from_pretrained(path)) for name, path in ARCH.items()}
    student, teacher = shapes.values()
    assert student.params == 2 * 151936 * 1536 + 28 * 46_797_824 + 1536 == 1_777_088_000
    assert teacher.params == 7_615_616_512  # 7.62B: hidden 3584, 28 layers, 4 KV heads, vocab 152064
    assert (student.arch, student.layers, student.heads, student.kv_heads, student.head_dim) == (
        "Qwen2ForCausalLM", 28, 12, 2, 128)
    assert (teacher.hidden, teacher.intermediate, teacher.vocab) == (3584, 18944, 152064)


def test_paper_config_is_what_the_paper_says():
    cfg, _, _ = paper()
    assert (cfg.run.method, cfg.run.steps, cfg.rollout.max_new_tokens) == ("kdrl_anneal", 280, 8192)
    assert (cfg.loss.beta_init, cfg.loss.beta_delta, cfg.loss.beta_min, cfg.loss.kl_estimator) == (
        5e-3, 5e-5, 1e-3, "k2")
    assert (cfg.data.prompt_format, cfg.reward.thinking, cfg.teacher.dtype) == ("chat", "strip", "bfloat16")
    assert cfg.data.prompt_template.format(question="What is 1+1?") == (
        "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}.")
    assert cfg.model.gradient_checkpointing and cfg.optim.max_tokens_per_microbatch > 0
    assert cfg.rollout.engine == cfg.teacher.engine == "vllm"


@pytest.mark.parametrize("device", [H100, H200])
def test_paper_config_fits_one_gpu(device):
    est = paper_estimate(device)
    assert est.fits, est.format()
    assert "longest row 9,216 tokens" in est.format()  # 1024 prompt (vllm.max_model_len 9216 − 8192) + 8192


def test_paper_config_without_checkpointing_is_refused_with_the_arithmetic():
    cfg, student, teacher = paper("model.gradient_checkpointing=false")
    with pytest.raises(MemoryEstimateError) as err:
        check_memory(cfg, student, teacher, device=H100, log=lambda _: None)
    message = str(err.value)
    # Every layer's activations are kept: 16,384 tok × (28 + 1) layers × 241,720 B = 107 GiB, with
    # 241,720 = norms 2·(4·1536 + 4 + 2·4·1536) + attention 4·4·1536 + 4·12 + MLP 4·4·8960 + mask 4·9216.
    assert "16,384 tok × (28 + 1) layers × 241,720 B" in message
    assert "model.gradient_checkpointing=true" in message and "(fits)" in message
    assert "run.memory_check=warn" in message


def test_an_absurd_token_budget_is_refused():
    cfg, student, teacher = paper("optim.max_tokens_per_microbatch=1000000")
    with pytest.raises(MemoryEstimateError, match=r"589,824 tok × 28 layers × 1536 × 4 B"):  # 64 rows × 9216
        check_memory(cfg, student, teacher, device=H100, log=lambda _: None)


def test_warn_prints_and_off_skips():
    cfg, student, teacher = paper("model.gradient_checkpointing=false", "run.memory_check=warn")
    lines: list[str] = []
    est = check_memory(cfg, student, teacher, device=H100, log=lines.append)
    assert not est.fits and lines[0].startswith("[kdrl] memory estimate on cuda") and "WARNING" in lines[-1]
    cfg, student, teacher = paper("run.memory_check='off'")  # quoted: YAML reads a bare off as false
    assert check_memory(cfg, student, teacher, device=H100, log=lines.append) is None and len(lines) == 2


TINY = LlamaConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)


def test_tiny_llama_arithmetic_by_hand():
    # Parameters: embeddings 100·8 = 800, head 800, final norm 8; per layer q 8·8 = 64, k and v
    # 8·4 = 32 each (1 KV head of dim 4), o 64, gate/up/down 3·128, two norms 16 → 592; total 2792.
    shape = ModelShape.from_config(TINY)
    assert shape.params == 800 + 800 + 8 + 2 * 592 == 2792
    cfg = load_config(overrides=["model.dtype=float32", "optim.micro_batch_size=2", "rollout.max_new_tokens=24"])
    est = estimate_memory(cfg, shape, shape, device=DeviceMemory("cpu", 2**30, "test"), row=(32, "by hand"))
    rows = {r.item: r.bytes for r in est.resident} | {r.item: r.bytes for _, rs in est.phases for r in rs}
    assert rows["student params"] == rows["gradients"] == rows["teacher params"] == 2792 * 4
    assert rows["AdamW moments"] == 2 * 2792 * 4
    # Update, 2 rows × 32 tokens = 64 tokens; per token and layer (d = 4, S = 32): norms 2·(4·8 + 4 + 2·4·8)
    # = 200, attention 4·4·(2·4) + 4·2 = 136, MLP 4·4·16 = 256, mask 4·32 = 128 → 720; no checkpointing:
    # 64 × (2 + 1) × 720.
    assert rows["layer activations"] == 64 * 3 * 720 == 138_240
    # Outside the layers: final norm 4·8 + 4 + 2·4·8, the head's input 4·8, rotary cos/sin 2·4·4, ids 8.
    assert rows["boolean mask"] == 64 * 32 and rows["final norm, head, rotary"] == 64 * (32 + 4 + 64 + 32 + 32 + 8)
    assert rows["log-prob chunk"] == 64 * 100 * 4 * 3  # all 64 rows at once (a small vocabulary)
    # Generation (HF, CPU): min(batch 256, 16 prompts × 8) = 128 seqs × 32 × 2 (K, V) × 2 layers × 1 head × 4 × 4 B.
    assert rows["HF generate KV cache"] == 128 * 32 * 2 * 2 * 1 * 4 * 4
    # Teacher scoring: min(16384, 128 rows × 32) = 4096 tokens × 100 × 4 B + one row (24 + 1) × 100 × 8 B.
    assert rows["teacher logits"] == 4096 * 100 * 4 + 25 * 100 * 8
    assert rows["AdamW scratch"] == 800 * 4  # on CPU one tensor at a time: the largest, the 100 × 8 embedding
    resident = 3 * 2792 * 4 + 2792 * 4  # params, moments, teacher
    assert est.peak_phase == "teacher scoring" and est.margin.bytes == int(0.1 * (resident + rows["teacher logits"]))
    assert est.total_bytes == resident + rows["teacher logits"] + est.margin.bytes
    checkpointing = cfg.model.model_copy(update={"gradient_checkpointing": True})
    checkpointed = estimate_memory(cfg.model_copy(update={"model": checkpointing}),
                                   shape, shape, device=DeviceMemory("cpu", 2**30, "test"), row=(32, "by hand"))
    ck = {r.item: r.bytes for r in dict(checkpointed.phases)["update"]}
    assert ck["checkpointed inputs"] == 64 * 2 * 8 * 4 and ck["recomputed layer ×2"] == 64 * 2 * 720


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_estimate_is_what_autograd_keeps(dtype):
    """The per-layer formula against the tensors autograd really saves (CPU, float32, a padded
    batch): exact on CPU, float32 and bfloat16."""
    from transformers import AutoModelForCausalLM

    config = LlamaConfig(**{**TINY.to_dict(), "hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "vocab_size": 300})
    model = AutoModelForCausalLM.from_config(config).to(dtype).train()
    B, S = 2, 48
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :5] = 0  # left padding, as kdrl's batches have: SDPA gets a mask
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_decoder()(input_ids=torch.randint(0, 300, (B, S)), attention_mask=mask,
                            position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    shape = ModelShape.from_config(config)
    per_token = sum(saved.values()) / (B * S)
    # Beside the layers, this decoder-only call keeps the final norm's input, rsqrt and normalised
    # input (its output feeds nothing here), the rotary cos/sin (2 × head_dim) and the input ids.
    h, hd, d = shape.hidden, shape.head_dim, dtype.itemsize
    assert per_token == shape.layers * shape.layer_bytes_per_token(d, S) + (4 * h + 4 + d * h) + 2 * d * hd + 8


def test_lora_adapter_size_matches_peft():
    # r = 2 on every linear: r·(in + out) for q 8→8, k 8→4, v 8→4, o 8→8, gate 8→16, up 8→16, down 16→8
    # = 2·(16 + 12 + 12 + 16 + 24 + 24 + 24) = 256 per layer, 512 in all; q and v only: 2·(16 + 12)·2 = 112.
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from kdrl.config import LoraConfig
    from kdrl.lora import apply_lora

    shape = ModelShape.from_config(TINY)
    assert shape.lora_params(2, "all-linear") == 512 and shape.lora_params(2, ["q_proj", "v_proj"]) == 112
    model = apply_lora(AutoModelForCausalLM.from_config(TINY).to(torch.bfloat16), LoraConfig(r=2), seed=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 512
    # peft keeps bf16 bases' adapters in float32: the estimate's 4 B
    assert {p.dtype for p in trainable} == {torch.float32}


def test_lora_estimate_trains_only_the_adapter():
    _, student, _ = paper("model.lora={r: 16}")
    est = paper_estimate(H100, "model.lora={r: 16}")
    rows = {r.item: r for r in est.resident} | {r.item: r for r in dict(est.phases)["update"]}
    adapter = ModelShape.from_config(AutoConfig.from_pretrained(student)).lora_params(16, "all-linear")
    assert adapter == 18_464_768
    assert rows["gradients"].bytes == adapter * 4 and rows["AdamW moments"].bytes == 2 * adapter * 4


def test_bfloat16_weights_say_there_is_no_master_copy():
    est = paper_estimate(H100, "model.dtype=bfloat16")
    moments = next(r for r in est.resident if r.item == "AdamW moments")
    assert moments.bytes == 2 * 1_777_088_000 * 2 and "no float32 master copy" in moments.arithmetic


def test_the_estimate_holds_the_logits_the_trainer_holds():
    """The trainer decides its LM-head chunks with `logprob_chunk_tokens` (its default), so the
    estimate's row is one chunk for a large vocabulary and every row for a small one."""
    from kdrl.train import completion_logprobs_BT

    assert inspect.signature(completion_logprobs_BT).parameters["chunk_tokens"].default is None
    assert logprob_chunk_tokens(100_000, 151_936) == LOGPROB_CHUNK_TOKENS
    assert logprob_chunk_tokens(100_000, 80) is None
    assert logprob_chunk_tokens(UNCHUNKED_LOGITS_BYTES // 12 // 1000 + 1, 1000) == LOGPROB_CHUNK_TOKENS


def test_prompt_length_assumed_then_read_from_the_run(tmp_path):
    import polars as pl

    from kdrl.storage import PROMPTS, RunPaths, write_table

    cfg = load_config(overrides=["data.source=x.jsonl", "model.name_or_path=x", "teacher.name_or_path=y",
                                 "rollout.max_new_tokens=100"])
    student = AutoConfig.from_pretrained(ARCH["deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"])  # context 131072: no bound
    assert row_tokens(cfg, student, student) == (
        1024 + 100, "prompts assumed ≤ 1024 tokens (not tokenized yet): 1024 + rollout.max_new_tokens 100")
    assert row_tokens(cfg, student, student, prompt_tokens=37)[0] == 137
    short = load_config(overrides=["rollout.max_new_tokens=16"])
    why = "prompts ≤ the student's context of 64 tokens minus rollout.max_new_tokens 16: 48 + rollout.max_new_tokens 16"
    assert row_tokens(short, TINY, None) == (64, why)
    from kdrl.memory import _longest_prompt  # a run's prompts table gives the real longest prompt

    paths = RunPaths(tmp_path)
    paths.prompts.parent.mkdir(parents=True)
    assert _longest_prompt(tmp_path) is None

    table = pl.DataFrame({"prompt_id": [0, 1], "split": ["train", "heldout"], "question": ["a", "b"],
                          "answer": ["1", "2"], "prompt_text": ["a", "b"], "prompt_token_ids": [[1, 2, 3], [1] * 41]},
                         schema_overrides={"prompt_token_ids": pl.List(pl.Int32)})
    write_table(table.select(PROMPTS.names()).cast(dict(PROMPTS)), paths.prompts, table="prompts")
    assert _longest_prompt(tmp_path) == 41


def test_embedded_default_fits_this_machine(tmp_path, tiny_student, tiny_teacher, tiny_tokenizer):
    from kdrl.models import save_model

    for name, model in (("student", tiny_student), ("teacher", tiny_teacher)):
        save_model(model, tiny_tokenizer, tmp_path / name)
    cfg = load_config(ROOT / "data/configs/default.yaml", overrides=["model.device=cpu", "teacher.device=cpu"])
    lines: list[str] = []
    est = check_memory(cfg, str(tmp_path / "student"), str(tmp_path / "teacher"), log=lines.append)
    # ~1.3 GiB: the update's 64 rows × 256 tokens (the tiny models' whole context) dominate
    assert est.fits and est.device == device_memory("cpu") and est.total_bytes < 2 * 2**30
    assert lines == [est.format()]


def test_open_run_refuses_before_loading_weights_or_writing_the_run(tmp_path):
    """The fixture folders hold config.json only: the refusal must come before any weights load,
    and before config.yaml is written, so the user can change the config and start again."""
    from kdrl.workers import load_run

    student, teacher = ARCH.values()
    cfg = load_config(overrides=[f"model.name_or_path={student}", f"teacher.name_or_path={teacher}",
                                 "rollout.engine=hf", "teacher.engine=hf", "model.device=cpu", "teacher.device=cpu",
                                 "optim.micro_batch_size=64", f"run.runs_dir={tmp_path}"])
    with pytest.raises(MemoryEstimateError, match="model.gradient_checkpointing=true"):
        load_run(cfg, tmp_path / "run", log=lambda _: None)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_gpu_check_runs_tiny_on_cpu():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--tiny"], capture_output=True, text=True,
                         env=env, timeout=600, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = out.stdout.split("== summary")[1]
    for section in ("generate", "teacher scoring", "update float32", "update bfloat16", "update, LoRA",
                    "update, data-parallel (gloo, 1 rank)", "update, FSDP2 (gloo, 1 rank)"):
        assert f"| {section} | " in summary, summary
    assert "largest weight difference to no data parallelism: 0.0e+00 (must be 0) ok" in summary, summary
    fsdp = re.search(r"\| update, FSDP2 .*difference to no data parallelism: (\S+) ", summary)
    assert fsdp and float(fsdp.group(1)) <= 1e-6, summary
    assert "n/a" in summary  # no peak memory on CPU; the estimates are printed beside it


def test_gpu_check_vs_trl_runs_tiny_on_cpu():
    """The GPU check's kdrl-vs-TRL step (run on a lent GPU at 1.5B/7B) runs end to end on tiny
    models: TRL tokenizes the word-level prompts back to kdrl's ids, both arms train."""
    pytest.importorskip("trl")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--tiny", "--vs-trl"],
                         capture_output=True, text=True, env=env, timeout=600, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    summary = out.stdout.split("== summary")[1]
    assert re.search(r"\| kdrl step \(stage functions\) \| \d+ \| .*kdrl / TRL per repetition = [0-9.]+, [0-9.]+×",
                     summary), summary
    assert re.search(r"\| TRL GRPOTrainer step \+ teacher \| \d+ \| ", summary), summary


def test_hf_models_config_fits_one_80gb_gpu_with_vllm():
    """Its engines are "auto": vLLM on a GPU where vllm is installed (the config's premise); HF
    generate of 256 rows × 5k tokens would not fit, and is refused with that arithmetic."""
    cfg = load_config(ROOT / "data/configs/hf_models.yaml")
    s, t = (AutoConfig.from_pretrained(ARCH[name]) for name in (cfg.model.name_or_path, cfg.teacher.name_or_path))
    shapes = ModelShape.from_config(s), ModelShape.from_config(t)
    est = estimate_memory(cfg, *shapes, device=H100, row=row_tokens(cfg, s, t), vllm_installed=True)
    assert est.fits, est.format()
    without = estimate_memory(cfg, *shapes, device=H100, row=row_tokens(cfg, s, t), vllm_installed=False)
    assert not without.fits and "HF generate KV cache" in without.format()
    assert cfg.data.prompt_format == "chat" and cfg.model.dtype == "float32"
