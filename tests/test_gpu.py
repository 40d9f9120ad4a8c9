"""CUDA checks (skipped without a GPU): the same code path as on CPU, on the device."""

import copy

import polars as pl
import pytest
import torch

from kdrl.batching import collate, join_step_tables
from kdrl.config import LossConfig, OptimConfig
from kdrl.engines.hf import HFRolloutEngine, HFTeacherScorer
from kdrl.stages import generate_rollouts, score_teacher
from kdrl.train import build_optimizer, completion_logprobs_BT, update_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_on_cuda(dtype, tiny_tokenizer, tiny_student, tiny_teacher):
    student = copy.deepcopy(tiny_student).to("cuda", dtype)
    teacher = copy.deepcopy(tiny_teacher).to("cuda", dtype)
    ids = tiny_tokenizer(["12+34=", "5+7="])["input_ids"]
    prompts = pl.DataFrame({"prompt_id": [0, 1], "prompt_token_ids": ids},
                           schema_overrides={"prompt_token_ids": pl.List(pl.Int32)})
    rollouts = generate_rollouts(HFRolloutEngine(student, tiny_tokenizer), prompts, step=0, n=4, max_new_tokens=12,
                                 seed=0)
    rewards = rollouts.select("step", "prompt_id", "sample_idx").with_columns(
        pl.Series("reward", [1.0, 0, 0, 0, 0, 1, 0, 0], dtype=pl.Float32),
        pl.lit(None, pl.String).alias("extracted_answer"), pl.lit(False).alias("truncated"))
    teacher_scores = score_teacher(HFTeacherScorer(teacher, tiny_tokenizer), rollouts, pl.Series([True] * 8))
    batch = collate(join_step_tables(rollouts, rewards, teacher_scores), pad_token_id=0).to(torch.device("cuda"))
    with torch.no_grad():
        logp_BT, _ = completion_logprobs_BT(student, batch)
    gap = ((logp_BT - batch.sampler_logp_BT).abs() * batch.completion_mask_BT).max().item()
    assert gap < (1e-4 if dtype == torch.float32 else 0.1)
    optimizer, scheduler = build_optimizer(student, OptimConfig(lr=1e-3), total_steps=2)
    result = update_step(student, optimizer, scheduler, batch, loss_cfg=LossConfig(beta_init=0.1),
                         optim_cfg=OptimConfig(lr=1e-3), optimizer_step=0)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.metrics.values())
