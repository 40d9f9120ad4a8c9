"""`kdrl replay`: a counterfactual update from persisted inputs, into a new run directory."""

import shutil

import polars as pl
import pytest

from flows.cli import main
from flows.train import train_without_prefect
from kdrl.replay import replay_update
from kdrl.storage import RunPaths, read_table

TIMING = ["time_generate_s", "time_reward_s", "time_teacher_s", "time_update_s", "time_total_s", "tokens_per_s"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_run_config, embedded_cache):
    tmp = tmp_path_factory.mktemp("replay")
    cfg = tiny_run_config(tmp, **{"run.method": "kdrl_mask_response", "run.cache_dir": embedded_cache})
    run_dir = tmp / "runs" / "source"
    train_without_prefect(cfg, run_dir)
    return run_dir


def _snapshot(run_dir):
    return {p.relative_to(run_dir): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}


def test_replay_without_overrides_reproduces_the_step(finished_run, tmp_path):
    before = _snapshot(finished_run)
    dest = replay_update(finished_run, 2, [], dest_dir=tmp_path / "same", log=lambda _: None)
    src, new = RunPaths(finished_run), RunPaths(dest)
    assert pl.read_parquet(new.metrics(2)).drop(*TIMING, "run_id").equals(
        pl.read_parquet(src.metrics(2)).drop(*TIMING, "run_id"))
    assert read_table(new.advantages(2), table="advantages").equals(read_table(src.advantages(2), table="advantages"))
    assert pl.read_parquet(new.advantages(2))["run_id"].unique().to_list() == [new.root.name]
    weights = "model/model.safetensors"
    assert (new.checkpoint(2) / weights).read_bytes() == (src.checkpoint(2) / weights).read_bytes()
    assert _snapshot(finished_run) == before  # the source run is never written


def test_replay_with_another_beta_changes_only_the_kd_weight(finished_run, tmp_path):
    dest = replay_update(finished_run, 1, ["loss.beta_init=0.5", "loss.beta_schedule=constant"],
                         dest_dir=tmp_path / "beta", log=lambda _: None)
    old = pl.read_parquet(RunPaths(finished_run).metrics(1)).row(0, named=True)
    new = pl.read_parquet(RunPaths(dest).metrics(1)).row(0, named=True)
    assert new["beta"] == 0.5 and old["beta"] != 0.5
    # same weights before the update, same inputs: the KD term and PG term are unchanged, the loss is not
    assert new["kd_loss"] == pytest.approx(old["kd_loss"], rel=1e-6)
    assert new["pg_loss"] == pytest.approx(old["pg_loss"], rel=1e-6)
    assert new["loss"] == pytest.approx(new["pg_loss"] + 0.5 * new["kd_loss"], rel=1e-5)


def test_replay_refuses_what_it_cannot_do(finished_run, tmp_path):
    with pytest.raises(ValueError, match=r"rollout\.samples_per_prompt"):
        replay_update(finished_run, 1, ["rollout.samples_per_prompt=2"], dest_dir=tmp_path / "a", log=lambda _: None)
    # a response the source's mask dropped (its teacher row is null) cannot be distilled in a replay
    masked = _masked_copy(finished_run, tmp_path / "masked")
    with pytest.raises(ValueError, match="1 responses the new KD mask keeps were never scored"):
        replay_update(masked, 1, ["loss.kd_mask=none"], dest_dir=tmp_path / "b" / "new", log=lambda _: None)
    assert not (tmp_path / "b").exists()  # refused after the model was loaded: what it had made is gone
    with pytest.raises(FileNotFoundError, match="no rollouts"):
        replay_update(finished_run, 7, [], dest_dir=tmp_path / "c", log=lambda _: None)
    assert not (tmp_path / "c").exists()


def _masked_copy(finished_run, dest):
    """A copy of the run whose first teacher row of step 1 is null, as a response mask leaves it."""
    import shutil

    from kdrl.storage import write_table

    shutil.copytree(finished_run, dest)
    teacher = read_table(RunPaths(dest).teacher(1), table="teacher_logprobs")
    first_null = pl.Series([True] + [False] * (len(teacher) - 1))
    write_table(teacher.with_columns(pl.when(first_null).then(None).otherwise(pl.col("teacher_logprobs")).alias("teacher_logprobs")),
                RunPaths(dest).teacher(1), table="teacher_logprobs")
    return dest


def test_a_refused_replay_command_leaves_no_new_directory(finished_run, tmp_path, capsys):
    runs = tmp_path / "runs"
    _masked_copy(finished_run, runs / "masked")  # replayed by name below
    refusals = [
        (["--iter", "1", "--set", "loss.kd_mask=none"], "never scored"),  # found after the session is open
        (["--iter", "1", "--set", "rollout.samples_per_prompt=2"], "replay can only change"),
        (["--iter", "9"], "iteration 9 has no rollouts"),
        (["--iter", "-1"], "step must be >= 0"),
    ]
    for argv, why in refusals:
        assert main(["replay", "masked", "--runs-dir", str(runs), *argv]) == 2
        assert why in capsys.readouterr().err
        assert sorted(p.name for p in runs.iterdir()) == ["masked"], argv


def test_a_refused_replay_keeps_a_destination_that_was_there(finished_run, tmp_path):
    masked = _masked_copy(finished_run, tmp_path / "masked")
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="never scored"):
        replay_update(masked, 1, ["loss.kd_mask=none"], dest_dir=dest, log=lambda _: None)
    assert (dest / "notes.txt").read_text() == "keep me"


def test_replay_command(finished_run, capsys):
    code = main(["replay", str(finished_run), "--iter", "2", "--set", "loss.beta_init=0.02",
                 "--set", "loss.beta_schedule=constant"])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "original" in out and "replayed" in out
    assert main(["replay", "no-such-run", "--iter", "0", "--runs-dir", str(finished_run.parent)]) == 2


def test_a_replay_that_diverges_says_so_and_keeps_its_diagnostics(finished_run, tmp_path, capsys):
    runs = tmp_path / "runs"
    source = runs / "source"
    shutil.copytree(finished_run, source)
    # the first epoch's step (lr near float32's largest) makes weights whose second-epoch loss is not finite
    argv = ["--iter", "1", "--set", "optim.lr=1e37", "--set", "loss.ppo_epochs=2"]
    assert main(["replay", "source", "--runs-dir", str(runs), *argv]) == 1
    err = capsys.readouterr().err
    assert "kdrl: step 1, optimizer step 2:" in err and "not finite" in err and "Traceback" not in err
    # unlike a refusal, the replay ran: its folder stays, with the diagnostics and without a checkpoint
    [dest] = [p for p in runs.iterdir() if p != source]
    assert (dest / "iter_00001" / "diverged.json").exists() and not (dest / "iter_00001" / "checkpoint").exists()
