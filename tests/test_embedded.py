"""The embedded warm start: validation problems apart from train and held-out, the best evaluated
weights kept, an early stop at the target, progress logged by the clock, a cache key that only
the settings shaping the models change."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from kdrl import embedded as E
from kdrl.config import load_config
from kdrl.data import build_prompts

SMALL = ["data.num_train=24", "data.num_heldout=4", "data.max_digits=2", "embedded.num_validation=16"]


def _pairs(cfg, tokenizer):
    return E._training_pairs(cfg, tokenizer)


def test_validation_problems_are_disjoint_from_train_and_heldout(tiny_tokenizer):
    cfg = load_config(None, SMALL)
    prompts = build_prompts(cfg.data, tiny_tokenizer)
    ids, golds = E.validation_problems(cfg, tiny_tokenizer)
    assert len(ids) == len(golds) == 16
    seen = {tuple(p) for p in prompts["prompt_token_ids"].to_list()}
    assert not seen & {tuple(p) for p in ids}
    # the same problems every time, and they follow from the generator (answers are the sums)
    again, _ = E.validation_problems(cfg, tiny_tokenizer)
    assert again == ids
    first = tiny_tokenizer.decode(ids[0], skip_special_tokens=True)
    a, b = (int(x) for x in first.rstrip("=").split("+"))
    assert golds[0] == str(a + b)


def _scripted(accuracies):
    calls = iter(accuracies)
    return lambda: next(calls)


def test_the_best_evaluated_weights_are_kept_not_the_last(tiny_student, tiny_tokenizer):
    cfg = load_config(None, SMALL)
    model = copy.deepcopy(tiny_student)
    snapshots = {}
    accuracies = iter([0.2, 0.6, 0.4])

    def evaluate():
        snapshots[len(snapshots) + 1] = {k: v.clone() for k, v in model.state_dict().items()}
        return next(accuracies)

    result = E.sft_warm_start(model, _pairs(cfg, tiny_tokenizer), steps=3, batch_size=4, lr=1e-2, seed=0,
                              pad_token_id=tiny_tokenizer.pad_token_id, schedule="cosine", evaluate=evaluate,
                              eval_every=1)
    assert result.evaluations == [(1, 0.2), (2, 0.6), (3, 0.4)]
    assert (result.kept_step, result.best_accuracy, result.stopped_early) == (2, 0.6, False)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, snapshots[2][name]), name
    assert not torch.equal(snapshots[2]["lm_head.weight"], snapshots[3]["lm_head.weight"])


def test_training_stops_at_the_first_evaluation_reaching_the_target(tiny_student, tiny_tokenizer):
    cfg = load_config(None, SMALL)
    result = E.sft_warm_start(copy.deepcopy(tiny_student), _pairs(cfg, tiny_tokenizer), steps=50, batch_size=4,
                              lr=1e-3, seed=0, pad_token_id=tiny_tokenizer.pad_token_id,
                              evaluate=_scripted([0.5, 0.91, 0.99]), eval_every=2, target=0.9)
    assert result.evaluations == [(2, 0.5), (4, 0.91)]
    assert result.kept_step == 4 and result.stopped_early


def test_progress_is_logged_by_the_clock_without_a_tty(tiny_student, tiny_tokenizer):
    cfg = load_config(None, SMALL)
    lines, ticks = [], []
    E.sft_warm_start(copy.deepcopy(tiny_student), _pairs(cfg, tiny_tokenizer), steps=4, batch_size=4, lr=1e-3, seed=0,
                     pad_token_id=tiny_tokenizer.pad_token_id, log=lines.append, log_every_s=0.0,
                     progress=lambda done, total: ticks.append((done, total)))
    assert ticks == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [line.split()[2] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    quiet = []
    E.sft_warm_start(copy.deepcopy(tiny_student), _pairs(cfg, tiny_tokenizer), steps=4, batch_size=4, lr=1e-3, seed=0,
                     pad_token_id=tiny_tokenizer.pad_token_id, log=quiet.append, log_every_s=3600.0)
    assert quiet == []


def test_the_cosine_schedule_decays_towards_zero_after_warmup():
    factors = [E._lr_factor(s, warmup=10, total=100, schedule="cosine") for s in range(100)]
    assert factors[0] == 0.1 and factors[9] == factors[10] == 1.0 and 0 < factors[-1] < 0.01
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))


def test_only_settings_that_shape_the_models_change_the_cache_key():
    key = E.cache_key(load_config())
    for same in (["run.steps=5"], ["run.method=grpo"], ["loss.beta_init=0.02"], ["embedded.log_every_s=1"],
                 ["rollout.temperature=0.7"], ["data.question_field=q"], ["run.seed=3"]):
        assert E.cache_key(load_config(None, same)) == key, same
    for other in (["data.seed=1"], ["data.num_train=1000"], ["embedded.teacher_steps=900"], ["embedded.seed=1"],
                  ["embedded.teacher_target=0.95"], ["rollout.max_new_tokens=40"]):
        assert E.cache_key(load_config(None, other)) != key, other


@pytest.mark.slow
def test_a_teacher_below_its_target_is_kept_with_a_warning_and_a_record(tmp_path):
    cfg = load_config(None, [*SMALL, "embedded.teacher_steps=4", "embedded.eval_every=2",
                             "embedded.teacher_target=0.99", "rollout.max_new_tokens=12", f"run.cache_dir={tmp_path}"])
    lines = []
    assert E.missing_embedded_models(cfg) == ["student", "teacher"]
    path = E.resolve_model_path("embedded:teacher", cfg, log=lines.append)
    assert E.missing_embedded_models(cfg) == ["student"]
    grpo = load_config(None, [*SMALL, "run.method=grpo", f"run.cache_dir={tmp_path}/other"])
    assert E.missing_embedded_models(grpo) == ["student"]  # GRPO never loads the teacher
    record = json.loads((E.embedded_dir(cfg) / "teacher" / "warm_start.json").read_text())
    assert path == str(E.embedded_dir(cfg) / "teacher")
    assert record["target"] == 0.99 and [step for step, _ in record["validation"]] == [2, 4]
    warning = [line for line in lines if "WARNING" in line]
    assert len(warning) == 1
    assert "embedded.teacher_target=0.99" in warning[0] and "embedded.teacher_steps=4" in warning[0]


def test_length_grouped_micro_batches_give_the_one_batch_gradient(tiny_student, tiny_tokenizer):
    """The warm start runs a batch as LENGTH_GROUPS micro-batches of rows of similar length, with
    the loss summed over the batch's completion tokens and divided by their count: the gradient
    and the loss are those of the whole batch padded to its longest row."""
    import random

    cfg = load_config(None, SMALL)
    batch = random.Random(0).sample(_pairs(cfg, tiny_tokenizer), 12)
    assert len({len(p) + len(c) for p, c in batch}) > 1  # rows of different lengths: padding differs
    pad = tiny_tokenizer.pad_token_id

    def gradients(groups: int):
        model = copy.deepcopy(tiny_student).train()
        tokens, total = sum(len(c) for _, c in batch), 0.0
        for group in E.length_groups(batch, groups):
            ids, mask, labels = E._padded(group, pad)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=tokens).loss
            loss.backward()
            total += float(loss.detach())
        return total, {name: p.grad for name, p in model.named_parameters()}

    whole = copy.deepcopy(tiny_student).train()
    ids, mask, labels = E._padded(batch, pad)
    loss = whole(input_ids=ids, attention_mask=mask, labels=labels).loss  # HF's own mean over label tokens
    loss.backward()
    for groups in (1, E.LENGTH_GROUPS, 5):
        total, grads = gradients(groups)
        assert total == pytest.approx(float(loss.detach()), rel=1e-6), groups
        for name, p in whole.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=f"{name}, {groups} groups")
    sizes = [len(g) for g in E.length_groups(batch, 5)]
    assert sizes == [3, 3, 2, 2, 2]
