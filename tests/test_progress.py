"""Progress of the long stages: log lines at an interval (no terminal here), with token counts
that match what the stage produced, nothing for a stage shorter than the interval, the same
samples with or without it, and the lines of a real (tiny) run's stages."""

from __future__ import annotations

import re

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from kdrl.engines.hf import HFRolloutEngine, HFTeacherScorer
from kdrl.progress import reporting


class _Tokenizer:
    pad_token_id, eos_token_id = 0, 5

    def batch_decode(self, ids, **_):
        return ["" for _ in ids]


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(config).eval()


PROMPTS = [[1, 2, 3], [4, 6, 7, 8], [9, 10]]


def _tokens(line: str) -> int:
    return int(re.search(r"([\d,]+) tokens", line).group(1).replace(",", ""))


def test_generation_logs_decode_steps_and_the_exact_token_count_at_the_end():
    engine = HFRolloutEngine(_model(), _Tokenizer(), batch_size=4)  # 3 prompts × 2 = 6 rows: two chunks
    quiet = engine.generate(PROMPTS, n=2, max_new_tokens=40, seed=3)
    lines: list[str] = []
    with reporting(lines.append, "generate step 7", every_s=0.0):
        loud = engine.generate(PROMPTS, n=2, max_new_tokens=40, seed=3)
    assert loud == quiet  # counting tokens on the side changes no sample
    assert all(line.startswith("[kdrl] generate step 7: ") for line in lines) and len(lines) > 10
    assert "/80 decode steps" in lines[0]
    done = lines[-1]
    assert done.startswith("[kdrl] generate step 7: done, 80/80 decode steps, ") and "tokens/s" in done
    assert _tokens(done) == sum(map(len, loud.completion_token_ids))
    counts = [_tokens(line) for line in lines]
    assert counts == sorted(counts)  # the running count only grows


def test_teacher_scoring_logs_each_packed_batch_with_the_tokens_scored():
    scorer = HFTeacherScorer(_model(), _Tokenizer(), max_tokens_per_batch=16)
    completions = [[11, 12, 13, 14], [15, 16], [17, 18, 19, 20, 21, 22]]
    lines: list[str] = []
    with reporting(lines.append, "teacher scoring step 2", every_s=0.0):
        scored = scorer.score(PROMPTS, completions)
    batches = scorer._packed_batches(PROMPTS, completions)
    assert len(lines) == len(batches) + 1 and f"{len(batches)}/{len(batches)} batches" in lines[-1]
    assert _tokens(lines[-1]) == sum(len(p) + len(c) for p, c in zip(PROMPTS, completions))
    assert scored == scorer.score(PROMPTS, completions)


def test_a_stage_shorter_than_the_interval_logs_nothing():
    lines: list[str] = []
    with reporting(lines.append, "generate step 0", every_s=3600.0):
        HFRolloutEngine(_model(), _Tokenizer()).generate(PROMPTS, n=1, max_new_tokens=8, seed=0)
    assert lines == []


def test_a_run_reports_progress_of_its_stages(tmp_path, tiny_run_config, embedded_cache, monkeypatch, capsys):
    from flows.train import train_without_prefect

    monkeypatch.setenv("KDRL_PROGRESS_EVERY_S", "0")
    train_without_prefect(tiny_run_config(tmp_path, **{"run.steps": 1}), tmp_path / "runs" / "progress")
    out = capsys.readouterr().out
    for stage in ("evaluate before training", "generate step 0", "teacher scoring step 0", "evaluate step 0"):
        assert re.search(rf"^\[kdrl\] {stage}: done, .* tokens in .* tokens/s\)$", out, re.M), stage
