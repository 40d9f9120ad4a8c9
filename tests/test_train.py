"""The update: padding layout, trainer log-probs vs the sampler's, micro-batch invariance on a
real model, the direction of GRPO and KD updates, and checkpoints that resume exactly."""

import copy
import math

import polars as pl
import pytest
import torch

from kdrl.batching import collate, join_step_tables
from kdrl.config import LossConfig, OptimConfig
from kdrl.engines.hf import HFRolloutEngine, HFTeacherScorer
from kdrl.stages import generate_rollouts, score_teacher
from kdrl.train import (
    build_optimizer,
    completion_logprobs_BT,
    load_trainer_state,
    save_checkpoint,
    update_step,
)


def test_collate_layout(step_tables, tiny_tokenizer):
    rollouts, rewards, teacher = step_tables
    batch = collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=tiny_tokenizer.pad_token_id)
    B, T = batch.completion_ids_BT.shape
    W = batch.input_ids_BS.shape[1] - T
    assert B == 12 and batch.rewards_PG.shape == (3, 4)
    for row, (prompt, completion) in enumerate(zip(rollouts["prompt_token_ids"], rollouts["completion_token_ids"])):
        prompt, completion = prompt.to_list(), completion.to_list()
        # prompt right-aligned at column W, completion starting at column W
        assert batch.input_ids_BS[row, W - len(prompt) : W].tolist() == prompt
        assert batch.input_ids_BS[row, W : W + len(completion)].tolist() == completion
        assert batch.completion_mask_BT[row].sum().item() == len(completion)
        # positions count real tokens: the first completion token sits at position len(prompt)
        assert batch.position_ids_BS[row, W].item() == len(prompt)
    with pytest.raises(ValueError, match="same number of samples"):
        collate(join_step_tables(rollouts.head(11), rewards.head(11), None), pad_token_id=0)
    with pytest.raises(ValueError, match="lacks 1 rollouts"):
        join_step_tables(rollouts, rewards.head(11), None)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trainer_logprobs_equal_the_samplers(tiny_tokenizer, tiny_student, tiny_prompts, rewards_for, temperature):
    engine = HFRolloutEngine(tiny_student, tiny_tokenizer)
    rollouts = generate_rollouts(engine, tiny_prompts, step=0, n=3, max_new_tokens=10, seed=1, temperature=temperature)
    batch = collate(join_step_tables(rollouts, rewards_for(rollouts, [0.0] * 9), None), pad_token_id=0)
    with torch.no_grad():
        logp_BT, _ = completion_logprobs_BT(tiny_student, batch, temperature=temperature)
    diff = (logp_BT - batch.sampler_logp_BT).abs() * batch.completion_mask_BT
    assert diff.max().item() < 1e-5


def test_chunked_logprobs_match_unchunked_values_and_gradients(step_tables, tiny_tokenizer, tiny_student):
    rollouts, rewards, teacher = step_tables
    batch = collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=0)
    model = copy.deepcopy(tiny_student)
    grads = []
    for chunk in (5, 100_000, None):  # None: decided from the shapes (all rows at once here)
        model.zero_grad()
        logp_BT, _ = completion_logprobs_BT(model, batch, chunk_tokens=chunk)
        (logp_BT * batch.completion_mask_BT).sum().backward()
        grads.append((logp_BT.detach(), model.lm_head.weight.grad.clone(),
                      model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    for a, b, c in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)


def test_the_lm_head_is_checkpointed_only_where_its_logits_would_be_large(step_tables, tiny_student, monkeypatch):
    """Activation checkpointing of the LM head costs its matmul again in the backward: it runs
    only where the float32 logits of a pass exceed `kdrl.memory.UNCHUNKED_LOGITS_BYTES`, and
    only with gradients."""
    import kdrl.memory
    import kdrl.train

    rollouts, rewards, teacher = step_tables
    batch = collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=0)
    calls = []
    real = kdrl.train.checkpoint
    monkeypatch.setattr(kdrl.train, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    completion_logprobs_BT(tiny_student, batch)
    assert calls == []  # a 256-entry vocabulary: kilobytes of logits
    monkeypatch.setattr(kdrl.memory, "UNCHUNKED_LOGITS_BYTES", 0)
    completion_logprobs_BT(tiny_student, batch)
    assert calls == []  # one chunk of LOGPROB_CHUNK_TOKENS rows holds this small batch: its logits are the peak
    monkeypatch.setattr(kdrl.memory, "LOGPROB_CHUNK_TOKENS", 16)
    chunks = -(-batch.completion_ids_BT.numel() // 16)
    completion_logprobs_BT(tiny_student, batch)
    assert len(calls) == chunks > 1
    with torch.no_grad():
        completion_logprobs_BT(tiny_student, batch)
    assert len(calls) == chunks


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_update_reports_the_policys_entropy_on_the_sampled_positions(step_tables, tiny_student, temperature):
    """entropy = mean over completion tokens of −Σ_v p log p of softmax(logits / T), before the
    update: the same number from the model's full logits, computed here directly."""
    rollouts, rewards, teacher = step_tables
    batch = collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=0)
    model = copy.deepcopy(tiny_student)
    T = batch.completion_ids_BT.shape[1]
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids_BS, attention_mask=batch.attention_mask_BS,
                       position_ids=batch.position_ids_BS).logits[:, -T - 1:-1].double() / temperature
        h_BT = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    mask = batch.completion_mask_BT
    expected = float((h_BT * mask).sum() / mask.sum())
    optim_cfg = OptimConfig(lr=1e-3, micro_batch_size=5)
    optimizer, scheduler = build_optimizer(model, optim_cfg, total_steps=10)
    result = update_step(model, optimizer, scheduler, batch, loss_cfg=LossConfig(beta_init=0.5, ppo_epochs=2),
                         optim_cfg=optim_cfg, optimizer_step=0, temperature=temperature)
    assert result.metrics["entropy"] == pytest.approx(expected, rel=1e-5)
    assert 0 < expected < math.log(model.config.vocab_size)
    # and the update's model FLOPs: 6·N per trained token (prompt + completion), per PPO epoch
    from kdrl.perf import matmul_params

    n = sum(p.numel() for name, p in model.named_parameters() if "proj" in name or "lm_head" in name)
    assert matmul_params(model) == n
    assert result.metrics["model_flops"] == 6 * n * int(batch.attention_mask_BS.sum()) * 2


def _one_update(model, batch, *, micro, loss_cfg=None, lr=1e-3):
    optim_cfg = OptimConfig(lr=lr, micro_batch_size=micro)
    optimizer, scheduler = build_optimizer(model, optim_cfg, total_steps=10)
    return update_step(model, optimizer, scheduler, batch, loss_cfg=loss_cfg or LossConfig(beta_init=0.5),
                       optim_cfg=optim_cfg, optimizer_step=0)


# (rows per micro-batch, token budget, gradient checkpointing): every split of the 12 rows, with
# or without recomputed activations, must give the same update as one pass over all of them.
SPLITS = [(64, 0, False), (5, 0, False), (64, 40, False), (64, 1, False), (3, 60, True), (64, 0, True)]


def test_update_is_invariant_to_micro_batching_and_checkpointing(step_tables, tiny_student):
    from kdrl.batching import micro_batches

    rollouts, rewards, teacher = step_tables
    batch = collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=0)
    T = batch.completion_ids_BT.shape[1]
    prompt_lens, completion_lens = (batch.attention_mask_BS[:, :-T].sum(1).tolist(),
                                    batch.completion_mask_BT.sum(1).int().tolist())
    results, models, splits = [], [], []
    for rows, budget, checkpointing in SPLITS:
        splits.append(micro_batches(prompt_lens, completion_lens, max_rows=rows, max_tokens=budget))
        # plain SGD with lr 1: the weight change *is* the (clipped) gradient. (Adam's first step is
        # ≈ lr·sign(g), which turns float-rounding noise on near-zero gradients into ±lr.)
        model = copy.deepcopy(tiny_student)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)
        optim_cfg = OptimConfig(micro_batch_size=rows, max_tokens_per_microbatch=budget, grad_clip=0.0)
        results.append(update_step(model, sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda _: 1.0), batch,
                                   loss_cfg=LossConfig(beta_init=0.5), optim_cfg=optim_cfg, optimizer_step=0))
        models.append(model)
    # the splits really differ: one pass, 3 by rows, several by tokens, one row each
    assert [len(b) for b in splits[:4]] == [1, 3, len(splits[2]), 12] and 3 < len(splits[2]) < 12
    for rows_tokens in splits[2]:  # each micro-batch within the budget once trimmed, unless a row alone exceeds it
        start, stop = rows_tokens
        width = max(prompt_lens[start:stop]) + max(completion_lens[start:stop])
        assert (stop - start) * width <= 40 or stop - start == 1
    for result, model in zip(results[1:], models[1:]):
        for key in ("loss", "pg_loss", "kd_loss", "grad_norm", "kl_k1_mean", "entropy"):
            assert result.metrics[key] == pytest.approx(results[0].metrics[key], rel=1e-5, abs=1e-7)
        mask = batch.completion_mask_BT  # padding positions hold no value (0 where a micro-batch was trimmed)
        assert torch.allclose(result.student_logp_BT * mask, results[0].student_logp_BT * mask, atol=1e-6)
        assert torch.allclose(result.kd_per_token_BT * mask, results[0].kd_per_token_BT * mask, atol=1e-6)
        for pa, pb in zip(models[0].parameters(), model.parameters()):
            assert torch.allclose(pa, pb, atol=1e-6)
    assert results[0].metrics["grad_norm"] > 1e-3


def test_micro_batches_take_the_rows_sorted_by_length_where_that_saves_padding(step_tables, tiny_student):
    """The update's micro-batches follow `micro_batch_plan`: over the rows sorted by length
    when that means fewer padded tokens through the model than the batch order (the update is
    the same either way: previous test)."""
    from kdrl.batching import micro_batch_plan, micro_batches

    rollouts, rewards, teacher = step_tables
    batch = collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=0)
    T = batch.completion_ids_BT.shape[1]
    p, c = batch.attention_mask_BS[:, :-T].sum(1).tolist(), batch.completion_mask_BT.sum(1).int().tolist()
    for micro in (2, 3, 4, 5):
        model = copy.deepcopy(tiny_student)
        shapes = []
        model.model.register_forward_hook(
            lambda m, args, kwargs, out: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
        _one_update(model, batch, micro=micro)
        order, bounds = micro_batch_plan(p, c, max_rows=micro)
        order = order or list(range(len(p)))
        P, C = [p[r] for r in order], [c[r] for r in order]
        assert shapes == [(b - a, max(P[a:b]) + max(C[a:b])) for a, b in bounds]
        plain = sum((b - a) * (max(p[a:b]) + max(c[a:b])) for a, b in micro_batches(p, c, max_rows=micro))
        assert sum(r * w for r, w in shapes) <= plain
    assert micro_batch_plan(p, c, max_rows=2)[0] is not None  # some split of these rows is sorted


def test_sorted_micro_batches_over_two_ppo_epochs_match_one_pass(step_tables, tiny_student):
    """Epoch 2 reads epoch 1's log-probs (the PPO ratio's denominator) by micro-batch position:
    with rows sorted by length they must still be each row's own."""
    from kdrl.batching import micro_batch_plan

    rollouts, rewards, teacher = step_tables
    batch = collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=0)
    T = batch.completion_ids_BT.shape[1]
    p, c = batch.attention_mask_BS[:, :-T].sum(1).tolist(), batch.completion_mask_BT.sum(1).int().tolist()
    assert micro_batch_plan(p, c, max_rows=2)[0] is not None  # the split below is sorted
    results, models = [], []
    for rows in (64, 2):
        model = copy.deepcopy(tiny_student)
        sgd = torch.optim.SGD(model.parameters(), lr=0.5)
        optim_cfg = OptimConfig(micro_batch_size=rows, grad_clip=0.0)
        results.append(update_step(model, sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda _: 1.0), batch,
                                   loss_cfg=LossConfig(beta_init=0.5, ppo_epochs=2), optim_cfg=optim_cfg,
                                   optimizer_step=0))
        models.append(model)
    for key in ("loss", "pg_loss", "kd_loss", "grad_norm"):
        assert results[1].metrics[key] == pytest.approx(results[0].metrics[key], rel=1e-5, abs=1e-7)
    mask = batch.completion_mask_BT
    assert torch.allclose(results[1].student_logp_BT * mask, results[0].student_logp_BT * mask, atol=1e-6)
    for pa, pb in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_on_a_cpu_a_micro_batch_holds_at_most_the_cpu_token_budget(step_tables, tiny_student, monkeypatch):
    """kdrl.perf.pass_token_budget: on a CPU every micro-batch stays within CPU_TOKENS_PER_PASS
    padded tokens (a row alone may exceed it), whatever optim.micro_batch_size allows."""
    import kdrl.perf

    rollouts, rewards, teacher = step_tables
    batch = collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=0)
    monkeypatch.setattr(kdrl.perf, "CPU_TOKENS_PER_PASS", 60)
    model = copy.deepcopy(tiny_student)
    shapes = []
    model.model.register_forward_hook(lambda m, args, kwargs, out: shapes.append(tuple(kwargs["input_ids"].shape)),
                                      with_kwargs=True)
    _one_update(model, batch, micro=64)
    assert len(shapes) > 1 and sum(rows for rows, _ in shapes) == batch.num_rows
    assert all(rows * width <= 60 or rows == 1 for rows, width in shapes)


def test_gradient_checkpointing_recomputes_the_layers_in_the_backward_pass(step_tables, tiny_student):
    """With model.gradient_checkpointing each decoder layer runs forward twice per micro-batch
    (once more in backward): activations are recomputed, not kept."""
    rollouts, rewards, teacher = step_tables
    batch = collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=0)
    calls = {}
    for checkpointing in (False, True):
        model = copy.deepcopy(tiny_student)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        count = [0]
        # a pre-hook: the recomputation stops early, once the saved tensors are rebuilt, before forward hooks
        model.model.layers[1].register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        _one_update(model, batch, micro=64)
        calls[checkpointing] = count[0]
    assert calls == {False: 1, True: 2}


def test_grpo_raises_the_rewarded_samples(step_tables, tiny_student):
    rollouts, rewards, _ = step_tables
    batch = collate(join_step_tables(rollouts, rewards, None), pad_token_id=0)
    model = copy.deepcopy(tiny_student)
    with torch.no_grad():
        before_BT, _ = completion_logprobs_BT(model, batch)
    _one_update(model, batch, micro=64, loss_cfg=LossConfig(beta_init=0.0), lr=1e-2)
    with torch.no_grad():
        after_BT, _ = completion_logprobs_BT(model, batch)
    seq_gain_B = ((after_BT - before_BT) * batch.completion_mask_BT).sum(dim=1)
    rewarded = batch.rewards_PG.reshape(-1) > 0
    mixed_group = batch.rewards_PG.reshape(-1).view(3, 4).std(dim=1).repeat_interleave(4) > 0
    # in groups with mixed rewards, every rewarded sample becomes likelier than every unrewarded one
    assert seq_gain_B[rewarded & mixed_group].min() > seq_gain_B[~rewarded & mixed_group].max()


def test_pure_kd_moves_the_student_towards_the_teacher(step_tables, tiny_student):
    rollouts, rewards, teacher = step_tables
    batch = collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=0)
    model = copy.deepcopy(tiny_student)
    cfg = LossConfig(pg_coef=0.0, beta_init=1.0)
    optim_cfg = OptimConfig(lr=3e-3)
    optimizer, scheduler = build_optimizer(model, optim_cfg, total_steps=10)
    kls = [update_step(model, optimizer, scheduler, batch, loss_cfg=cfg, optim_cfg=optim_cfg,
                       optimizer_step=s).metrics["kd_loss"] for s in range(5)]
    assert kls[-1] < 0.5 * kls[0]


def test_fully_kd_masked_grpo_free_batch_leaves_weights_unchanged(step_tables, tiny_student, rewards_for):
    rollouts, _, teacher = step_tables
    rewards = rewards_for(rollouts, [1.0] * 12)  # all right: zero advantages, response mask drops all KD
    batch = collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=0)
    model = copy.deepcopy(tiny_student)
    result = _one_update(model, batch, micro=64, loss_cfg=LossConfig(beta_init=0.5, kd_mask="response"))
    assert result.metrics["loss"] == 0.0 and result.metrics["grad_norm"] == 0.0
    for p, q in zip(model.parameters(), tiny_student.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_round_trip_restores_everything(tmp_path, step_tables, tiny_tokenizer, tiny_student):
    rollouts, rewards, teacher = step_tables
    batch = collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=0)
    optim_cfg, loss_cfg = OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=1), LossConfig(beta_init=0.1)

    def fresh():
        model = copy.deepcopy(tiny_student)
        return (model, *build_optimizer(model, optim_cfg, total_steps=5))

    model, opt, sched = fresh()
    update_step(model, opt, sched, batch, loss_cfg=loss_cfg, optim_cfg=optim_cfg, optimizer_step=0)
    save_checkpoint(tmp_path / "ckpt", model=model, tokenizer=tiny_tokenizer, optimizer=opt, scheduler=sched, step=0,
                    optimizer_step=1)
    expected = update_step(model, opt, sched, batch, loss_cfg=loss_cfg, optim_cfg=optim_cfg, optimizer_step=1)
    torch.manual_seed(123)  # scramble the global RNG: the checkpoint must restore it

    model2, opt2, sched2 = fresh()
    state = load_trainer_state(tmp_path / "ckpt", model=model2, optimizer=opt2, scheduler=sched2)
    assert state == {"step": 0, "optimizer_step": 1}
    got = update_step(model2, opt2, sched2, batch, loss_cfg=loss_cfg, optim_cfg=optim_cfg, optimizer_step=1)
    assert got.metrics == expected.metrics
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.slow
def test_resumed_run_is_bit_identical(tmp_path, tiny_run_config, embedded_cache):
    import shutil

    from flows.train import train_without_prefect
    from kdrl.storage import RunPaths

    cfg = tiny_run_config(tmp_path, **{"run.cache_dir": embedded_cache})
    straight = tmp_path / "runs" / "straight"
    train_without_prefect(cfg, straight)
    resumed = tmp_path / "runs" / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "iter_00002")  # as if killed during step 2
    train_without_prefect(cfg, resumed)

    a, b = RunPaths(straight), RunPaths(resumed)
    for table in ("rollouts", "advantages", "metrics"):
        fa, fb = pl.read_parquet(getattr(a, table)(2)), pl.read_parquet(getattr(b, table)(2))
        timing = [c for c in fa.columns if c.startswith("time_") or c in ("tokens_per_s", "run_id")]  # other folder
        assert fa.drop(timing).equals(fb.drop(timing)), table
    wa = (a.checkpoint(2) / "model" / "model.safetensors").read_bytes()
    wb = (b.checkpoint(2) / "model" / "model.safetensors").read_bytes()
    assert wa == wb
    metrics = pl.scan_parquet(str(straight / "iter_*" / "metrics.parquet")).collect()
    assert metrics["step"].to_list() == [0, 1, 2]
    assert metrics["beta"].to_list() == pytest.approx([5e-3, 5e-3 - 5e-5, 5e-3 - 1e-4])


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "topk"])
def test_every_estimator_runs_through_the_update(estimator, tiny_tokenizer, tiny_student, tiny_teacher, tiny_prompts,
                                                 rewards_for):
    from kdrl.losses import reverse_kl_k1_BT, reverse_kl_k2_BT, reverse_kl_k3_BT, reverse_kl_topk_BT

    engine = HFRolloutEngine(tiny_student, tiny_tokenizer)
    rollouts = generate_rollouts(engine, tiny_prompts, step=0, n=2, max_new_tokens=8, seed=5)
    rewards = rewards_for(rollouts, [0.0] * 6)
    teacher = score_teacher(HFTeacherScorer(tiny_teacher, tiny_tokenizer), rollouts, pl.Series([True] * 6), top_k=4)
    batch = collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=0)
    model = copy.deepcopy(tiny_student)
    with torch.no_grad():
        logp_BT, topk_logp_BTK = completion_logprobs_BT(model, batch, topk_ids_BTK=batch.teacher_topk_ids_BTK)
    mask_BT, n = batch.completion_mask_BT, batch.completion_mask_BT.sum()
    direct = {
        "k1": reverse_kl_k1_BT(logp_BT, batch.teacher_logp_BT),
        "k2": reverse_kl_k2_BT(logp_BT, batch.teacher_logp_BT),
        "k3": reverse_kl_k3_BT(logp_BT, batch.teacher_logp_BT),
        "topk": reverse_kl_topk_BT(topk_logp_BTK, batch.teacher_topk_logp_BTK),
    }[estimator]
    result = _one_update(model, batch, micro=4, loss_cfg=LossConfig(kl_estimator=estimator, beta_init=0.1))
    # rewards all 0 → advantages 0: the loss is the KD term alone (k1 lives in the advantage instead)
    expected_kd = 0.0 if estimator == "k1" else float((direct * mask_BT).sum() / n)
    assert result.metrics["kd_loss"] == pytest.approx(expected_kd, rel=1e-5)
    assert torch.allclose(result.kd_per_token_BT * mask_BT, direct * mask_BT, atol=1e-6)
    assert result.metrics["grad_norm"] > 0
    if estimator == "k1":  # β·k1 as a per-token advantage: pg loss = β Σ k1 / N (ρ = 1)
        assert result.metrics["pg_loss"] == pytest.approx(0.1 * float((direct * mask_BT).sum() / n), rel=1e-5)


def test_trimmed_micro_batch_keeps_every_real_token_and_drops_shared_padding(step_tables):
    rollouts, rewards, teacher = step_tables
    batch = collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=0)
    T = batch.completion_ids_BT.shape[1]
    W = batch.input_ids_BS.shape[1] - T
    lengths = batch.completion_mask_BT.sum(1).int()
    rows = int(lengths.argmin())  # the shortest completion, alone
    mb = batch.rows(rows, rows + 1).trimmed()
    n, p = int(lengths[rows]), int(batch.attention_mask_BS[rows, :W].sum())
    assert mb.completion_ids_BT.shape == (1, n) and mb.input_ids_BS.shape == (1, p + n)
    assert mb.attention_mask_BS.all()  # nothing but real tokens left
    assert torch.equal(mb.input_ids_BS[0], batch.input_ids_BS[rows, W - p : W + n])
    assert torch.equal(mb.position_ids_BS[0], torch.arange(p + n))
    assert torch.equal(mb.teacher_logp_BT[0], batch.teacher_logp_BT[rows, :n])
    assert mb.rewards_PG.shape == batch.rewards_PG.shape and mb.keys.row(0) == batch.keys.row(rows)
