"""Runs that would silently do the wrong thing: a non-finite update is never applied and never
checkpointed, the k1 reward honours the KD denominator, k3 cannot overflow through masked
positions, a full disk loses nothing, the LR schedule spans ppo_epochs, identical runs write
identical checkpoints."""

import copy
import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import polars as pl
import pytest
import torch

from kdrl.batching import collate, join_step_tables
from kdrl.config import LossConfig, OptimConfig
from kdrl.losses import kdrl_loss, reverse_kl_k1_BT
from kdrl.train import (
    CheckpointWriteError,
    TrainingDiverged,
    build_optimizer,
    completion_logprobs_BT,
    load_trainer_state,
    save_checkpoint,
    update_step,
)


def _update(model, batch, *, loss_cfg=None, optim_cfg=None, temperature=1.0, optimizer_step=0):
    optim_cfg = optim_cfg or OptimConfig(lr=1e-3, micro_batch_size=5)
    optimizer, scheduler = build_optimizer(model, optim_cfg, total_steps=10)
    return update_step(model, optimizer, scheduler, batch, loss_cfg=loss_cfg or LossConfig(beta_init=0.5),
                       optim_cfg=optim_cfg, optimizer_step=optimizer_step, temperature=temperature)


# ---------------------------------------------------------------- k1 and the KD denominator


def test_k1_reward_honours_the_unmasked_denominator_by_hand():
    # two responses of 2 tokens; only the second is KD-unmasked; k1 = logp − teacher = 1 and √3 on it.
    # ρ = 1 in value, advantages 0: pg_loss = β Σ k1·mask / N_kd  → "all" (N_kd = 4): 2.732/4 ; "unmasked" (2): 2.732/2
    teacher = torch.tensor([[0.0, 0.0], [-1.0, -math.sqrt(3.0)]])
    k1_sum = 1.0 + math.sqrt(3.0)
    for num_kd_tokens, expected in ((4.0, k1_sum / 4), (2.0, k1_sum / 2)):
        logp = torch.zeros(2, 2, requires_grad=True)
        loss, metrics = kdrl_loss(logp_BT=logp, old_logp_BT=logp.detach(), mask_BT=torch.ones(2, 2),
                                  advantages_B=torch.zeros(2), kd_BT=None, kd_reward_BT=reverse_kl_k1_BT(logp, teacher),
                                  kd_mask_B=torch.tensor([0.0, 1.0]), beta=1.0, num_tokens=4.0,
                                  num_kd_tokens=num_kd_tokens)
        assert metrics["pg_loss"].item() == pytest.approx(expected)
        loss.backward()
        # ∇ = β·k1/N_kd on the distilled tokens, 0 elsewhere: the same scale as the k2 loss term
        assert logp.grad.flatten().tolist() == pytest.approx([0.0, 0.0, 1.0 / num_kd_tokens,
                                                              math.sqrt(3.0) / num_kd_tokens])


# ---------------------------------------------------------------- k3 through masked positions


def test_k3_is_finite_when_masked_positions_have_huge_log_ratios(step_tables, tiny_student):
    rollouts, rewards, teacher = step_tables
    batch = collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=0)
    temperature = 0.004  # the tiny student's padding positions then have log-probs far below −88
    with torch.no_grad():
        logp_BT, _ = completion_logprobs_BT(tiny_student, batch, temperature=temperature)
    mask_BT = batch.completion_mask_BT
    assert (logp_BT[mask_BT == 0] < -88).any(), "premise: e^R overflows float32 at some padding position"
    # the teacher agrees with the student on every real token (R = 0 there); padding keeps collate's fill, 0
    batch = dataclasses.replace(batch, teacher_logp_BT=torch.where(mask_BT > 0, logp_BT, torch.zeros_like(logp_BT)))
    model = copy.deepcopy(tiny_student)
    result = _update(model, batch, loss_cfg=LossConfig(kl_estimator="k3", beta_init=1.0, pg_coef=0.0),
                     temperature=temperature)
    assert result.metrics["kd_loss"] == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(result.metrics["loss"]) and math.isfinite(result.metrics["grad_norm"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- the non-finite guard


def _assert_untouched(model, reference):
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
        assert p.grad is None


def test_a_nan_loss_stops_before_the_optimizer_step_and_names_the_terms(step_tables, tiny_student):
    rollouts, rewards, teacher = step_tables
    batch = collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=0)
    model = copy.deepcopy(tiny_student)
    with pytest.raises(TrainingDiverged, match=r"optimizer step 7: the pg, kd, nll loss terms are not finite") as info:
        # temperature 0 divides the logits by 0: every log-prob is NaN
        _update(model, batch, loss_cfg=LossConfig(beta_init=0.5, nll_coef=0.1), temperature=0.0, optimizer_step=7)
    assert info.value.diagnostics["non_finite_terms"] == ["pg", "kd", "nll"]
    assert info.value.diagnostics["non_finite_student_logp"] > 0
    copy_ = pickle.loads(pickle.dumps(info.value))  # Prefect persists a failed task's exception
    assert str(copy_) == str(info.value) and str(copy_.diagnostics) == str(info.value.diagnostics)  # NaN != NaN
    _assert_untouched(model, tiny_student)


def test_only_the_non_finite_term_is_named(step_tables, tiny_student):
    rollouts, rewards, teacher = step_tables
    batch = collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=0)
    teacher_BT = batch.teacher_logp_BT.clone()
    teacher_BT[0, 0] = float("-inf")  # a teacher that gives a sampled token probability 0
    model = copy.deepcopy(tiny_student)
    with pytest.raises(TrainingDiverged, match=r"the kd loss term is not finite") as info:
        _update(model, dataclasses.replace(batch, teacher_logp_BT=teacher_BT))
    assert info.value.diagnostics["non_finite_terms"] == ["kd"] and math.isfinite(info.value.diagnostics["pg_loss"])
    _assert_untouched(model, tiny_student)


def test_a_non_finite_gradient_norm_stops_before_the_optimizer_step(step_tables, tiny_student):
    rollouts, rewards, teacher = step_tables
    batch = collate(join_step_tables(rollouts, rewards, teacher), pad_token_id=0)
    model = copy.deepcopy(tiny_student)
    name, param = next((n, p) for n, p in model.named_parameters() if "layers.0" in n)
    param.register_hook(lambda grad: grad * float("inf"))  # finite loss, infinite gradient
    with pytest.raises(TrainingDiverged, match=r"the gradient norm is (inf|nan)") as info:
        _update(model, batch, optim_cfg=OptimConfig(lr=1e-3, micro_batch_size=5, grad_clip=1.0))
    assert name in info.value.diagnostics["non_finite_grads"]
    _assert_untouched(model, tiny_student)


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path, tiny_tokenizer, tiny_student):
    model = copy.deepcopy(tiny_student)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    optimizer, scheduler = build_optimizer(model, OptimConfig(), total_steps=1)
    with pytest.raises(TrainingDiverged, match="refusing to write .*not finite"):
        save_checkpoint(tmp_path / "checkpoint", model=model, tokenizer=tiny_tokenizer, optimizer=optimizer,
                        scheduler=scheduler, step=0, optimizer_step=1)
    assert list(tmp_path.iterdir()) == []


def test_a_diverged_step_writes_its_diagnostics_and_no_metrics_or_checkpoint(tmp_path, tiny_run_config, embedded_cache):
    from kdrl.pipeline import (
        DIVERGED_FILE,
        write_rewards,
        write_rollouts,
        write_teacher_logprobs,
        write_update,
    )
    from kdrl.runs import latest_checkpoint
    from kdrl.workers import load_run

    cfg = tiny_run_config(tmp_path, **{"run.steps": 2, "run.cache_dir": embedded_cache})
    s = load_run(cfg, tmp_path / "runs" / "diverges", log=lambda _: None)
    paths = s.info.paths
    try:
        rollouts = write_rollouts(s.info, s.rollout, s.prompts, 0)
        rewards = write_rewards(s.info, rollouts, s.prompts, 0)
        scores = write_teacher_logprobs(s.info, s.teacher, rollouts, rewards, 0)
        before = copy.deepcopy(s.student.model.state_dict())
        next(s.student.model.parameters()).register_hook(lambda grad: grad * float("nan"))
        with pytest.raises(TrainingDiverged,
                           match=r"step 0, optimizer step 0: the gradient norm is nan.*diverged\.json"):
            write_update(s.info, s.student, s.rollout, rollouts, rewards, scores, 0)
        report = json.loads((paths.iter_dir(0) / DIVERGED_FILE).read_text())
        assert report["step"] == 0 and report["non_finite_terms"] == ["grad_norm"] and report["non_finite_grads"]
        assert not paths.metrics(0).exists() and not paths.advantages(0).exists()
        assert latest_checkpoint(paths) is None
        assert all(torch.equal(v, s.student.model.state_dict()[k]) for k, v in before.items())
    finally:
        s.close()


# ---------------------------------------------------------------- checkpoints and a full disk


def _small_checkpoint_parts(tiny_student):
    model = copy.deepcopy(tiny_student)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # no optimizer state: a checkpoint ≈ the weights
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@pytest.fixture
def small_disk(tmp_path):
    """A real 6 MiB filesystem (tmpfs): room for one tiny-student checkpoint (≈4 MiB), not two."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the RLIMIT_FSIZE test covers write failures")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_loses_nothing_and_says_so(small_disk, tiny_tokenizer, tiny_student):
    model, optimizer, scheduler = _small_checkpoint_parts(tiny_student)
    first = small_disk / "iter_00000" / "checkpoint"
    first.parent.mkdir()
    save_checkpoint(first, model=model, tokenizer=tiny_tokenizer, optimizer=optimizer, scheduler=scheduler, step=0,
                    optimizer_step=1)
    first_bytes = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    second = small_disk / "iter_00001" / "checkpoint"
    second.parent.mkdir()
    with pytest.raises(CheckpointWriteError,
                       match=rf"no space left under {second.parent}.*earlier files and checkpoints are intact"):
        save_checkpoint(second, model=model, tokenizer=tiny_tokenizer, optimizer=optimizer, scheduler=scheduler,
                        step=1, optimizer_step=2)
    assert list(second.parent.iterdir()) == []  # no .checkpoint.tmp left to fill the disk further
    assert {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()} == first_bytes
    restored = _small_checkpoint_parts(tiny_student)
    assert load_trainer_state(first, model=restored[0], optimizer=restored[1], scheduler=restored[2])["step"] == 0


def test_a_table_the_disk_cannot_hold_is_a_clear_error_and_leaves_no_temp_file(small_disk):
    from kdrl.storage import StorageWriteError, read_table, write_table

    rows = 500_000  # > 10 MiB of random hex even after zstd: more than the 6 MiB disk
    df = pl.DataFrame({"step": [0] * 4, "prompt_id": [0, 1, 2, 3], "sample_idx": [0] * 4,
                       "extracted_answer": ["1"] * 4, "reward": [1.0] * 4, "truncated": [False] * 4})
    kept = write_table(df, small_disk / "iter_00000" / "rewards.parquet", table="rewards")
    big = pl.DataFrame({"step": [0] * rows, "prompt_id": list(range(rows)), "sample_idx": [0] * rows,
                        "extracted_answer": [uuid.uuid4().hex * 2 for _ in range(rows)], "reward": [1.0] * rows,
                        "truncated": [False] * rows})
    with pytest.raises(StorageWriteError,
                       match=rf"rewards.parquet not written: no space left under {small_disk / 'iter_00001'}"):
        write_table(big, small_disk / "iter_00001" / "rewards.parquet", table="rewards")
    assert list((small_disk / "iter_00001").iterdir()) == []
    assert read_table(kept, table="rewards").equals(df)


def test_a_failed_checkpoint_write_removes_its_temporary_folder(tmp_path, tiny_model_dir):
    # a file-size limit makes every large write fail (EFBIG), on any machine and without root
    script = textwrap.dedent(f"""
        import resource, signal, sys, torch
        from kdrl.models import load_causal_lm, load_tokenizer
        from kdrl.train import CheckpointWriteError, save_checkpoint
        model = load_causal_lm({str(tiny_model_dir / "student")!r}, dtype="float32", device="cpu")
        tokenizer = load_tokenizer({str(tiny_model_dir / "student")!r})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
        try:
            save_checkpoint({str(tmp_path / "checkpoint")!r}, model=model, tokenizer=tokenizer, optimizer=opt,
                            scheduler=sched, step=0, optimizer_step=1)
        except CheckpointWriteError as err:
            print("ERROR:", err)
            sys.exit(0)
        sys.exit("no error")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"checkpoint {tmp_path / 'checkpoint'} not written: could not write under {tmp_path}" in done.stdout
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the schedule and the RNG state of a run


@pytest.mark.slow
def test_the_lr_schedule_spans_every_ppo_epoch_and_identical_runs_checkpoint_identically(tmp_path, tiny_run_overrides,
                                                                                          embedded_cache):
    """Run in a fresh process: pytest's own process holds other tests' vLLM engines, whose
    background threads may draw from the global `random` while a run trains (seen once in the
    full suite), which says nothing about kdrl."""
    overrides = tiny_run_overrides(tmp_path, **{"run.steps": 2, "loss.ppo_epochs": 2, "optim.schedule": "linear",
                                                "optim.lr": 1e-3, "run.cache_dir": embedded_cache})
    script = textwrap.dedent(f"""
        import json, random, sys, uuid
        import polars as pl, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from flows.train import train_without_prefect
        from kdrl.config import load_config
        from kdrl.storage import RunPaths
        tmp = {str(tmp_path)!r}
        cfg = load_config(overrides={[f"{k}={v}" for k, v in overrides.items()]!r})
        states = []
        for name in ("a", "b"):
            random.seed(uuid.uuid4().int)  # whatever the process did before the run
            train_without_prefect(cfg, f"{{tmp}}/runs/{{name}}")
            states.append(torch.load(RunPaths(f"{{tmp}}/runs/{{name}}").checkpoint(1) / "trainer_state.pt",
                                     weights_only=False))
        metrics = pl.scan_parquet(f"{{tmp}}/runs/a/iter_*/metrics.parquet").collect().sort("step")
        print(json.dumps({{"lr": metrics["lr"].to_list(),
                          "same_python_rng": states[0]["rng"]["python"] == states[1]["rng"]["python"],
                          "optimizer_step": states[0]["optimizer_step"]}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # 2 steps × 2 epochs = 4 optimizer steps; the lr logged is that of each step's last epoch (optimizer steps 1 and 3)
    assert result["lr"] == pytest.approx([1e-3 * (1 - 1 / 4), 1e-3 * (1 - 3 / 4)])
    assert result["same_python_rng"]
    assert result["optimizer_step"] == 4


def test_kdrl_train_stops_at_the_first_diverged_step_with_a_clear_error(tmp_path, capsys, tiny_run_overrides,
                                                                         embedded_cache):
    from flows.cli import main

    # step 0 throws the weights far; step 1's gradient is NaN
    overrides = tiny_run_overrides(tmp_path, **{"run.steps": 4, "optim.lr": 1000, "run.cache_dir": embedded_cache})
    argv = ["train", "--no-prefect", "--run-id", "lr1000"] + [a for k, v in overrides.items()
                                                              for a in ("--set", f"{k}={v}")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "kdrl: step 1, optimizer step 1: the gradient norm is nan" in err and "Traceback" not in err
    run = tmp_path / "runs" / "lr1000"
    assert json.loads((run / "iter_00001" / "diverged.json").read_text())["lr"] == 1000
    assert not (run / "iter_00001" / "metrics.parquet").exists() and not (run / "iter_00001" / "checkpoint").exists()
    assert (run / "iter_00000" / "checkpoint").is_dir()  # the last good step is kept
