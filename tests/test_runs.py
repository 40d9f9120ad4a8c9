"""Reading runs back: `list_runs` (one row per run, with status), `run_metrics` (one row per step
joined with held-out pass@1) and the `kdrl runs` / `kdrl show` commands, on hand-built run
directories written with the real storage layer (no training)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from flows.cli import main
from kdrl.config import dump_config, load_config
from kdrl.runs import RUN_METRICS, RUNS, RunNotFoundError, list_runs, run_metrics
from kdrl.storage import EVALUATIONS, STEP_METRICS, RunPaths, write_table

ROOT = Path(__file__).resolve().parents[1]


def _metrics(step: int) -> pl.DataFrame:
    """A STEP_METRICS row whose values are simple functions of the step (reward 0.1·step, ...)."""
    row = {name: 0.0 for name in STEP_METRICS}
    row.update(step=step, reward_mean=0.1 * step, kl_k1_mean=0.01 * step, beta=0.005 - 0.001 * step,
               loss=-0.5 * step, response_len_mean=10.0 + step, time_total_s=1.5,
               num_tokens=100, teacher_tokens=50)
    return pl.DataFrame([row], schema=STEP_METRICS)


def _evaluations(step: int, correct_PK: list[list[bool]], *, model: str = "student",
                 temperature: float = 0.0, length: int = 4) -> pl.DataFrame:
    """EVALUATIONS rows for prompts 0..P-1, k = len(correct_PK[p]) samples each, all `length` long."""
    rows = [(p, k, c) for p, cs in enumerate(correct_PK) for k, c in enumerate(cs)]
    n = len(rows)
    return pl.DataFrame(
        {"step": [step] * n, "prompt_id": [r[0] for r in rows], "sample_idx": [r[1] for r in rows],
         "split": ["heldout"] * n, "model": [model] * n, "temperature": [temperature] * n, "completion_text": [""] * n,
         "completion_len": [length] * n, "finish_reason": ["stop"] * n, "extracted_answer": [None] * n,
         "correct": [r[2] for r in rows]},
        schema=EVALUATIONS,
    )


def _make_run(runs_dir: Path, run_id: str, *, method: str, steps: int, done: int,
              checkpoint: int | None = None, evals: dict[int, pl.DataFrame] | None = None,
              baseline: pl.DataFrame | None = None, mtime: float | None = None) -> Path:
    paths = RunPaths(runs_dir / run_id)
    paths.root.mkdir(parents=True)
    paths.config.write_text(dump_config(load_config(None, [f"run.method={method}", f"run.steps={steps}"])))
    for step in range(done):
        write_table(_metrics(step), paths.metrics(step), table="step_metrics")
    for step, frame in (evals or {}).items():
        write_table(frame, paths.evaluation(step), table="evaluations")
    if baseline is not None:
        write_table(baseline, paths.offline / "eval_baseline.parquet", table="evaluations")
    if checkpoint is not None:
        paths.checkpoint(checkpoint).mkdir()
        (paths.checkpoint(checkpoint) / "trainer_state.pt").touch()
    if mtime is not None:
        for entry in [paths.root, *paths.root.iterdir()]:
            os.utime(entry, (mtime, mtime))
    return paths.root


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    """Three runs (complete, stopped midway, fresh) plus directories `list_runs` must skip."""
    runs = tmp_path / "runs"
    # pass@1 by hand (mean over prompts of the per-prompt accuracy over k = 2):
    #   step 1: [T, F], [F, F] → (0.5 + 0) / 2 = 0.25;  step 2: [T, T], [T, F] → (1 + 0.5) / 2 = 0.75
    #   baseline: [F, F], [T, F] → (0 + 0.5) / 2 = 0.25;  the teacher's 1.0 must not leak in.
    evals = {
        1: _evaluations(1, [[True, False], [False, False]]),
        2: pl.concat([_evaluations(2, [[True, True], [True, False]], length=6),
                      _evaluations(2, [[True, True], [True, True]], model="teacher")]),
    }
    baseline = pl.concat([_evaluations(-1, [[False, False], [True, False]]),
                          _evaluations(-1, [[True, True], [True, True]], model="teacher")])
    _make_run(runs, "done", method="grpo", steps=3, done=3, checkpoint=2, evals=evals,
              baseline=baseline, mtime=1_000_000)
    _make_run(runs, "midway", method="kdrl", steps=5, done=2, checkpoint=1, mtime=3_000_000)
    _make_run(runs, "fresh", method="sft", steps=4, done=0, mtime=2_000_000)
    # every step written but the final checkpoint missing: not complete
    _make_run(runs, "no-final-ckpt", method="grpo", steps=2, done=2, checkpoint=0, mtime=500_000)
    _make_run(runs, "_cache", method="grpo", steps=1, done=1, mtime=4_000_000)
    _make_run(runs, ".hidden", method="grpo", steps=1, done=1, mtime=4_000_000)
    (runs / "not-a-run" / "iter_00000").mkdir(parents=True)
    return runs


def test_list_runs_rows_values_and_status(runs_dir):
    table = list_runs(runs_dir)
    assert table.schema == RUNS
    # newest first by modified time; "_cache", ".hidden" and the config-less dir are skipped
    assert table["run_id"].to_list() == ["midway", "fresh", "done", "no-final-ckpt"]
    by_id = {row["run_id"]: row for row in table.iter_rows(named=True)}
    done = by_id["done"]
    assert (done["method"], done["status"], done["steps_total"], done["steps_done"], done["last_step"]) == (
        "grpo", "complete", 3, 3, 2)
    # last step is 2: reward 0.1·2, kl 0.01·2, β 0.005 − 0.001·2
    assert done["reward_mean"] == pytest.approx(0.2, abs=1e-12)
    assert done["kl_k1_mean"] == pytest.approx(0.02, abs=1e-12)
    assert done["beta"] == pytest.approx(0.003, abs=1e-12)
    assert done["heldout_pass_at_1"] == pytest.approx(0.75, abs=1e-12) and done["heldout_step"] == 2
    assert done["baseline_pass_at_1"] == pytest.approx(0.25, abs=1e-12)
    midway = by_id["midway"]
    assert (midway["method"], midway["status"], midway["steps_done"], midway["last_step"]) == ("kdrl", "stopped", 2, 1)
    assert midway["heldout_pass_at_1"] is None and midway["baseline_pass_at_1"] is None
    fresh = by_id["fresh"]
    assert (fresh["status"], fresh["steps_total"], fresh["steps_done"]) == ("stopped", 4, 0)
    assert all(fresh[c] is None for c in ("last_step", "reward_mean", "kl_k1_mean", "beta", "heldout_step"))
    assert by_id["no-final-ckpt"]["status"] == "stopped"


def test_a_run_locked_by_another_process_is_running(runs_dir, locked_by_subprocess):
    with locked_by_subprocess(runs_dir / "midway"):
        statuses = dict(list_runs(runs_dir).select("run_id", "status").iter_rows())
    assert statuses["midway"] == "running" and statuses["done"] == "complete"
    assert dict(list_runs(runs_dir).select("run_id", "status").iter_rows())["midway"] == "stopped"


def test_list_runs_of_a_missing_folder_is_empty(tmp_path):
    table = list_runs(tmp_path / "nowhere")
    assert table.height == 0 and table.schema == RUNS


def test_run_metrics_sorted_and_joined_with_heldout(runs_dir):
    metrics = run_metrics(runs_dir / "done")
    assert metrics.schema == RUN_METRICS
    assert metrics["step"].to_list() == [0, 1, 2]
    assert metrics["reward_mean"].to_list() == pytest.approx([0.0, 0.1, 0.2], abs=1e-12)
    # step 0 was not evaluated; steps 1 and 2 as in the fixture (lengths 4 and 6)
    assert metrics["heldout_pass_at_1"].to_list() == [None, 0.25, 0.75]
    assert metrics["heldout_mean_len"].to_list() == [None, 4.0, 6.0]


def test_run_metrics_orders_steps_numerically_past_five_digits(tmp_path):
    paths = RunPaths(tmp_path / "long")
    paths.root.mkdir()
    paths.config.write_text("run: {steps: 100001}")
    for step in (100_000, 99_999, 7):  # "iter_100000" sorts before "iter_99999" as text
        write_table(_metrics(step), paths.metrics(step), table="step_metrics")
    assert run_metrics(paths.root)["step"].to_list() == [7, 99_999, 100_000]
    assert list_runs(tmp_path)["last_step"].item() == 100_000


def test_run_metrics_of_a_non_run_names_the_folder(runs_dir):
    with pytest.raises(RunNotFoundError, match="not-a-run.*no config.yaml"):
        run_metrics(runs_dir / "not-a-run")


def test_cli_runs_prints_an_aligned_table(runs_dir, capsys):
    assert main(["runs", "--runs-dir", str(runs_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:4] == ["run_id", "method", "status", "steps_total"] and "heldout_pass_at_1" in header
    assert [line.split()[:3] for line in lines[1:]] == [
        ["midway", "kdrl", "stopped"], ["fresh", "sft", "stopped"],
        ["done", "grpo", "complete"], ["no-final-ckpt", "grpo", "stopped"],
    ]
    # aligned: every row starts each column where the header does
    status_at = lines[0].index("status")
    assert {line[status_at - 1] for line in lines[1:]} == {" "} and lines[3][status_at:].startswith("complete")


def test_cli_runs_and_show_read_the_runs_dir_of_a_config_as_train_does(runs_dir, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # no ./runs here: the folder must come from the config
    (work / "cfg.yaml").write_text(f"run:\n  runs_dir: {runs_dir}\n")
    assert main(["runs", "--config", str(work / "cfg.yaml")]) == 0
    from_config = capsys.readouterr().out
    assert main(["runs", "--set", f"run.runs_dir={runs_dir}"]) == 0
    assert capsys.readouterr().out == from_config and "midway" in from_config
    assert main(["show", "done", "--set", f"run.runs_dir={runs_dir}"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[0] == "step"
    # --runs-dir still wins; without either, ./runs as before
    assert main(["runs", "--runs-dir", str(work), "--set", f"run.runs_dir={runs_dir}"]) == 0
    assert capsys.readouterr().out.strip() == f"no runs under {work}"
    assert main(["runs"]) == 0
    assert capsys.readouterr().out.strip() == "no runs under runs"


def test_cli_runs_with_no_runs(tmp_path, capsys):
    assert main(["runs", "--runs-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"no runs under {tmp_path}"


def test_cli_show_by_id_and_by_path(runs_dir, capsys):
    assert main(["show", "done", "--runs-dir", str(runs_dir)]) == 0
    by_id = capsys.readouterr().out
    lines = by_id.splitlines()
    assert lines[0].split() == ["step", "reward_mean", "kl_k1_mean", "beta", "loss", "response_len_mean",
                                "heldout_pass_at_1", "time_total_s"]
    assert [line.split()[0] for line in lines[1:]] == ["0", "1", "2"]
    assert lines[3].split()[-2:] == ["0.75", "1.5"]
    assert main(["show", str(runs_dir / "done"), "--runs-dir", str(runs_dir / "elsewhere")]) == 0
    assert capsys.readouterr().out == by_id


def test_cli_show_selected_columns(runs_dir, capsys):
    assert main(["show", "done", "--runs-dir", str(runs_dir), "--columns", "step, heldout_pass_at_1"]) == 0
    assert [line.split() for line in capsys.readouterr().out.splitlines()] == [
        ["step", "heldout_pass_at_1"], ["0", "null"], ["1", "0.25"], ["2", "0.75"],
    ]


def test_cli_show_unknown_run_exits_2_naming_the_runs(runs_dir, capsys):
    assert main(["show", "nope", "--runs-dir", str(runs_dir)]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "done, fresh, midway, no-final-ckpt" in err and "_cache" not in err


def test_cli_show_unknown_column_exits_2_naming_the_columns(runs_dir, capsys):
    assert main(["show", "done", "--runs-dir", str(runs_dir), "--columns", "step,rewrd"]) == 2
    err = capsys.readouterr().err
    assert "'rewrd'" in err and "reward_mean" in err


def test_reading_runs_does_not_import_torch():
    code = "import sys, kdrl.runs, flows.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def _damaged_runs(runs: Path) -> dict[str, Path]:
    """Three runs beside the good ones, each with one file damaged as a partial copy would leave it."""
    garbage = RunPaths(_make_run(runs, "bad-metrics", method="grpo", steps=3, done=2))
    garbage.metrics(1).write_bytes(b"not parquet at all\n" * 10)
    truncated = RunPaths(_make_run(runs, "bad-eval", method="kdrl", steps=3, done=1,
                                   evals={0: _evaluations(0, [[True, False]])}))
    data = truncated.evaluation(0).read_bytes()
    truncated.evaluation(0).write_bytes(data[: len(data) // 2])
    config = RunPaths(_make_run(runs, "bad-config", method="sft", steps=3, done=1))
    config.config.write_bytes(b"run: {method: sft, steps: 3}\n# caf\xe9 in latin-1\n")
    return {"bad-metrics": garbage.metrics(1), "bad-eval": truncated.evaluation(0), "bad-config": config.config}


def test_list_runs_marks_a_damaged_run_and_lists_the_others(runs_dir):
    damaged = _damaged_runs(runs_dir)
    table = list_runs(runs_dir)
    assert table.schema == RUNS
    by_id = {row["run_id"]: row for row in table.iter_rows(named=True)}
    assert {run: by_id[run]["status"] for run in ("done", "midway", "fresh", "no-final-ckpt")} == {
        "done": "complete", "midway": "stopped", "fresh": "stopped", "no-final-ckpt": "stopped"}
    assert by_id["done"]["reason"] is None and by_id["done"]["heldout_pass_at_1"] == pytest.approx(0.75)
    for run, path in damaged.items():
        row = by_id[run]
        assert row["status"] == "damaged" and row["reason"].startswith(f"{path} is damaged: "), row
        assert row["last_step"] is None and row["reward_mean"] is None
    assert "not a Parquet file" in by_id["bad-metrics"]["reason"] and "truncated" in by_id["bad-eval"]["reason"]
    assert "not UTF-8 text" in by_id["bad-config"]["reason"]
    # what can still be read is filled in
    bad_metrics = by_id["bad-metrics"]
    assert (bad_metrics["method"], bad_metrics["steps_total"], bad_metrics["steps_done"]) == ("grpo", 3, 2)
    assert by_id["bad-config"]["method"] is None and by_id["bad-config"]["steps_done"] == 1


def test_a_config_that_is_not_yaml_is_damaged(tmp_path):
    paths = RunPaths(_make_run(tmp_path, "r", method="grpo", steps=2, done=0))
    paths.config.write_text("run: {method: grpo\n")
    row = list_runs(tmp_path).row(0, named=True)
    assert row["status"] == "damaged" and f"{paths.config} is damaged: not valid YAML" in row["reason"]


def test_cli_runs_lists_good_runs_and_prints_why_a_run_is_damaged(runs_dir, capsys):
    damaged = _damaged_runs(runs_dir)
    assert main(["runs", "--runs-dir", str(runs_dir)]) == 0
    out = capsys.readouterr().out
    table, _, notes = out.partition("\n\n")
    rows = {line.split()[0]: line.split()[2] for line in table.splitlines()[1:]}
    assert rows == {"midway": "stopped", "fresh": "stopped", "done": "complete", "no-final-ckpt": "stopped",
                    "bad-metrics": "damaged", "bad-eval": "damaged", "bad-config": "damaged"}
    assert "reason" not in table.splitlines()[0]
    assert notes.splitlines()[0] == "3 damaged run(s), listed without metrics:"
    for run, path in damaged.items():
        assert f"  {run}: {path} is damaged: " in notes


def test_cli_show_of_a_damaged_run_names_the_file(runs_dir, capsys):
    damaged = _damaged_runs(runs_dir)
    assert main(["show", "bad-metrics", "--runs-dir", str(runs_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kdrl: {damaged['bad-metrics']} is damaged: not a Parquet file")
    assert "Traceback" not in err and "ComputeError" not in err


@pytest.mark.filterwarnings("ignore:Artifact creation outside:FutureWarning")  # the task body, without a run
def test_the_iteration_table_artifact_holds_the_whole_curve_thinned_past_its_row_cap(tmp_path, prefect_harness):
    """publish_iteration: the table's latest version is every step so far, up to MAX_TABLE_ROWS;
    past it, every k-th step and the last one (each version is stored whole on the server)."""
    import asyncio
    import json

    from prefect.artifacts import create_progress_artifact
    from prefect.client.orchestration import get_client

    from tasks.report import MAX_TABLE_ROWS, artifact_key, publish_iteration

    steps = MAX_TABLE_ROWS + 50
    run_dir = _make_run(tmp_path / "runs", "long", method="kdrl", steps=steps + 5, done=steps + 1,
                        evals={10: _evaluations(10, [[True], [False]])})
    progress = create_progress_artifact(progress=0.0, key=artifact_key(run_dir, "progress"))

    async def table(key):
        async with get_client() as client:
            [latest] = [a for a in await client.read_latest_artifacts() if a.key == key]
            return json.loads(latest.data)

    key = artifact_key(run_dir, "iteration")
    publish_iteration.fn(str(run_dir), 20, progress, steps)
    short = asyncio.run(table(key))
    assert [r["step"] for r in short] == list(range(21))  # not step 21+, though written
    assert short[10]["heldout_pass_at_1"] == 0.5 and short[9]["heldout_pass_at_1"] is None
    assert short[3]["reward_mean"] == pytest.approx(0.3)
    report = artifact_key(run_dir, "report")
    publish_iteration.fn(str(run_dir), 19, progress, steps)  # every REPORT_EVERY steps: the run report too

    async def markdown(key):
        async with get_client() as client:
            return [a for a in await client.read_latest_artifacts() if a.key == key][0].data

    text = asyncio.run(markdown(report))
    assert text.startswith("# kdrl run `long` (after step 19)") and "| after step 10 | student | 0.500 |" in text
    assert "![learning curve](data:image/png;base64,iVBOR" in text  # the plot, inlined as a PNG
    publish_iteration.fn(str(run_dir), steps - 1, progress, steps)
    thinned = [r["step"] for r in asyncio.run(table(key))]
    assert thinned[0] == 0 and thinned[-1] == steps - 1 and len(thinned) <= MAX_TABLE_ROWS + 1
    assert thinned[1:-1] == list(range(2, steps - 1, 2))  # 250 rows, every 2nd
