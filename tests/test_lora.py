"""LoRA students (kdrl.lora, model.lora): only the adapter trains; merged weights are exactly
W + (alpha/r)·B·A; checkpoints resume bit for bit; `kdrl merge-lora` writes a folder any HF tool
loads; a LoRA run writes the records of a full-weights run, and eval / replay / run listing read
its checkpoints. That a vLLM rollout engine gets the merged weights at every sync is in
test_vllm_run.py, beside the other vLLM runs."""

from __future__ import annotations

import copy
import sys

import polars as pl
import pytest
import torch

from kdrl.batching import collate, join_step_tables
from kdrl.config import LoraConfig, LossConfig, OptimConfig
from kdrl.engines.hf import HFRolloutEngine, HFTeacherScorer
from kdrl.lora import LoraError, apply_lora, merged_state_dict
from kdrl.models import load_causal_lm
from kdrl.stages import generate_rollouts, kd_needed, score_teacher
from kdrl.train import (
    build_optimizer,
    completion_logprobs_BT,
    load_trainer_state,
    save_checkpoint,
    update_step,
)

LORA = LoraConfig(r=4, alpha=8.0)  # scale alpha / r = 2


@pytest.fixture(scope="module")
def batch(tiny_tokenizer, tiny_student, tiny_teacher, tiny_prompts, rewards_for):
    """One step's batch: 3 prompts × 4 samples of the tiny student, mixed rewards, teacher scores."""
    rollouts = generate_rollouts(HFRolloutEngine(tiny_student, tiny_tokenizer), tiny_prompts, step=0, n=4,
                                 max_new_tokens=10, seed=3)
    rewards = rewards_for(rollouts, [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    teacher = score_teacher(HFTeacherScorer(tiny_teacher, tiny_tokenizer), rollouts,
                            kd_needed(rollouts, rewards, LossConfig()))
    return collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=0)


def _lora_student(tiny_model_dir, cfg: LoraConfig = LORA, *, seed: int = 0):
    return apply_lora(load_causal_lm(tiny_model_dir / "student"), cfg, seed=seed)


def _randomize_adapter(model, seed: int = 7) -> None:
    """B starts at 0 (ΔW = 0); give every A and B values so the merge has something to add."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_only_the_adapter_trains(tiny_model_dir, tiny_student, batch):
    model = _lora_student(tiny_model_dir)
    lora_before = _lora_params(model)
    assert lora_before and all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    optim_cfg = OptimConfig(lr=1e-2, micro_batch_size=5)
    optimizer, scheduler = build_optimizer(model, optim_cfg, total_steps=4)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in model.named_parameters() if "lora_" in n}  # AdamW holds the adapter only
    # B = 0 at first, so A gets no gradient in the first step: two steps move every A and B
    for step in range(2):
        result = update_step(model, optimizer, scheduler, batch, loss_cfg=LossConfig(beta_init=0.5),
                             optim_cfg=optim_cfg, optimizer_step=step)
        assert result.metrics["grad_norm"] > 0
    assert all(len(optimizer.state[p]) for group in optimizer.param_groups for p in group["params"])
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert not torch.equal(p, lora_before[name]), name
    base = model.get_base_model().state_dict()
    for name, tensor in tiny_student.state_dict().items():  # every base weight bit-identical
        key = name if name in base else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(base[key], tensor), name


def test_merged_weights_are_base_plus_scaled_BA(tiny_model_dir, tiny_student, batch):
    model = _lora_student(tiny_model_dir)
    _randomize_adapter(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state_dict(model)
    assert list(merged) == list(tiny_student.state_dict())  # the base architecture's names, in its order
    modules = dict(model.get_base_model().named_modules())
    adapted = 0
    for name, W in tiny_student.state_dict().items():
        layer = modules[name.removesuffix(".weight")] if name.endswith(".weight") else None
        if layer is not None and hasattr(layer, "lora_A"):
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # A: r × in, B: out × r
            expected = W + (8.0 / 4) * (B @ A)  # W' = W + (alpha/r)·B·A
            assert torch.allclose(merged[name], expected, atol=1e-6, rtol=0) and not torch.equal(merged[name], W), name
            adapted += 1
        else:
            assert torch.equal(merged[name], W), name  # embeddings, norms, the head: the base's own
    assert adapted == 4 * 7  # 4 layers × q k v o gate up down (all-linear leaves lm_head out)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the training module is untouched
    plain = copy.deepcopy(tiny_student)
    plain.load_state_dict(merged)
    ids = batch.input_ids_BS[:3]
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-5)
        # the trainer's path (get_decoder + get_output_embeddings) sees the adapter through peft's forwarding
        lora_logp_BT, _ = completion_logprobs_BT(model, batch)
        plain_logp_BT, _ = completion_logprobs_BT(plain, batch)
        base_logp_BT, _ = completion_logprobs_BT(tiny_student, batch)
    mask_BT = batch.completion_mask_BT
    assert ((lora_logp_BT - plain_logp_BT).abs() * mask_BT).max() < 1e-5
    assert ((lora_logp_BT - base_logp_BT).abs() * mask_BT).max() > 1e-3  # ... so the check above can fail


def test_a_fresh_adapter_is_the_base_model_and_depends_only_on_the_seed(tiny_model_dir, tiny_student, batch):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = _lora_student(tiny_model_dir, seed=5), _lora_student(tiny_model_dir, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the run's RNG stream is left as it was
    assert all(torch.equal(p, q) for p, q in zip(_lora_params(a).values(), _lora_params(b).values()))
    other = _lora_params(_lora_student(tiny_model_dir, seed=6))
    assert not all(torch.equal(p, q) for p, q in zip(_lora_params(a).values(), other.values()))
    with torch.no_grad():  # B = 0: exactly the base model, so step 0 samples what a full-weights run samples
        assert torch.equal(completion_logprobs_BT(a, batch)[0], completion_logprobs_BT(tiny_student, batch)[0])


def test_checkpoint_resume_is_bit_identical(tmp_path, tiny_model_dir, tiny_tokenizer, tiny_student, batch):
    optim_cfg = OptimConfig(lr=1e-2, schedule="cosine", warmup_steps=1, micro_batch_size=5)
    loss_cfg = LossConfig(beta_init=0.1)

    def fresh(cfg=LORA):
        model = _lora_student(tiny_model_dir, cfg)
        return (model, *build_optimizer(model, optim_cfg, total_steps=5))

    model, opt, sched = fresh(LORA.model_copy(update={"save_merged": True}))
    for step in range(2):
        update_step(model, opt, sched, batch, loss_cfg=loss_cfg, optim_cfg=optim_cfg, optimizer_step=step)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, model=model, tokenizer=tiny_tokenizer, optimizer=opt, scheduler=sched, step=1,
                    optimizer_step=2)
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter", "merged", "trainer_state.pt"]
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in (ckpt / "adapter").iterdir()}
    expected = update_step(model, opt, sched, batch, loss_cfg=loss_cfg, optim_cfg=optim_cfg, optimizer_step=2)
    torch.manual_seed(123)  # scramble the global RNG: the checkpoint must restore it

    model2, opt2, sched2 = fresh()
    assert load_trainer_state(ckpt, model=model2, optimizer=opt2, scheduler=sched2) == {"step": 1, "optimizer_step": 2}
    got = update_step(model2, opt2, sched2, batch, loss_cfg=loss_cfg, optim_cfg=optim_cfg, optimizer_step=2)
    assert got.metrics == expected.metrics
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)

    plain = copy.deepcopy(tiny_student)  # a full-weights student cannot resume a LoRA checkpoint, and vice versa
    with pytest.raises(ValueError, match="holds a LoRA adapter"):
        load_trainer_state(ckpt, model=plain, optimizer=opt, scheduler=sched)
    save_checkpoint(tmp_path / "full", model=plain, tokenizer=tiny_tokenizer, optimizer=opt, scheduler=sched, step=0,
                    optimizer_step=1)
    with pytest.raises(ValueError, match="holds full weights"):
        load_trainer_state(tmp_path / "full", model=model2, optimizer=opt2, scheduler=sched2)


def test_merge_lora_writes_a_plain_hf_model(tmp_path, tiny_model_dir, tiny_tokenizer, batch, capsys):
    from transformers import AutoModelForCausalLM

    from flows.cli import main

    model = _lora_student(tiny_model_dir)
    _randomize_adapter(model)
    opt, sched = build_optimizer(model, OptimConfig(), total_steps=1)
    ckpt = tmp_path / "run" / "iter_00000" / "checkpoint"
    save_checkpoint(ckpt, model=model, tokenizer=tiny_tokenizer, optimizer=opt, scheduler=sched, step=0,
                    optimizer_step=1)
    out = tmp_path / "merged"
    assert main(["merge-lora", str(ckpt), str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    plain = AutoModelForCausalLM.from_pretrained(out)
    ids = batch.input_ids_BS[:4]
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-5)
    assert main(["merge-lora", str(ckpt), str(out)]) == 2  # never over what exists
    assert "exists and is not empty" in capsys.readouterr().err
    save_checkpoint(tmp_path / "full", model=plain, tokenizer=tiny_tokenizer, optimizer=opt, scheduler=sched, step=0,
                    optimizer_step=1)
    assert main(["merge-lora", str(tmp_path / "full"), str(tmp_path / "out2")]) == 2
    assert "full-weights checkpoint" in capsys.readouterr().err


def test_settings_users_get_wrong_are_refused_with_what_to_do(tiny_model_dir, monkeypatch):
    with pytest.raises(LoraError, match=r"\['qproj'\] match no module.*'q_proj', 'k_proj'"):
        _lora_student(tiny_model_dir, LoraConfig(target_modules=["q_proj", "qproj"]))
    with pytest.raises(LoraError, match="output head"):
        _lora_student(tiny_model_dir, LoraConfig(target_modules=["q_proj", "lm_head"]))
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed: `import peft` raises ImportError
    with pytest.raises(LoraError, match=r"pip install peft \(or pip install 'kdrl\[lora\]'\)"):
        _lora_student(tiny_model_dir)


@pytest.fixture(scope="module")
def lora_and_full_runs(tmp_path_factory, tiny_run_config, embedded_cache):
    """The tiny 2-step kdrl_anneal run, once with model.lora and once with full weights (HF
    engines, one embedded cache)."""
    from flows.train import train_without_prefect

    root = tmp_path_factory.mktemp("lora_runs")
    runs = {}
    for name, extra in {"full": {}, "lora": {"model.lora": "{r: 4, alpha: 8}", "optim.lr": 1e-2}}.items():
        cfg = tiny_run_config(root, **{"run.steps": 2, "run.cache_dir": embedded_cache, **extra})
        runs[name] = (cfg, root / "runs" / name)
        train_without_prefect(cfg, runs[name][1])
    return runs


def _files(run_dir) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() and "checkpoint" not in p.parts}


def test_a_lora_run_writes_the_records_of_a_full_run(lora_and_full_runs):
    from kdrl.storage import RunPaths, read_table

    (_, full), (_, lora) = lora_and_full_runs["full"], lora_and_full_runs["lora"]
    assert _files(full) == _files(lora)
    for name in _files(full):
        if name.endswith(".parquet"):
            assert pl.read_parquet_schema(full / name) == pl.read_parquet_schema(lora / name), name
    a, b = RunPaths(full), RunPaths(lora)
    # B = 0 until the first update: the same samples (log-probs to float rounding: peft's forward adds the zero update)
    full0, lora0 = read_table(a.rollouts(0), table="rollouts"), read_table(b.rollouts(0), table="rollouts")
    assert full0.drop("sampler_logprobs").equals(lora0.drop("sampler_logprobs"))
    gap = (full0["sampler_logprobs"].explode() - lora0["sampler_logprobs"].explode()).abs().max()
    assert gap < 1e-5
    tokens = [read_table(p.rollouts(1), table="rollouts")["completion_token_ids"] for p in (a, b)]
    assert not tokens[0].equals(tokens[1])  # then the runs part
    for step in (0, 1):
        assert sorted(p.name for p in b.checkpoint(step).iterdir()) == ["adapter", "trainer_state.pt"]
    metrics = pl.read_parquet(str(lora / "iter_*" / "metrics.parquet"))
    assert metrics["rollout_logp_gap_max"].max() < 1e-5  # HF samples on the trainer's own (LoRA) module


def test_eval_replay_and_listing_read_a_lora_run(lora_and_full_runs, tmp_path):
    from kdrl.evaluation import build_eval_config, read_summary, resolve_checkpoint, run_eval
    from kdrl.replay import replay_update
    from kdrl.runs import list_runs
    from kdrl.storage import RunPaths

    cfg, run = lora_and_full_runs["lora"]
    resolved = resolve_checkpoint(str(run))
    assert resolved.adapter == str(RunPaths(run).checkpoint(1) / "adapter") and resolved.step == 1
    # kdrl eval of the run = the run's own evaluation of its last step (same prompts, k, T, seed)
    ev = build_eval_config(str(run), "embedded", [f"run.eval_samples={cfg.run.eval_samples}",
                                                  f"run.eval_temperature={cfg.run.eval_temperature}",
                                                  f"run.eval_greedy={str(cfg.run.eval_greedy).lower()}",
                                                  f"run.seed={cfg.run.seed * 1_000_003 - 1}", "rollout.engine=hf",
                                                  "model.device=cpu"])
    out = run_eval(ev, tmp_path / "eval", log=lambda _: None)
    assert read_summary(out).height >= 1

    def texts(path, model="student"):
        samples = pl.read_parquet(path).filter(model=model)
        return samples.sort("temperature", "prompt_id", "sample_idx")["completion_text"]

    own = texts(RunPaths(run).evaluation(1))
    assert texts(out.samples, model=str(run)).equals(own)  # the adapter's weights: the run's step-1 student
    assert not texts(RunPaths(run).offline / "eval_baseline.parquet").equals(own)  # not the base model's

    # no overrides: step 1 again, exactly
    dest = replay_update(run, 1, dest_dir=tmp_path / "replay", log=lambda _: None)
    timing = [c for c in pl.read_parquet(RunPaths(run).metrics(1)).columns
              if c.startswith("time_") or c in ("tokens_per_s", "run_id")]  # run_id: the replay is another run
    assert pl.read_parquet(RunPaths(dest).metrics(1)).drop(timing).equals(
        pl.read_parquet(RunPaths(run).metrics(1)).drop(timing))
    assert (RunPaths(dest).checkpoint(1) / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (RunPaths(run).checkpoint(1) / "adapter" / "adapter_model.safetensors").read_bytes()

    listed = list_runs(run.parent).filter(run_id="lora").row(0, named=True)
    assert listed["status"] == "complete" and listed["steps_done"] == 2


def test_a_resumed_lora_run_is_bit_identical(lora_and_full_runs, tmp_path):
    import shutil

    from flows.train import train_without_prefect
    from kdrl.storage import RunPaths

    cfg, run = lora_and_full_runs["lora"]
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "iter_00001")  # as if killed during step 1
    train_without_prefect(cfg, resumed)
    a, b = RunPaths(run), RunPaths(resumed)
    for table in ("rollouts", "advantages"):
        assert pl.read_parquet(getattr(a, table)(1)).drop("run_id").equals(  # the copy is another folder
            pl.read_parquet(getattr(b, table)(1)).drop("run_id")), table
    adapter = "adapter/adapter_model.safetensors"
    assert (a.checkpoint(1) / adapter).read_bytes() == (b.checkpoint(1) / adapter).read_bytes()
