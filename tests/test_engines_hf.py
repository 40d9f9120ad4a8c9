"""HF rollout engine and teacher scorer, checked against a plain full forward pass (teacher forcing)."""

from __future__ import annotations

import copy

import pytest
import torch

from kdrl.engines.base import RolloutEngine, TeacherScorer
from kdrl.engines.hf import (
    HFRolloutEngine,
    HFTeacherScorer,
    _SampledLogprobRecorder,
    check_same_tokenizer,
)
from kdrl.models import CHARSET, build_char_tokenizer

PROMPTS = ["12+34=", "5+6=", "100 + 200 =", "a"]  # different lengths: left padding is exercised


@pytest.fixture(scope="module")
def prompt_ids(tiny_tokenizer):
    return [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]


def _reference_logp_T(model, prompt, completion, temperature=1.0):
    """log_softmax(logits / T) at each completion token, from one unpadded full forward."""
    with torch.no_grad():
        logits_SV = model(torch.tensor([prompt + completion])).logits[0].float()
    logp_TV = torch.log_softmax(logits_SV[len(prompt) - 1 : -1] / temperature, dim=-1)
    return logp_TV, logp_TV.gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def _with_head_bias(model, bias_V):
    """A copy whose logits are exactly ``bias_V`` at every position (zero weight + bias)."""
    patched = copy.deepcopy(model)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    head.bias.data.copy_(bias_V)
    patched.lm_head = head
    return patched


def test_engines_satisfy_the_protocols(tiny_student, tiny_tokenizer):
    engine: RolloutEngine = HFRolloutEngine(tiny_student, tiny_tokenizer)
    scorer: TeacherScorer = HFTeacherScorer(tiny_student, tiny_tokenizer)
    assert callable(engine.generate) and callable(scorer.score)
    assert engine.sync_weights() is None


def test_rollouts_are_prompt_major_with_consistent_fields(tiny_student, tiny_tokenizer, prompt_ids):
    engine = HFRolloutEngine(tiny_student, tiny_tokenizer, batch_size=5)  # 12 rows → 3 chunks
    out = engine.generate(prompt_ids, n=3, max_new_tokens=12, seed=0)
    assert len(out) == 12
    assert out.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert out.sample_index == [0, 1, 2] * 4
    assert out.prompt_token_ids == [prompt_ids[p] for p in out.prompt_index]
    for ids, logps, reason, text in zip(
        out.completion_token_ids, out.sampler_logprobs, out.finish_reason, out.completion_text
    ):
        assert len(logps) == len(ids) >= 1
        assert all(lp <= 0 for lp in logps)
        assert text == tiny_tokenizer.decode(ids, skip_special_tokens=True)
        assert reason == ("stop" if ids[-1] == 2 else "length")
        assert 2 not in ids[:-1]
        assert reason == "stop" or len(ids) == 12


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_sampler_logprobs_match_a_full_forward(tiny_student, tiny_tokenizer, prompt_ids, temperature):
    # The key correctness check: KV-cached, left-padded, chunked sampling reports exactly the
    # tempered log-prob a trainer recomputes by teacher forcing.
    engine = HFRolloutEngine(tiny_student, tiny_tokenizer, batch_size=7)
    out = engine.generate(prompt_ids, n=4, max_new_tokens=16, temperature=temperature, seed=1)
    for prompt, ids, logps in zip(out.prompt_token_ids, out.completion_token_ids, out.sampler_logprobs):
        _, ref_T = _reference_logp_T(tiny_student, prompt, ids, temperature)
        torch.testing.assert_close(torch.tensor(logps), ref_T, rtol=0, atol=1e-5)


def test_tempered_logprobs_are_not_the_untempered_ones(tiny_student, tiny_tokenizer, prompt_ids):
    out = HFRolloutEngine(tiny_student, tiny_tokenizer).generate(
        prompt_ids[:1], n=2, max_new_tokens=8, temperature=0.5, seed=0
    )
    _, plain_T = _reference_logp_T(tiny_student, out.prompt_token_ids[0], out.completion_token_ids[0])
    assert (torch.tensor(out.sampler_logprobs[0]) - plain_T).abs().max() > 1e-2


def test_greedy_is_argmax_with_raw_logprobs(tiny_student, tiny_tokenizer, prompt_ids):
    out = HFRolloutEngine(tiny_student, tiny_tokenizer).generate(
        prompt_ids, n=2, max_new_tokens=6, temperature=0.0, seed=0
    )
    for r in range(0, len(out), 2):
        assert out.completion_token_ids[r] == out.completion_token_ids[r + 1]
        prompt, ids = out.prompt_token_ids[r], out.completion_token_ids[r]
        logp_TV, ref_T = _reference_logp_T(tiny_student, prompt, ids)
        assert logp_TV.argmax(-1).tolist() == ids
        torch.testing.assert_close(torch.tensor(out.sampler_logprobs[r]), ref_T, rtol=0, atol=1e-5)


def test_tiny_top_p_is_greedy(tiny_student, tiny_tokenizer, prompt_ids):
    engine = HFRolloutEngine(tiny_student, tiny_tokenizer)
    nucleus = engine.generate(prompt_ids, n=2, max_new_tokens=6, top_p=1e-6, seed=5)
    greedy = engine.generate(prompt_ids, n=2, max_new_tokens=6, temperature=0.0)
    assert nucleus.completion_token_ids == greedy.completion_token_ids


def test_seeding_is_deterministic_and_leaves_caller_rng_alone(tiny_student, tiny_tokenizer, prompt_ids):
    engine = HFRolloutEngine(tiny_student, tiny_tokenizer)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = engine.generate(prompt_ids, n=4, max_new_tokens=10, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(5)  # the caller's RNG moves on: must not matter
    b = engine.generate(prompt_ids, n=4, max_new_tokens=10, seed=7)
    c = engine.generate(prompt_ids, n=4, max_new_tokens=10, seed=8)
    assert a.completion_token_ids == b.completion_token_ids
    assert a.completion_token_ids != c.completion_token_ids


def test_forced_eos_stops_after_one_token(tiny_student, tiny_tokenizer, prompt_ids):
    bias_V = torch.zeros(len(tiny_tokenizer))
    bias_V[tiny_tokenizer.eos_token_id] = 50.0  # p(eos) = 1 - 79 e^-50 ≈ 1
    out = HFRolloutEngine(_with_head_bias(tiny_student, bias_V), tiny_tokenizer).generate(
        prompt_ids, n=2, max_new_tokens=5
    )
    assert out.completion_token_ids == [[2]] * 8
    assert out.finish_reason == ["stop"] * 8
    assert out.completion_text == [""] * 8
    assert max(abs(lp[0]) for lp in out.sampler_logprobs) < 1e-6


def test_mixed_stop_and_length(tiny_student, tiny_tokenizer, prompt_ids):
    bias_V = torch.zeros(len(tiny_tokenizer))
    bias_V[2] = 3.0  # p(eos) = e^3 / (e^3 + 79) ≈ 0.20 per step: some stop, some run to the limit
    out = HFRolloutEngine(_with_head_bias(tiny_student, bias_V), tiny_tokenizer).generate(
        prompt_ids, n=16, max_new_tokens=6, seed=0
    )
    assert set(out.finish_reason) == {"stop", "length"}
    for ids, reason in zip(out.completion_token_ids, out.finish_reason):
        assert (ids[-1] == 2) == (reason == "stop")
        assert 2 not in ids[:-1] and 0 < len(ids) <= 6
        assert reason == "stop" or len(ids) == 6


def test_one_new_token_without_eos_is_length(tiny_student, tiny_tokenizer, prompt_ids):
    bias_V = torch.zeros(len(tiny_tokenizer))
    bias_V[2] = -50.0
    out = HFRolloutEngine(_with_head_bias(tiny_student, bias_V), tiny_tokenizer).generate(
        prompt_ids, n=2, max_new_tokens=1
    )
    assert out.finish_reason == ["length"] * 8
    assert all(len(ids) == 1 for ids in out.completion_token_ids)


def test_no_top_k_and_checkpoint_defaults_ignored(tiny_student, tiny_tokenizer, prompt_ids):
    # Uniform logits over 80 tokens: with transformers' default top_k=50 at most 50 distinct
    # tokens could ever appear; ~80 * (1 - e^{-draws/80}) ≈ 80 do without truncation.
    bias_V = torch.zeros(len(tiny_tokenizer))
    bias_V[2] = -50.0
    model = _with_head_bias(tiny_student, bias_V)
    model.generation_config.top_k = 5
    model.generation_config.repetition_penalty = 10.0
    out = HFRolloutEngine(model, tiny_tokenizer).generate(prompt_ids, n=16, max_new_tokens=16)
    distinct = {t for ids in out.completion_token_ids for t in ids}
    assert len(distinct) > 60
    uniform_logp = -torch.log(torch.tensor(float(len(tiny_tokenizer) - 1))).item()
    assert all(abs(lp - uniform_logp) < 1e-5 for lps in out.sampler_logprobs for lp in lps)
    assert model.generation_config.top_k == 5  # restored


def test_logprob_recorder_drops_steps_generate_undid():
    # generate may run one extra step and undo it (deferred stop check, on mps): the recorder then
    # holds more steps than tokens and must keep only those of the returned tokens.
    logits_BV = [torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 0.0, 0.0]]), torch.zeros(1, 3)]
    tokens_BT = torch.tensor([[2, 0, 1]])
    recorder = _SampledLogprobRecorder(temperature=2.0)
    for t, step_logits in enumerate(logits_BV):  # step t sees the prompt (here 5) + t tokens
        recorder(torch.cat([torch.tensor([[5]]), tokens_BT[:, :t]], dim=1), step_logits)
    expected_T = torch.stack(
        [torch.log_softmax(lg[0] / 2.0, -1)[tok] for lg, tok in zip(logits_BV, [2, 0, 1])]
    )
    torch.testing.assert_close(recorder.finish(tokens_BT)[0], expected_T)  # all 3 steps kept
    torch.testing.assert_close(recorder.finish(tokens_BT[:, :2])[0], expected_T[:2])  # 1 step undone


def test_generation_runs_in_eval_mode_and_restores_training(tiny_student, tiny_tokenizer, prompt_ids):
    model = copy.deepcopy(tiny_student).train()
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    HFRolloutEngine(model, tiny_tokenizer).generate(prompt_ids, n=1, max_new_tokens=3)
    assert seen and not any(seen)
    assert model.training


def _completions(tiny_tokenizer):
    texts = ["7", "", "1 + 1 = 2 and more text here", "99", "x y z", "", "(3)"]
    return [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.mark.parametrize("budget", [1, 40, 16384])
def test_scores_equal_unbatched_reference(tiny_teacher, tiny_tokenizer, prompt_ids, budget):
    completions = _completions(tiny_tokenizer)
    prompts = [prompt_ids[r % len(prompt_ids)] for r in range(len(completions))]
    scorer = HFTeacherScorer(tiny_teacher, tiny_tokenizer, max_tokens_per_batch=budget)
    scores = scorer.score(prompts, completions, top_k=5)
    for r, (prompt, completion) in enumerate(zip(prompts, completions)):
        if not completion:
            assert scores.logprobs[r] == scores.topk_ids[r] == scores.topk_logprobs[r] == []
            continue
        logp_TV, ref_T = _reference_logp_T(tiny_teacher, prompt, completion)
        torch.testing.assert_close(torch.tensor(scores.logprobs[r]), ref_T, rtol=0, atol=1e-5)
        top_logp_TK, top_ids_TK = torch.topk(logp_TV, 5, dim=-1)
        assert scores.topk_ids[r] == top_ids_TK.tolist()
        topk_logp_TK = torch.tensor(scores.topk_logprobs[r])
        torch.testing.assert_close(topk_logp_TK, top_logp_TK, rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk_rows", [1, 2])
def test_log_softmax_chunks_change_no_bit(tiny_teacher, tiny_tokenizer, prompt_ids, monkeypatch, chunk_rows):
    """The scorer takes log_softmax over chunks of rows (LOGSOFTMAX_CHUNK_ELEMENTS): a row's
    values are bit-for-bit those of a batch holding every row at once."""
    import kdrl.engines.hf as hf

    completions = _completions(tiny_tokenizer)
    prompts = [prompt_ids[r % len(prompt_ids)] for r in range(len(completions))]
    whole = HFTeacherScorer(tiny_teacher, tiny_tokenizer).score(prompts, completions, top_k=3)
    t_max, vocab = max(map(len, completions)), tiny_teacher.config.vocab_size
    monkeypatch.setattr(hf, "LOGSOFTMAX_CHUNK_ELEMENTS", chunk_rows * t_max * vocab)
    chunked = HFTeacherScorer(tiny_teacher, tiny_tokenizer).score(prompts, completions, top_k=3)
    assert chunked == whole


def test_scoring_packs_batches_by_token_budget(tiny_student, tiny_tokenizer, prompt_ids):
    completions = _completions(tiny_tokenizer)  # 5 non-empty, total lengths 8..36 tokens
    prompts = [prompt_ids[0]] * len(completions)
    calls: list[tuple[int, int]] = []
    model = copy.deepcopy(tiny_student)
    model.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    HFTeacherScorer(model, tiny_tokenizer, max_tokens_per_batch=1).score(prompts, completions)
    assert len(calls) == 5  # every sequence alone; empty completions cost no forward
    calls.clear()
    HFTeacherScorer(model, tiny_tokenizer).score(prompts, completions)
    assert len(calls) == 1 and calls[0][0] == 5
    calls.clear()
    HFTeacherScorer(model, tiny_tokenizer, max_tokens_per_batch=40).score(prompts, completions)
    assert all(rows * width <= 40 or rows == 1 for rows, width in calls)
    assert [rows for rows, _ in calls] != [5]


def test_on_a_cpu_scoring_batches_hold_at_most_the_cpu_token_budget(tiny_student, tiny_tokenizer, prompt_ids):
    from kdrl.perf import CPU_TOKENS_PER_PASS

    completions = [[5] * 30] * 48  # 48 rows of ~40 tokens: ~1,900 padded tokens, under the 16k default
    prompts = [prompt_ids[0]] * len(completions)
    calls: list[tuple[int, int]] = []
    model = copy.deepcopy(tiny_student)
    model.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    scorer = HFTeacherScorer(model, tiny_tokenizer)
    assert scorer.max_tokens_per_batch == CPU_TOKENS_PER_PASS
    scorer.score(prompts, completions)
    assert len(calls) > 1 and all(rows * width <= CPU_TOKENS_PER_PASS for rows, width in calls)


def test_scoring_without_top_k_and_all_empty(tiny_student, tiny_tokenizer, prompt_ids):
    scorer = HFTeacherScorer(tiny_student, tiny_tokenizer)
    scores = scorer.score(prompt_ids[:2], [[], [5, 6, 2]])
    assert scores.topk_ids is None and scores.topk_logprobs is None
    assert scores.logprobs[0] == [] and len(scores.logprobs[1]) == 3
    assert scorer.score(prompt_ids[:2], [[], []]).logprobs == [[], []]
    with pytest.raises(ValueError, match="prompts vs"):
        scorer.score(prompt_ids[:2], [[5]])


def test_scorer_refuses_a_different_tokenizer(tiny_student, tiny_tokenizer):
    other = build_char_tokenizer(CHARSET + "!")
    with pytest.raises(ValueError, match="vocab size 80 vs 81"):
        HFTeacherScorer(tiny_student, other, student_tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="teacher tokenizer differs"):
        check_same_tokenizer(tiny_tokenizer, other)
    check_same_tokenizer(tiny_tokenizer, build_char_tokenizer())  # same vocabulary: fine
