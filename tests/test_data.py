"""Prompt sets: the embedded arithmetic task, local files with custom columns, the seeded split,
and the per-step prompt sampler."""

from __future__ import annotations

import copy
import json
import logging
import re

import polars as pl
import pytest

from kdrl.config import DataConfig, EvalConfig
from kdrl.data import (
    DatasetError,
    build_prompts,
    context_length,
    embedded_arithmetic,
    load_source,
    normalised_question,
    prompt_token_limit,
    sample_prompt_ids,
    unique_rows,
    worked_answer,
)
from kdrl.evaluation import build_eval_config, eval_prompts, run_eval
from kdrl.rewards import reference_answer
from kdrl.storage import PROMPTS, RunPaths, read_table, write_table

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


# unreadable files: the file and the line are named (DatasetError is a ValueError: the CLI prints it)


def _jsonl_lines(n: int) -> list[str]:
    return [json.dumps(r) for r in _gsm8k_rows(n)]


def _refused(path, *, match: str, **update) -> DatasetError:
    with pytest.raises(DatasetError, match=match) as info:
        load_source(_local_cfg(path, **update))
    assert isinstance(info.value, ValueError)
    return info.value


def test_a_non_utf8_byte_is_named_by_file_line_and_byte(tmp_path):
    lines = _jsonl_lines(20)
    # Line 3 holds "café" in Latin-1: 0xe9 where UTF-8 needs a multi-byte sequence.
    body = ("\n".join(lines[:2]).encode() + b"\n"
            + lines[2].replace("Sam", "Caf\\u00e9").encode().replace(b"Caf\\u00e9", b"Caf\xe9"))
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(body + b"\n" + "\n".join(lines[3:]).encode() + b"\n")
    offset = body.index(b"\xe9")
    _refused(path, match=rf"latin1\.jsonl: line 3 \(byte {offset}: 0xe9\) is not UTF-8 text; save the file as UTF-8")
    csv_path = tmp_path / "latin1.csv"
    csv_path.write_bytes(b"problem,solution\nSam has 2,#### 2\nJos\xe9 has 3,#### 3\n")
    # 17 + 17 bytes of the first two lines, then "Jos": the bad byte is at offset 37.
    _refused(csv_path, match=r"latin1\.csv: line 3 \(byte 37: 0xe9\) is not UTF-8")


@pytest.mark.parametrize("bad_line", [4, 3001])  # inside datasets' first block, and in a later one
def test_a_malformed_json_line_is_named(tmp_path, bad_line):
    lines = _jsonl_lines(3005)
    lines[bad_line - 1] = '{"problem": "Sam has 2 apples", "solution": '  # cut short
    path = tmp_path / "gsm.jsonl"
    path.write_text("\n".join(lines) + "\n")
    _refused(path, match=rf"gsm\.jsonl: line {bad_line} is not valid JSON \(Expecting value at column 45\)")


def test_a_line_that_is_not_an_object_and_a_broken_json_document(tmp_path):
    lines = _jsonl_lines(5)
    lines[1] = '["Sam has 2 apples", "#### 2"]'
    path = tmp_path / "gsm.jsonl"
    path.write_text("\n".join(lines) + "\n")
    _refused(path, match=r"gsm\.jsonl: line 2 is not a JSON object")
    document = tmp_path / "gsm.json"  # one pretty-printed array, not JSON lines
    document.write_text('[\n  {"problem": "a", "solution": "1"},\n  {"problem": "b", "solution": }\n]\n')
    _refused(document, match=r"gsm\.json: line 3 is not valid JSON \(Expecting value at column 32\)")


def test_a_ragged_csv_names_the_line_and_field_counts(tmp_path):
    path = tmp_path / "gsm.csv"
    path.write_text("problem,solution\nSam has 2,#### 2\nSam has 1,000 apples,#### 1000\nSam has 3,#### 3\n")
    _refused(path, match=r"gsm\.csv: line 3 has 3 fields but the header has 2 \(problem, solution\): "
                         r"'Sam has 1,000 apples,#### 1000'; quote fields that contain commas")


@pytest.mark.parametrize("name", ["gsm.jsonl", "gsm.json", "gsm.csv", "gsm.parquet"])
@pytest.mark.parametrize("content", ["", " \n\n"])
def test_an_empty_file_is_named(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    _refused(path, match=rf"{re.escape(name)}: the file is empty")


def test_a_csv_header_without_rows(tmp_path):
    path = tmp_path / "gsm.csv"
    path.write_text("problem,solution\n")
    _refused(path, match=r"gsm\.csv: no rows under the header \(problem, solution\)")


def test_the_bad_file_of_a_folder_is_named(tmp_path):
    _write(_gsm8k_rows(10), tmp_path / "data" / "a.parquet")
    (tmp_path / "data" / "b.parquet").write_bytes(b"")
    _refused(tmp_path / "data", match=r"b\.parquet: the file is empty")


def test_a_misspelt_column_is_named_with_a_suggestion(tmp_path):
    path = _write(_gsm8k_rows(20), tmp_path / "gsm.jsonl")
    _refused(path, question_field="Problem",
             match=r"no column 'Problem' \(data\.question_field\) \(did you mean 'problem'\?\); "
                   r"columns are \['problem'")
    _refused(path, answer_field="answer", match=r"no column 'answer' \(data\.answer_field\); columns are")


# duplicates: removed before the split, so nothing held out is trained on


def _with_duplicates(n_distinct: int) -> list[dict]:
    """Each of `n_distinct` questions 1 to 4 times, the repeats differing only in whitespace and case."""
    rows = []
    for row in _gsm8k_rows(n_distinct):
        variants = [row["problem"], row["problem"].upper(), "  " + row["problem"].replace(" ", "\t "),
                    row["problem"].lower()]
        rows += [{**row, "problem": v} for v in variants[: 1 + row["source_id"] % 4]]
    return rows


def test_normalised_question_collapses_whitespace_and_case():
    assert normalised_question(" Sam  has\t2\nAPPLES ") == "sam has 2 apples"
    assert normalised_question("Straße") == normalised_question("STRASSE")  # case-folded, not lower-cased


def test_duplicates_never_land_in_both_splits(tmp_path, tiny_tokenizer, caplog):
    rows = _with_duplicates(40)  # 40 distinct questions in 1+2+3+4 (×10) = 100 rows
    assert len(rows) == 100
    path = _write(rows, tmp_path / "dups.jsonl")
    for seed in range(5):
        with caplog.at_level(logging.WARNING, logger="kdrl.data"):
            caplog.clear()
            prompts = build_prompts(_local_cfg(path, num_train=30, num_heldout=10, seed=seed), tiny_tokenizer)
        # The key spelt out here, not taken from kdrl: whitespace runs collapsed, case-folded.
        keys = [" ".join(q.split()).casefold() for q in prompts["question"]]
        heldout = {k for k, split in zip(keys, prompts["split"]) if split == "heldout"}
        assert heldout.isdisjoint(k for k, split in zip(keys, prompts["split"]) if split == "train")
        assert len(heldout) == 10 and len(set(keys)) == prompts.height == 40  # every distinct question once
        assert "60 duplicate row(s) dropped" in caplog.text and "40 distinct questions remain" in caplog.text
    # The first row of each question is the one kept: the original spelling.
    assert set(prompts["question"]) == {r["problem"] for r in _gsm8k_rows(40)}
    with pytest.raises(DatasetError,
                       match=r"100 rows \(60 duplicate\(s\): 40 usable\), but num_train \+ num_heldout = 41"):
        build_prompts(_local_cfg(path, num_train=31, num_heldout=10), tiny_tokenizer)


def test_eval_takes_each_distinct_question_once(tmp_path, tiny_tokenizer):
    path = _write(_with_duplicates(12), tmp_path / "dups.jsonl")  # 30 rows, 12 distinct
    cfg = EvalConfig(checkpoint="unused", data=_local_cfg(path))
    prompts = eval_prompts(cfg, tiny_tokenizer)
    assert prompts.height == 12 and set(prompts["split"]) == {"heldout"}
    assert eval_prompts(cfg.model_copy(update={"limit": 5}), tiny_tokenizer).height == 5


def test_the_embedded_task_has_no_duplicates_to_drop(caplog):
    # So the default prompts (and the embedded cache built from them) are what they were.
    questions = embedded_arithmetic(2200, seed=1234)["question"]
    assert unique_rows(list(questions)) == (list(range(2200)), {})


# prompts longer than the model's context


def test_context_length_of_the_tiny_models(tiny_student, tiny_tokenizer, caplog):
    # build_tiny_llama: max_position_embeddings = 256; the char tokenizer does not know a limit
    # (transformers' int(1e30)), so it is only the fallback.
    assert context_length(tiny_student.config, tiny_tokenizer) == 256
    assert context_length(object(), tiny_tokenizer) is None
    tiny_tokenizer_copy = copy.copy(tiny_tokenizer)
    tiny_tokenizer_copy.model_max_length = 128
    assert context_length(object(), tiny_tokenizer_copy) == 128
    limit = prompt_token_limit({"the student": tiny_student.config}, tiny_tokenizer, max_new_tokens=48,
                               field="rollout.max_new_tokens")
    assert (limit.tokens, limit.why) == (256 - 48,
                                         "the student's context of 256 tokens minus rollout.max_new_tokens 48")
    with caplog.at_level(logging.WARNING, logger="kdrl.data"):
        limit = prompt_token_limit({"the model": tiny_student.config}, tiny_tokenizer, max_new_tokens=512,
                                   field="max_new_tokens")
    assert limit.tokens == 255
    assert "max_new_tokens=512 fills all of the model's context of 256 tokens" in caplog.text
    assert prompt_token_limit({"the model": object()}, tiny_tokenizer, max_new_tokens=48,
                              field="max_new_tokens") is None


def test_the_prompt_limit_is_the_smallest_context_the_sequence_must_fit(tiny_student, tiny_model_dir, tiny_tokenizer):
    from kdrl.data import PromptLimit

    def limit(**contexts):
        return prompt_token_limit({"the student": tiny_student.config, **contexts}, tiny_tokenizer,
                                  max_new_tokens=48, field="rollout.max_new_tokens")

    # The tiny models' context is 256 positions; an engine limit below it binds, 0 means unset.
    assert limit(**{"rollout.vllm.max_model_len": 100}) == PromptLimit(
        100 - 48, "rollout.vllm.max_model_len 100 minus rollout.max_new_tokens 48",
        "lower rollout.max_new_tokens or raise rollout.vllm.max_model_len")
    assert limit(**{"rollout.vllm.max_model_len": 0}).tokens == 256 - 48
    # Above the model's context: the model binds.
    assert limit(**{"rollout.vllm.max_model_len": 5120}).tokens == 256 - 48
    # A model given by its folder: its config.json is read (the teacher's context is 256 too).
    assert limit(**{"the teacher": str(tiny_model_dir / "teacher"), "teacher.vllm.max_model_len": 90}).why == \
        "teacher.vllm.max_model_len 90 minus rollout.max_new_tokens 48"


def test_a_prompt_longer_than_the_budget_is_dropped_and_replaced(tmp_path, tiny_tokenizer, caplog):
    rows = _gsm8k_rows(20)
    # One character, one token: the other rows' questions are 54-56 characters, so their prompts
    # (with "Question: ", "\nAnswer:" and <bos>) are at most 56 + 10 + 8 + 1 = 75 tokens. These
    # two are 26 + 5 * 18 = 116 and 117 characters: 135 and 136 tokens.
    for i in (2, 17):
        rows[i]["problem"] = f"Sam has 2 apples. Then {i}. " + "Sam has 2 apples. " * 5
    path = _write(rows, tmp_path / "gsm.jsonl")
    with caplog.at_level(logging.WARNING, logger="kdrl.data"):
        prompts = build_prompts(_local_cfg(path, num_train=16, num_heldout=2), tiny_tokenizer, max_prompt_tokens=100)
    assert prompts.height == 18 and prompts["prompt_token_ids"].list.len().max() == 75
    assert "Then" not in "".join(prompts["question"])
    assert ("2 prompt(s) longer than 100 tokens" in caplog.text
            and re.search(r"dropped: rows (2, 17|17, 2)$", caplog.text, re.MULTILINE))
    unlimited = build_prompts(_local_cfg(path, num_train=16, num_heldout=2), tiny_tokenizer)
    assert sorted(unlimited["prompt_token_ids"].list.len())[-2:] == [135, 136]  # what the limit dropped
    with pytest.raises(DatasetError, match=r"20 rows \(2 too long: 18 usable\), but num_train \+ num_heldout = 19"):
        build_prompts(_local_cfg(path, num_train=17, num_heldout=2), tiny_tokenizer, max_prompt_tokens=100)
    with pytest.raises(DatasetError, match=r"every prompt is longer than 10 tokens"):
        build_prompts(_local_cfg(path), tiny_tokenizer, max_prompt_tokens=10)


@pytest.fixture
def long_question_file(tmp_path):
    """Four sums and one 100,000-character question (row 2): far past the tiny models' 256 positions."""
    rows = [{"problem": f"{a}+{b}=", "solution": worked_answer(a, b)} for a, b in [(3, 4), (12, 9), (40, 2), (7, 7)]]
    rows.insert(2, {"problem": "1+" * 50_000 + "1=", "solution": "#### 50001"})
    return _write(rows, tmp_path / "long.jsonl")


def test_kdrl_eval_drops_a_question_longer_than_the_context(long_question_file, tiny_model_dir, tmp_path, caplog):
    cfg = build_eval_config(str(tiny_model_dir / "student"), str(long_question_file),
                            ["data.question_field=problem", "data.answer_field=solution", "run.eval_samples=1",
                             "run.eval_temperature=0", "rollout.max_new_tokens=4"])
    with caplog.at_level(logging.WARNING, logger="kdrl.data"):
        out = run_eval(cfg, tmp_path / "ev", log=lambda _: None)
    samples = read_table(out.samples, table="evaluations")
    # Only the four sums were generated for: 256 - 4 = 252 tokens is the longest prompt.
    assert samples.height == 4 and samples["prompt_id"].to_list() == [0, 1, 2, 3]
    assert "1 prompt(s) longer than 252 tokens" in caplog.text and "dropped: rows 2" in caplog.text


def test_training_drops_a_question_longer_than_the_context(long_question_file, tiny_model_dir, tmp_path, caplog):
    from kdrl.config import load_config
    from kdrl.workers import load_run

    overrides = {"run.method": "grpo", "model.name_or_path": str(tiny_model_dir / "student"), "rollout.engine": "hf",
                 "data.source": str(long_question_file), "data.question_field": "problem",
                 "data.answer_field": "solution", "data.num_train": 3, "data.num_heldout": 1,
                 "rollout.prompts_per_step": 1, "rollout.max_new_tokens": 12,
                 "run.runs_dir": str(tmp_path / "runs"), "run.cache_dir": str(tmp_path / "cache")}
    cfg = load_config(overrides=[f"{k}={v}" for k, v in overrides.items()])
    with caplog.at_level(logging.WARNING, logger="kdrl.data"):
        session = load_run(cfg, tmp_path / "runs" / "long", log=lambda _: None)
    session.close()
    prompts = read_table(RunPaths(tmp_path / "runs" / "long").prompts, table="prompts")
    assert sorted(prompts["question"]) == ["12+9=", "3+4=", "40+2=", "7+7="]
    assert "1 prompt(s) longer than 244 tokens" in caplog.text  # 256 - rollout.max_new_tokens 12


@pytest.fixture
def medium_question_file(tmp_path):
    """Four sums (prompts of 5-6 tokens with <bos>) and one 142-character sum (row 2: 143 tokens):
    inside the tiny models' 256 positions with 12 new tokens, outside a 64-token engine or a
    128-position teacher."""
    rows = [{"problem": f"{a}+{b}=", "solution": worked_answer(a, b)} for a, b in [(3, 4), (12, 9), (40, 2), (7, 7)]]
    rows.insert(2, {"problem": "1+" * 70 + "1=", "solution": "#### 71"})
    return _write(rows, tmp_path / "medium.jsonl")


@pytest.fixture(scope="module")
def short_context_teacher(tmp_path_factory, tiny_tokenizer):
    """The tiny teacher with 128 positions instead of 256 (Llama has no position weights)."""
    from kdrl.models import TINY_TEACHER, build_tiny_llama, save_model

    path = tmp_path_factory.mktemp("short_teacher") / "teacher"
    save_model(build_tiny_llama(tiny_tokenizer, **TINY_TEACHER, max_position_embeddings=128, seed=1), tiny_tokenizer,
               path)
    return path


@pytest.mark.parametrize("settings, dropped_because", [
    # The rollout engine may be vLLM ("auto"; tiny models on CPU resolve to hf, no engine is built):
    # 64 - 12 = 52 tokens.
    ({"run.method": "grpo", "rollout.vllm.max_model_len": 64},
     "52 tokens (rollout.vllm.max_model_len 64 minus rollout.max_new_tokens 12)"),
    # rollout.engine=hf: vLLM's setting plays no part; 256 - 12 = 244 keeps the 143-token prompt.
    ({"run.method": "grpo", "rollout.engine": "hf", "rollout.vllm.max_model_len": 64}, None),
    # The teacher scores prompt + response: its 128 positions bind, 128 - 12 = 116.
    ({"run.method": "kdrl", "rollout.engine": "hf", "teacher.engine": "hf", "teacher.name_or_path": "SHORT"},
     "116 tokens (the teacher's context of 128 tokens minus rollout.max_new_tokens 12)"),
    # The teacher's vLLM engine, when it may be one: 64 - 12 = 52.
    ({"run.method": "kdrl", "rollout.engine": "hf", "teacher.vllm.max_model_len": 64},
     "52 tokens (teacher.vllm.max_model_len 64 minus rollout.max_new_tokens 12)"),
    # No teacher loaded (grpo): its short context is not a limit.
    ({"run.method": "grpo", "rollout.engine": "hf", "teacher.name_or_path": "SHORT", "teacher.vllm.max_model_len": 64},
     None),
])
def test_training_prompts_fit_the_engines_and_the_teacher(settings, dropped_because, medium_question_file,
                                                          short_context_teacher, tiny_model_dir, tmp_path, caplog):
    from kdrl.config import load_config
    from kdrl.workers import load_run

    overrides = {"model.name_or_path": str(tiny_model_dir / "student"),
                 "teacher.name_or_path": str(tiny_model_dir / "teacher"),
                 "data.source": str(medium_question_file), "data.question_field": "problem",
                 "data.answer_field": "solution", "data.num_train": 3, "data.num_heldout": 1,
                 "rollout.prompts_per_step": 1, "rollout.max_new_tokens": 12,
                 "run.runs_dir": str(tmp_path / "runs"), "run.cache_dir": str(tmp_path / "cache"), **settings}
    if overrides["teacher.name_or_path"] == "SHORT":
        overrides["teacher.name_or_path"] = str(short_context_teacher)
    cfg = load_config(overrides=[f"{k}={v}" for k, v in overrides.items()])
    with caplog.at_level(logging.WARNING, logger="kdrl.data"):
        load_run(cfg, tmp_path / "runs" / "fit", log=lambda _: None).close()
    questions = read_table(RunPaths(tmp_path / "runs" / "fit").prompts, table="prompts")["question"].to_list()
    if dropped_because is None:
        assert "longer than" not in caplog.text
    else:
        assert sorted(questions) == ["12+9=", "3+4=", "40+2=", "7+7="]
        assert f"1 prompt(s) longer than {dropped_because} dropped: rows 2" in caplog.text


def test_kdrl_eval_prompts_fit_its_vllm_max_model_len(medium_question_file, tiny_model_dir, tmp_path, caplog):
    flags = ["data.question_field=problem", "data.answer_field=solution", "run.eval_samples=1",
             "run.eval_temperature=0", "rollout.max_new_tokens=4"]

    def evaluated(*more):
        cfg = build_eval_config(str(tiny_model_dir / "student"), str(medium_question_file), flags + list(more))
        out = run_eval(cfg, tmp_path / cfg.hash(), log=lambda _: None)
        return read_table(out.samples, table="evaluations").height

    # engine auto may be vLLM (it resolves to hf here): 64 - 4 = 60 tokens leaves out the 143-token prompt.
    with caplog.at_level(logging.WARNING, logger="kdrl.data"):
        assert evaluated("rollout.vllm.max_model_len=64") == 4
    assert ("1 prompt(s) longer than 60 tokens (rollout.vllm.max_model_len 64 minus rollout.max_new_tokens 4) "
            "dropped: rows 2") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdrl.data"):
        # HF decodes: only the model's 256 positions count
        assert evaluated("rollout.vllm.max_model_len=64", "rollout.engine=hf") == 5
    assert "longer than" not in caplog.text


# gold answers that are not numbers


def test_non_numeric_gold_answers_are_counted_once(tmp_path, tiny_tokenizer, caplog):
    rows = _gsm8k_rows(16)
    numeric = ["#### 1,234", "#### -3.5", "#### 3/4", r"\boxed{\frac{1}{2}}", "#### $12$", "#### 50%"]
    for i, solution in enumerate(numeric):
        rows[i]["solution"] = solution
    rows[9]["solution"], rows[12]["solution"] = "#### banana", "yes"
    path = _write(rows, tmp_path / "gsm.jsonl")
    with caplog.at_level(logging.WARNING, logger="kdrl.data"):
        build_prompts(_local_cfg(path), tiny_tokenizer)
    warnings = [r.getMessage() for r in caplog.records if "not numbers" in r.getMessage()]
    assert len(warnings) == 1
    assert re.search(r"gsm\.jsonl: 2 of 16 gold answers are not numbers "
                     r"\(rows (9, 12|12, 9); row \d+: '(#### banana|yes)'\)", warnings[0])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdrl.data"):
        build_prompts(_local_cfg(_write(_gsm8k_rows(16), tmp_path / "ok.jsonl")), tiny_tokenizer)
    assert "not numbers" not in caplog.text
