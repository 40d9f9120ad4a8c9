"""The `kdrl` command: a tiny end-to-end run (in this process, against the session's Prefect
test harness), and config errors that name the key."""

import polars as pl
import pytest

from flows.cli import main


def _tiny(tmp_path, cache_dir=None):
    # data.* and embedded.* as in test_flow.py: the embedded models are warm-started once per session
    settings = {
        "run.steps": 2, "run.eval_every": 0, "run.runs_dir": tmp_path / "runs",
        "run.cache_dir": cache_dir or tmp_path / "cache",
        "embedded.teacher_steps": 3, "embedded.student_steps": 3,
        "data.num_train": 24, "data.num_heldout": 4, "data.max_digits": 2,
        "rollout.prompts_per_step": 2, "rollout.samples_per_prompt": 3, "rollout.max_new_tokens": 12,
    }
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def test_train_end_to_end_writes_a_readable_run(tmp_path, capsys, prefect_harness, embedded_cache):
    assert main(["train", "--run-id", "smoke", *_tiny(tmp_path, embedded_cache)]) == 0
    out = capsys.readouterr().out
    assert "before → after" in out and "student" in out and "teacher" in out
    run = tmp_path / "runs" / "smoke"
    metrics = pl.read_parquet(str(run / "iter_*" / "metrics.parquet"))
    assert metrics["step"].to_list() == [0, 1]
    assert (metrics["teacher_tokens"] > 0).all() and (metrics["beta"] > 0).all()
    assert pl.scan_parquet(str(tmp_path / "runs" / "*" / "**" / "rollouts.parquet")).collect().height == 2 * 2 * 3
    assert (run / "iter_00001" / "checkpoint" / "model" / "config.json").exists()


def test_a_typo_is_reported_with_the_key(tmp_path, capsys):
    assert main(["train", "--set", "loss.beta_int=0.1", *_tiny(tmp_path)]) == 2
    assert "loss.beta_int" in capsys.readouterr().err


def test_unknown_command_is_rejected():
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_every_exit_code_names_an_exception_class_and_the_most_specific_one_decides():
    import importlib

    from flows.cli import COMMAND_EXIT_CODES, EXIT_CODES, exit_code
    from kdrl.runlock import RunLockedError
    from kdrl.runs import RunNotFoundError
    from kdrl.storage import StorageError, StorageWriteError
    from kdrl.train import CheckpointWriteError, TrainingDiverged

    for name in [*EXIT_CODES, *(key for codes in COMMAND_EXIT_CODES.values() for key in codes)]:
        module, _, cls = name.rpartition(".")  # a renamed or moved class would never match again
        assert issubclass(getattr(importlib.import_module(module), cls), Exception), name
    assert exit_code(RunLockedError("runs/x", {"pid": 1}), "compare") == 3
    assert exit_code(TrainingDiverged("nan"), "replay") == exit_code(CheckpointWriteError("full"), "train") == 1
    assert exit_code(StorageWriteError("full"), "eval") == 1  # an OSError too, but its own entry is more specific
    assert exit_code(RunNotFoundError("nope"), "show") == exit_code(StorageError("damaged"), "replay") == 2
    assert exit_code(OSError("no network"), "eval") == 2 and exit_code(OSError("no network"), "train") is None
    assert exit_code(RuntimeError("a bug"), "train") is None  # keeps its traceback
