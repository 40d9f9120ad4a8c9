"""Pipeline stages on the tiny models and on hand-built tables: keys, schemas, and the rows each
stage touches (only KD-needed rows reach the teacher)."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from kdrl.config import LossConfig, RewardConfig
from kdrl.engines.hf import HFRolloutEngine, HFTeacherScorer
from kdrl.stages import (
    generate_rollouts,
    grade_samples,
    kd_needed,
    score_rewards,
    score_teacher,
    summarize_evaluation,
)
from kdrl.storage import EVALUATIONS, REWARDS, ROLLOUTS, TEACHER_LOGPROBS, read_table, write_table
from kdrl.train import kd_mask_B

QUESTIONS = {11: ("12+34=", "46"), 22: ("5+6=", "11"), 33: ("100+200=", "300")}


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    """A PROMPTS-shaped table with non-contiguous ids (rollouts must carry the ids, not indices)."""
    ids = list(QUESTIONS)
    texts = [QUESTIONS[i][0] for i in ids]
    return pl.DataFrame(
        {
            "prompt_id": ids,
            "split": ["heldout"] * len(ids),
            "question": texts,
            "answer": [QUESTIONS[i][1] for i in ids],
            "prompt_text": texts,
            "prompt_token_ids": tiny_tokenizer(texts)["input_ids"],
        },
        schema_overrides={"prompt_token_ids": pl.List(pl.Int32)},
    )


@pytest.fixture(scope="module")
def rollouts(tiny_student, tiny_tokenizer, prompts):
    engine = HFRolloutEngine(tiny_student, tiny_tokenizer)
    return generate_rollouts(engine, prompts, step=3, n=4, max_new_tokens=10, seed=0)


def _rollouts_frame(rows: list[tuple[int, int, str, str]], *, step: int = 0) -> pl.DataFrame:
    """ROLLOUTS rows from (prompt_id, sample_idx, completion_text, finish_reason); token columns
    are placeholders (rewards only read the text)."""
    return pl.DataFrame(
        {
            "step": [step] * len(rows),
            "prompt_id": [r[0] for r in rows],
            "sample_idx": [r[1] for r in rows],
            "prompt_token_ids": [[1, 5]] * len(rows),
            "completion_token_ids": [[6, 2]] * len(rows),
            "sampler_logprobs": [[-0.5, -0.1]] * len(rows),
            "finish_reason": [r[3] for r in rows],
            "completion_text": [r[2] for r in rows],
        },
        schema=ROLLOUTS,
    )


# generate_rollouts


def test_generate_rollouts_keys_and_schema(rollouts, prompts, tmp_path):
    assert rollouts.schema == ROLLOUTS and rollouts.height == 12  # 3 prompts × n=4
    assert rollouts["step"].to_list() == [3] * 12
    assert rollouts["prompt_id"].to_list() == [11] * 4 + [22] * 4 + [33] * 4
    assert rollouts["sample_idx"].to_list() == [0, 1, 2, 3] * 3
    by_id = dict(zip(prompts["prompt_id"], prompts["prompt_token_ids"].to_list()))
    for row in rollouts.iter_rows(named=True):
        assert row["prompt_token_ids"] == by_id[row["prompt_id"]]
        assert 1 <= len(row["completion_token_ids"]) <= 10
        assert len(row["sampler_logprobs"]) == len(row["completion_token_ids"])
        assert row["finish_reason"] in ("stop", "length")
    path = write_table(rollouts, tmp_path / "iter_00003/rollouts.parquet", table="rollouts")
    assert read_table(path, table="rollouts").equals(rollouts)


def test_generate_rollouts_is_seeded(rollouts, tiny_student, tiny_tokenizer, prompts):
    engine = HFRolloutEngine(tiny_student, tiny_tokenizer)
    again = generate_rollouts(engine, prompts, step=3, n=4, max_new_tokens=10, seed=0)
    assert again["completion_token_ids"].to_list() == rollouts["completion_token_ids"].to_list()


# score_rewards


def test_score_rewards_by_hand(prompts, tmp_path):
    frame = _rollouts_frame([
        (11, 0, "2+4=6;1+3=4;#### 46", "stop"),  # right → 1
        (11, 1, "2+4=6;1+3=4;#### 47", "stop"),  # wrong → 0
        (22, 0, "5+6=11;#### 11", "length"),  # right but cut at max_new_tokens → 0
        (22, 1, "5+6=", "stop"),  # no "####": the last number, 6, is wrong → 0
        (33, 0, "no answer here", "stop"),  # nothing to extract → null, 0
        (33, 1, "0+0=0;0+0=0;1+2=3;#### 300", "stop"),  # right → 1
    ])
    rewards = score_rewards(frame, prompts, RewardConfig())
    assert rewards.schema == REWARDS
    assert rewards.select("prompt_id", "sample_idx").equals(frame.select("prompt_id", "sample_idx"))
    assert rewards["extracted_answer"].to_list() == ["46", "47", "11", "6", None, "300"]
    assert rewards["reward"].to_list() == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert rewards["truncated"].to_list() == [False, False, True, False, False, False]
    write_table(rewards, tmp_path / "rewards.parquet", table="rewards")


def test_score_rewards_keeps_row_order_whatever_the_prompt_order(prompts):
    frame = _rollouts_frame(
        [(33, 0, "#### 300", "stop"), (11, 0, "#### 300", "stop"), (22, 0, "#### 11", "stop")]
    )
    rewards = score_rewards(frame, prompts.reverse(), RewardConfig())
    assert rewards["prompt_id"].to_list() == [33, 11, 22]
    assert rewards["reward"].to_list() == [1.0, 0.0, 1.0]  # 300 is right only for prompt 33


def test_score_rewards_unknown_prompt_is_an_error(prompts):
    frame = _rollouts_frame([(11, 0, "#### 46", "stop"), (99, 0, "#### 1", "stop")])
    with pytest.raises(ValueError, match="prompt_id 99, which is not in the prompts table"):
        score_rewards(frame, prompts, RewardConfig())


# kd_needed

# Two groups of G = 3. Prompt 10 rewards [1, 0, 0] (one right); prompt 20 [0, 0, 0] (all wrong),
# and its sample 1 was cut at max_new_tokens.
_SORTED = [  # (prompt_id, sample_idx, reward, finish_reason)
    (10, 0, 1.0, "stop"), (10, 1, 0.0, "stop"), (10, 2, 0.0, "stop"),
    (20, 0, 0.0, "stop"), (20, 1, 0.0, "length"), (20, 2, 0.0, "stop"),
]
_ROLLOUT_ORDER = [4, 0, 5, 2, 3, 1]  # rows of _SORTED, deliberately not sorted by key
_REWARD_ORDER = [2, 5, 1, 3, 0, 4]  # and the rewards table in yet another order


@pytest.fixture
def kd_tables():
    rows = [_SORTED[i] for i in _ROLLOUT_ORDER]
    roll = _rollouts_frame([(p, g, "", reason) for p, g, _, reason in rows])
    picked = [_SORTED[i] for i in _REWARD_ORDER]
    rewards = pl.DataFrame(
        {"step": [0] * 6, "prompt_id": [r[0] for r in picked], "sample_idx": [r[1] for r in picked],
         "extracted_answer": [None] * 6, "reward": [r[2] for r in picked],
         "truncated": [r[3] == "length" for r in picked]},
        schema=REWARDS,
    )
    return roll, rewards


@pytest.mark.parametrize(
    ("kd_mask", "kd_on_truncated", "expected_sorted"),
    [
        ("none", True, [1, 1, 1, 1, 1, 1]),
        ("response", True, [0, 1, 1, 1, 1, 1]),  # wrong responses only
        ("group", True, [0, 0, 0, 1, 1, 1]),  # only the all-wrong group (prompt 20)
        ("none", False, [1, 1, 1, 1, 0, 1]),  # minus the truncated (20, 1)
        ("response", False, [0, 1, 1, 1, 0, 1]),
        ("group", False, [0, 0, 0, 1, 0, 1]),
    ],
)
def test_kd_needed_by_hand_in_rollout_row_order(
    kd_tables, kd_mask, kd_on_truncated, expected_sorted
):
    roll, rewards = kd_tables
    cfg = LossConfig(kd_mask=kd_mask, kd_on_truncated=kd_on_truncated)
    needed = kd_needed(roll, rewards, cfg)
    assert needed.name == "kd_needed" and needed.dtype == pl.Boolean
    assert needed.to_list() == [bool(expected_sorted[i]) for i in _ROLLOUT_ORDER]
    # Reference twin: the trainer's own mask on the sorted [P, G] rewards.
    rewards_PG = torch.tensor([r[2] for r in _SORTED]).view(2, 3)
    truncated_B = torch.tensor([r[3] == "length" for r in _SORTED])
    mask_B = kd_mask_B(rewards_PG, truncated_B, cfg)
    assert mask_B.bool().tolist() == [bool(x) for x in expected_sorted]


# score_teacher


NEEDED = [True, False, False, True, True, False, True, True, False, False, False, True]


def test_score_teacher_scores_only_needed_rows(rollouts, tiny_teacher, tiny_tokenizer, tmp_path):
    scorer = HFTeacherScorer(tiny_teacher, tiny_tokenizer)
    needed = pl.Series("kd_needed", NEEDED)
    teacher = score_teacher(scorer, rollouts, needed)
    assert teacher.schema == TEACHER_LOGPROBS
    key = ["step", "prompt_id", "sample_idx"]
    assert teacher.select(key).equals(rollouts.select(key))
    assert teacher["teacher_logprobs"].is_null().to_list() == [not x for x in NEEDED]
    # top_k=0: no top-k anywhere.
    assert teacher["topk_ids"].null_count() == teacher["topk_logprobs"].null_count() == 12
    for row, flag in enumerate(NEEDED):
        if not flag:
            continue
        prompt = rollouts["prompt_token_ids"][row].to_list()
        completion = rollouts["completion_token_ids"][row].to_list()
        alone = scorer.score([prompt], [completion]).logprobs[0]  # the row scored on its own
        got = teacher["teacher_logprobs"][row].to_list()
        assert len(got) == len(completion)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(alone), rtol=0, atol=1e-5)
    write_table(teacher, tmp_path / "teacher.parquet", table="teacher_logprobs")


def test_score_teacher_topk(rollouts, tiny_teacher, tiny_tokenizer, tmp_path):
    scorer = HFTeacherScorer(tiny_teacher, tiny_tokenizer)
    teacher = score_teacher(scorer, rollouts, pl.Series("kd_needed", NEEDED), top_k=3)
    for row, flag in enumerate(NEEDED):
        ids, logps = teacher["topk_ids"][row], teacher["topk_logprobs"][row]
        if not flag:
            assert ids is None and logps is None
            continue
        sampled = teacher["teacher_logprobs"][row].to_list()
        assert len(ids) == len(logps) == len(sampled)
        for ids_K, logp_K, logp in zip(ids.to_list(), logps.to_list(), sampled):
            assert len(ids_K) == len(logp_K) == 3 and len(set(ids_K)) == 3
            assert logp_K == sorted(logp_K, reverse=True)
            assert logp <= logp_K[0] + 1e-5  # nothing beats the teacher's top-1
    path = write_table(teacher, tmp_path / "teacher.parquet", table="teacher_logprobs")
    back = read_table(path, table="teacher_logprobs")
    assert back["topk_ids"].null_count() == NEEDED.count(False)


def test_score_teacher_with_nothing_needed(rollouts, tiny_teacher, tiny_tokenizer, tmp_path):
    scorer = HFTeacherScorer(tiny_teacher, tiny_tokenizer)
    teacher = score_teacher(scorer, rollouts, pl.Series("kd_needed", [False] * 12), top_k=3)
    assert teacher.schema == TEACHER_LOGPROBS and teacher["teacher_logprobs"].null_count() == 12
    write_table(teacher, tmp_path / "teacher.parquet", table="teacher_logprobs")


# summarize_evaluation


def _evaluations(correct_PK: list[list[bool]], lens_PK: list[list[int]], *,
                 model: str = "student", step: int = 0, split: str | None = "heldout") -> pl.DataFrame:
    """EVALUATIONS rows for prompts 0..P-1; prompt p has len(correct_PK[p]) samples."""
    rows = [
        (p, k, c, n)
        for p, (cs, ns) in enumerate(zip(correct_PK, lens_PK))
        for k, (c, n) in enumerate(zip(cs, ns))
    ]
    return pl.DataFrame(
        {
            "step": [step] * len(rows),
            "prompt_id": [r[0] for r in rows],
            "sample_idx": [r[1] for r in rows],
            "split": [split] * len(rows),
            "model": [model] * len(rows),
            "temperature": [1.0] * len(rows),
            "completion_text": [""] * len(rows),
            "completion_len": [r[3] for r in rows],
            "finish_reason": ["stop"] * len(rows),
            "extracted_answer": [None] * len(rows),
            "correct": [r[2] for r in rows],
        },
        schema=EVALUATIONS,
    )


def test_summarize_evaluation_by_hand():
    # 5 prompts × k=2. Per-prompt accuracy: 1, 0.5, 0, 0.5, 0 → pass@1 = 2.0 / 5 = 0.4.
    correct = [[True, True], [True, False], [False, False], [False, True], [False, False]]
    # Lengths 1..10: mean = 55 / 10 = 5.5;
    # p90 ("nearest") = sorted[round(0.9 · 9)] = sorted[8] = 9 (not the max, 10).
    lens = [[3, 10], [1, 7], [2, 9], [5, 4], [8, 6]]
    summary = summarize_evaluation(_evaluations(correct, lens))
    assert summary.height == 1
    row = summary.row(0, named=True)
    group = (row["step"], row["model"], row["temperature"], row["num_prompts"])
    assert group == (0, "student", 1.0, 5)
    assert row["pass_at_1"] == pytest.approx(0.4, abs=1e-12)
    assert row["mean_len"] == pytest.approx(5.5, abs=1e-12)
    assert row["p90_len"] == 9


def test_summaries_are_per_split_and_rows_without_one_are_heldout():
    heldout = _evaluations([[True, False]], [[4, 6]])
    dtype = heldout["prompt_id"].dtype
    ood = _evaluations([[False, False]], [[10, 12]], split="ood").with_columns(prompt_id=pl.lit(1, dtype))
    older = _evaluations([[True, True]], [[2, 2]], split=None).with_columns(prompt_id=pl.lit(2, dtype))  # < 1.4
    both = pl.concat([heldout, ood, older])
    assert summarize_evaluation(both).select("pass_at_1", "num_prompts", "mean_len").row(0) == (0.75, 2, 3.5)
    assert summarize_evaluation(both, split="ood").select("pass_at_1", "num_prompts", "mean_len").row(0) == (0, 1, 11)
    assert summarize_evaluation(heldout.drop("split"), split="ood").height == 0


def test_pass_at_1_weights_prompts_not_samples():
    # Prompt 0: 1 right of 4 (0.25); prompt 1: 1 of 1 (1.0). Per prompt: (0.25 + 1) / 2 = 0.625;
    # pooled over samples it would be 2 / 5 = 0.4.
    frame = _evaluations([[True, False, False, False], [True]], [[1, 1, 1, 1], [1]])
    assert summarize_evaluation(frame)["pass_at_1"].item() == pytest.approx(0.625, abs=1e-12)


def test_summarize_evaluation_one_row_per_model_and_step():
    frames = [
        _evaluations([[True, True]], [[4, 4]], model="teacher", step=2),
        _evaluations([[False, True]], [[2, 6]], model="student", step=2),
        _evaluations([[False, False]], [[3, 3]], model="student", step=0),
    ]
    summary = summarize_evaluation(pl.concat(frames))
    assert summary.select("step", "model", "pass_at_1", "mean_len").rows() == [
        (0, "student", 0.0, 3.0), (2, "student", 0.5, 4.0), (2, "teacher", 1.0, 4.0),
    ]


# grade_samples


def test_evaluate_greedy_is_one_row_per_prompt_and_deterministic(
    tiny_student, tiny_tokenizer, prompts, tmp_path
):
    engine = HFRolloutEngine(tiny_student, tiny_tokenizer)
    kwargs = dict(step=5, model_name="student", k=1, temperature=0.0, max_new_tokens=8,
                  reward_cfg=RewardConfig())
    first = grade_samples(engine, prompts, seed=0, **kwargs)
    assert first.schema == EVALUATIONS
    assert first["prompt_id"].to_list() == prompts["prompt_id"].to_list()
    assert first["sample_idx"].to_list() == [0, 0, 0]
    assert first["model"].to_list() == ["student"] * 3
    assert first["temperature"].to_list() == [0.0] * 3
    greedy = generate_rollouts(engine, prompts, step=5, n=1, max_new_tokens=8,
                               temperature=0.0, seed=0)
    assert first["completion_len"].to_list() == greedy["completion_token_ids"].list.len().to_list()
    assert first["completion_text"].to_list() == greedy["completion_text"].to_list()
    assert grade_samples(engine, prompts, seed=123, **kwargs).equals(first)  # greedy: the seed is moot
    write_table(first, tmp_path / "eval.parquet", table="evaluations")
