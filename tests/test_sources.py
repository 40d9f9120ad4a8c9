"""Generated sources (data.source "reasoning-gym:<task>"): the columns, rows that are a pure function
of the seed and the row index, gold answers the reward scores correct, and the errors a user meets."""

from __future__ import annotations

import sys

import pytest

from kdrl.config import DataConfig
from kdrl.data import DatasetError, build_prompts, load_source
from kdrl.rewards import answers_match, reference_answer, score_batch
from kdrl.sources import reasoning_gym_rows, rows_to_make

GSM = "reasoning-gym:gsm_symbolic"


def test_gsm_symbolic_rows_have_question_answer_and_worked_answer():
    cfg = DataConfig(source=GSM, num_train=20, num_heldout=5, seed=3)
    ds = load_source(cfg)
    assert ds.column_names == ["question", "answer", "answer_cot"]
    assert len(ds) == rows_to_make(25) == 41  # 25 + the margin of 16 for dropped rows
    row = ds[0]
    assert row["question"].endswith("Give the result as your final answer. Do not include units.")
    assert float(row["answer"]) == float(reference_answer(row["answer"]))  # the bare number
    assert row["answer_cot"].rstrip().rsplit("####", 1)[1].strip()  # a worked answer ending in #### N


def test_rows_depend_only_on_the_seed_and_the_row_index():
    a = reasoning_gym_rows("gsm_symbolic", size=12, seed=5)
    assert reasoning_gym_rows("gsm_symbolic", size=12, seed=5).to_dict() == a.to_dict()
    longer = reasoning_gym_rows("gsm_symbolic", size=30, seed=5)
    assert longer.select(range(12)).to_dict() == a.to_dict()  # more rows only append
    other = reasoning_gym_rows("gsm_symbolic", size=12, seed=6)
    assert sum(q1 == q2 for q1, q2 in zip(a["question"], other["question"])) == 0


def test_growing_num_train_keeps_the_held_out_prompts(tiny_tokenizer):
    """The generated rows are taken in order (not shuffled like a file's), held-out first: a
    larger num_train appends training prompts and moves no held-out one into training."""
    small = build_prompts(DataConfig(source=GSM, num_train=10, num_heldout=6), tiny_tokenizer)
    large = build_prompts(DataConfig(source=GSM, num_train=40, num_heldout=6), tiny_tokenizer)
    held = lambda p: p.filter(split="heldout")["question"].to_list()
    assert held(small) == held(large)
    assert large.filter(split="train")["question"].to_list()[:10] == small.filter(split="train")["question"].to_list()
    assert held(small) == load_source(DataConfig(source=GSM, num_train=10, num_heldout=6))["question"][:6]


def test_gold_answers_score_correct_against_themselves():
    ds = reasoning_gym_rows("gsm_symbolic", size=200, seed=0)
    golds = [reference_answer(a) for a in ds["answer"]]
    # the bare answer, and the worked answer as a response (its "#### N" read by the reward)
    assert all(answers_match(g, g) for g in golds)
    scored = score_batch(ds["answer_cot"], golds, ["stop"] * len(golds))
    assert [reward for _, reward in scored] == [1.0] * len(golds)


def test_the_worked_answer_can_be_the_answer_field(tiny_tokenizer):
    cfg = DataConfig(source=GSM, num_train=4, num_heldout=2, answer_field="answer_cot")
    prompts = build_prompts(cfg, tiny_tokenizer)
    ds = load_source(cfg)
    assert prompts["answer"].to_list() == [reference_answer(cot) for cot in ds["answer_cot"][:6]]  # read after ####
    assert all(answers_match(gold, answer) for gold, answer in zip(prompts["answer"], ds["answer"][:6]))


def test_an_unknown_task_is_refused_with_did_you_mean():
    with pytest.raises(DatasetError,
                       match=r"data.source 'reasoning-gym:gsm_symbolik'.*did you mean reasoning-gym:gsm_symbolic\?"):
        load_source(DataConfig(source="reasoning-gym:gsm_symbolik"))
    with pytest.raises(DatasetError, match=r"no task 'zzz'; e\.g\. reasoning-gym:gsm_symbolic"):
        load_source(DataConfig(source="reasoning-gym:zzz"))


def test_a_missing_reasoning_gym_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # what `import reasoning_gym` sees when absent
    with pytest.raises(DatasetError, match=r"data.source 'reasoning-gym:gsm_symbolic' needs the reasoning_gym package"
                                           r".*pip install reasoning-gym"):
        load_source(DataConfig(source=GSM))


def test_loading_a_generated_source_leaves_pythons_random_as_it_was():
    """`import reasoning_gym` draws from the global `random` (first import in a process); a run's
    checkpoints store that state, so loading the source must not move it. Run in a fresh process,
    where the import really happens."""
    import subprocess
    import sys

    script = ("import random\nfrom kdrl.config import DataConfig\nfrom kdrl.sources import load_generated\n"
              "random.seed(7); before = random.getstate()\n"
              "load_generated(DataConfig(source='reasoning-gym:gsm_symbolic', num_train=3, num_heldout=1))\n"
              "print(random.getstate() == before)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "True"
