"""Prompt sets: the embedded arithmetic task, local files with custom columns, the seeded split,
and the per-step prompt sampler."""

from __future__ import annotations

import json

import polars as pl
import pytest

from kdrl.config import DataConfig
from kdrl.data import build_prompts, embedded_arithmetic, sample_prompt_ids, worked_answer
from kdrl.rewards import reference_answer
from kdrl.storage import PROMPTS, read_table, write_table

SMALL = DataConfig(num_train=50, num_heldout=10)


@pytest.fixture(autouse=True)
def _offline_datasets(monkeypatch, tmp_path):
    """No hub, and a throwaway `datasets` cache. Both are read by `datasets` at import, so the
    module attributes are patched too, not only the environment."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache", raising=False)


def _operands(question: str) -> tuple[int, int]:
    a, b = question.rstrip("=").split("+")
    return int(a), int(b)


def _read_off(answer: str) -> int:
    """The sum as the worked answer's column steps give it: the last column's total, then the
    units digit of every earlier column, most significant first ("7+5=12;4+8+1=13" → 132)."""
    totals = [int(step.rsplit("=", 1)[1]) for step in answer.split(";")[:-1]]
    return int(str(totals[-1]) + "".join(str(t % 10) for t in reversed(totals[:-1])))


# worked_answer


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (0, 0, "0+0=0;#### 0"),
        (4, 5, "4+5=9;#### 9"),
        (9, 9, "9+9=18;#### 18"),  # one column; its total is the whole answer
        # 9+1=10 carries 1 into every column: 9+0+1=10, twice, and the last carry is the leading 1.
        (999, 1, "9+1=10;9+0+1=10;9+0+1=10;#### 1000"),
        (1, 99, "1+9=10;0+9+1=10;#### 100"),  # the shorter operand is padded with 0 on the left
        (50, 50, "0+0=0;5+5=10;#### 100"),  # no carry out of the units: no "+0" term
    ],
)
def test_worked_answer_by_hand(a, b, expected):
    assert worked_answer(a, b) == expected


@pytest.mark.parametrize(("a", "b"), [(0, 7), (18, 982), (4567, 5433), (99999, 1), (123, 4560)])
def test_worked_answer_steps_and_final_line_agree(a, b):
    answer = worked_answer(a, b)
    assert reference_answer(answer) == str(a + b)
    assert _read_off(answer) == a + b
    assert answer.count(";") == max(len(str(a)), len(str(b)))  # one step per column, then "####"


# embedded_arithmetic


def test_embedded_arithmetic_is_distinct_seeded_and_correct():
    ds = embedded_arithmetic(300, seed=7, min_digits=2, max_digits=4)
    assert ds.column_names == ["question", "answer"] and len(ds) == 300
    assert len(set(ds["question"])) == 300
    for question, answer in zip(ds["question"], ds["answer"]):
        a, b = _operands(question)
        assert 2 <= len(str(a)) <= 4 and 2 <= len(str(b)) <= 4
        assert answer.endswith(f"#### {a + b}")
        assert reference_answer(answer) == str(a + b)
        assert _read_off(answer) == a + b
    again = embedded_arithmetic(300, seed=7, min_digits=2, max_digits=4)
    other = embedded_arithmetic(300, seed=8, min_digits=2, max_digits=4)
    assert again["question"] == ds["question"] and other["question"] != ds["question"]


def test_embedded_arithmetic_uses_every_allowed_length():
    questions = embedded_arithmetic(200, seed=0, max_digits=3)["question"]
    lengths = {len(str(x)) for q in questions for x in _operands(q)}
    assert lengths == {1, 2, 3}


def test_embedded_arithmetic_capacity_and_digit_bounds():
    # One-digit operands: 9 × 9 = 81 ordered pairs (1..9 each); at most half, 40, may be asked for.
    assert len(embedded_arithmetic(40, seed=0, min_digits=1, max_digits=1)) == 40
    with pytest.raises(ValueError, match="41 distinct problems"):
        embedded_arithmetic(41, seed=0, min_digits=1, max_digits=1)
    with pytest.raises(ValueError, match="min_digits <= max_digits"):
        embedded_arithmetic(3, seed=0, min_digits=3, max_digits=2)
    with pytest.raises(ValueError, match="min_digits"):
        embedded_arithmetic(3, seed=0, min_digits=0, max_digits=2)


# build_prompts, embedded source


@pytest.fixture(scope="module")
def small_prompts(tiny_tokenizer):
    return build_prompts(SMALL, tiny_tokenizer)


def test_build_prompts_schema_roundtrips_through_storage(small_prompts, tmp_path):
    assert small_prompts.schema == PROMPTS
    path = write_table(small_prompts, tmp_path / "offline/prompts.parquet", table="prompts")
    assert read_table(path, table="prompts").equals(small_prompts)


def test_build_prompts_split_counts_and_disjointness(small_prompts):
    assert small_prompts["prompt_id"].to_list() == list(range(60))
    heldout = small_prompts.filter(pl.col("split") == "heldout")
    train = small_prompts.filter(pl.col("split") == "train")
    assert (heldout.height, train.height) == (10, 50)
    assert set(heldout["question"]).isdisjoint(train["question"])
    assert small_prompts["question"].n_unique() == 60


def test_build_prompts_answers_and_tokens(small_prompts, tiny_tokenizer):
    for row in small_prompts.iter_rows(named=True):
        a, b = _operands(row["question"])
        assert row["answer"] == str(a + b)  # the reference answer, not the worked solution
        assert row["prompt_text"] == row["question"]  # default template "{question}"
        assert row["prompt_token_ids"] == tiny_tokenizer(row["prompt_text"])["input_ids"]


def test_build_prompts_is_deterministic(small_prompts, tiny_tokenizer):
    assert build_prompts(SMALL, tiny_tokenizer).equals(small_prompts)
    other_seed = build_prompts(SMALL.model_copy(update={"seed": 5}), tiny_tokenizer)
    assert other_seed["question"].to_list() != small_prompts["question"].to_list()


def test_growing_num_train_keeps_the_heldout_set(small_prompts, tiny_tokenizer):
    bigger = build_prompts(SMALL.model_copy(update={"num_train": 200}), tiny_tokenizer)
    heldout = lambda df: df.filter(pl.col("split") == "heldout").drop("split")  # noqa: E731
    assert heldout(bigger).equals(heldout(small_prompts))
    # ...and no prompt held out before is trained on now.
    trained_now = bigger.filter(pl.col("split") == "train")["question"]
    assert set(heldout(small_prompts)["question"]).isdisjoint(trained_now)


# build_prompts, local files


def _gsm8k_rows(n: int) -> list[dict]:
    return [
        {
            "problem": f"Sam has {i} apples and buys {i + 3} more. How many apples now?",
            "solution": f"He has {i} + {i + 3} = {2 * i + 3} apples.\n#### {2 * i + 3}",
            "source_id": i,
        }
        for i in range(n)
    ]


def _write(rows: list[dict], path):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        pl.DataFrame(rows).write_csv(path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        pl.DataFrame(rows).write_parquet(path)
    return path


def _local_cfg(source, **update) -> DataConfig:
    fields = dict(source=str(source), question_field="problem", answer_field="solution",
                  prompt_template="Question: {question}\nAnswer:",
                  num_train=12, num_heldout=4, seed=3)
    return DataConfig(**{**fields, **update})


@pytest.mark.parametrize("name", ["gsm.jsonl", "gsm.csv", "gsm.parquet", "folder/train.parquet"])
def test_build_prompts_from_local_files(tmp_path, tiny_tokenizer, name):
    rows = _gsm8k_rows(20)
    path = _write(rows, tmp_path / name)
    # A folder goes to load_dataset(folder), which reads it offline.
    source = path.parent if name.startswith("folder/") else path
    prompts = build_prompts(_local_cfg(source), tiny_tokenizer)
    assert prompts.schema == PROMPTS
    assert prompts["split"].value_counts().sort("split").rows() == [("heldout", 4), ("train", 12)]
    assert prompts["question"].n_unique() == 16
    gold = {r["problem"]: str(2 * r["source_id"] + 3) for r in rows}
    for row in prompts.iter_rows(named=True):
        assert row["answer"] == gold[row["question"]]  # "#### 2i+3" read off the worked solution
        assert row["prompt_text"] == f"Question: {row['question']}\nAnswer:"
        assert row["prompt_token_ids"] == tiny_tokenizer(row["prompt_text"])["input_ids"]
    write_table(prompts, tmp_path / "prompts.parquet", table="prompts")


def test_local_split_is_the_same_for_every_format(tmp_path, tiny_tokenizer):
    rows = _gsm8k_rows(20)
    frames = [build_prompts(_local_cfg(_write(rows, tmp_path / f"gsm.{ext}")), tiny_tokenizer)
              for ext in ("jsonl", "csv", "parquet")]
    assert frames[0].equals(frames[1]) and frames[0].equals(frames[2])


def test_local_heldout_survives_a_larger_num_train(tmp_path, tiny_tokenizer):
    path = _write(_gsm8k_rows(30), tmp_path / "gsm.jsonl")
    small = build_prompts(_local_cfg(path), tiny_tokenizer)
    large = build_prompts(_local_cfg(path, num_train=26), tiny_tokenizer)
    heldout = lambda df: df.filter(pl.col("split") == "heldout")  # noqa: E731
    assert heldout(large).equals(heldout(small))


def test_missing_column_is_named_with_the_available_ones(tmp_path, tiny_tokenizer):
    path = _write(_gsm8k_rows(20), tmp_path / "gsm.jsonl")
    available = r"\['problem', 'solution', 'source_id'\]"
    with pytest.raises(ValueError, match=rf"no column 'question'.*{available}"):
        build_prompts(_local_cfg(path, question_field="question"), tiny_tokenizer)
    with pytest.raises(ValueError, match=r"no column 'answer'"):
        build_prompts(_local_cfg(path, answer_field="answer"), tiny_tokenizer)


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_empty_question_names_its_row(tmp_path, tiny_tokenizer, ext):
    rows = _gsm8k_rows(16)  # exactly num_train + num_heldout: every row is read
    rows[5]["problem"] = "" if ext == "csv" else "   "  # csv reads "" back as null
    path = _write(rows, tmp_path / f"gsm.{ext}")
    with pytest.raises(ValueError, match=r"row 5: empty or non-text 'problem'"):
        build_prompts(_local_cfg(path), tiny_tokenizer)


def test_answer_without_a_reference_names_its_row(tmp_path, tiny_tokenizer):
    rows = _gsm8k_rows(16)
    rows[9]["solution"] = None
    path = _write(rows, tmp_path / "gsm.jsonl")
    with pytest.raises(ValueError, match=r"row 9: no reference answer in 'solution'"):
        build_prompts(_local_cfg(path), tiny_tokenizer)


def test_too_few_rows(tmp_path, tiny_tokenizer):
    path = _write(_gsm8k_rows(15), tmp_path / "gsm.parquet")
    with pytest.raises(ValueError, match=r"15 rows, but num_train \+ num_heldout = 16"):
        build_prompts(_local_cfg(path), tiny_tokenizer)


def test_unsupported_suffix(tmp_path, tiny_tokenizer):
    path = tmp_path / "gsm.txt"
    path.write_text("Sam has 2 apples.\n#### 2\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'"):
        build_prompts(_local_cfg(path), tiny_tokenizer)


# sample_prompt_ids


TRAIN_IDS = list(range(100, 112))  # n = 12 training prompts


def test_sample_prompt_ids_is_a_pure_function_of_seed_and_step():
    later_first = sample_prompt_ids(TRAIN_IDS, step=7, count=4, seed=0)
    for step in range(7):
        sample_prompt_ids(TRAIN_IDS, step=step, count=4, seed=0)
    assert sample_prompt_ids(TRAIN_IDS, step=7, count=4, seed=0) == later_first
    assert sample_prompt_ids(TRAIN_IDS, step=7, count=4, seed=1) != later_first


@pytest.mark.parametrize("count", [1, 3, 4, 5, 12])
def test_each_epoch_uses_distinct_prompts_and_drops_the_remainder(count):
    # An epoch is n // count steps of distinct ids from one shuffle; the n % count left over are
    # dropped (like drop_last), so no step straddles epochs or repeats a prompt.
    epochs, per_epoch = 3, len(TRAIN_IDS) // count
    for e in range(epochs):
        batches = [sample_prompt_ids(TRAIN_IDS, step=e * per_epoch + s, count=count, seed=4) for s in range(per_epoch)]
        assert all(len(batch) == count == len(set(batch)) for batch in batches)
        seen = [i for batch in batches for i in batch]
        assert len(seen) == len(set(seen)) == per_epoch * count
        if len(TRAIN_IDS) % count == 0:
            assert sorted(seen) == TRAIN_IDS
    first = [sample_prompt_ids(TRAIN_IDS, step=s, count=count, seed=4) for s in range(per_epoch)]
    second = [sample_prompt_ids(TRAIN_IDS, step=per_epoch + s, count=count, seed=4) for s in range(per_epoch)]
    assert first != second  # each epoch is a fresh shuffle


def test_sample_prompt_ids_refuses_more_than_n():
    assert sorted(sample_prompt_ids(TRAIN_IDS, step=3, count=12, seed=0)) == TRAIN_IDS
    with pytest.raises(ValueError, match=r"prompts_per_step=13 must be in 1\.\.12"):
        sample_prompt_ids(TRAIN_IDS, step=0, count=13, seed=0)
