"""Experiment trackers for real, offline: TensorBoard event files read back with TensorBoard's own
reader, MLflow through its client on a local SQLite tracking store, W&B in offline mode (its run
file parsed back), a tracker whose server is down (a closed port: warns, trains on, catches up
later), and a resumed run (no step twice)."""

from __future__ import annotations

import json
import math
import socket

import polars as pl
import pytest

from flows.train import train_without_prefect
from kdrl.storage import STEP_METRICS, RunPaths, read_table
from kdrl.trackers import ALIASES, EXTRAS, Trackers, check_installed, tracker_metrics

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


def _tensorboard_scalars(logdir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _mlflow_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once it is closed


def test_the_config_accepts_exactly_the_trackers_there_are():
    import typing

    from kdrl.config import RunSection
    from kdrl.trackers import TRACKERS

    (literal,) = typing.get_args(RunSection.model_fields["report_to"].annotation)
    assert set(typing.get_args(literal)) == set(TRACKERS) == set(EXTRAS)


def test_every_step_metric_has_one_tracker_name():
    names = [c for c in STEP_METRICS if c != "step"]
    assert sorted(ALIASES) == sorted(names), set(names) ^ set(ALIASES)
    assert len(set(ALIASES.values())) == len(ALIASES)
    row = {c: 1.0 for c in names} | {"rollout_logp_gap_max": math.nan}
    sent = tracker_metrics(row, devices=1)
    assert "rollout/logp_gap_max" not in sent and sent["perf/throughput"] == 1.0 and len(sent) == len(names)


def test_a_missing_tracker_package_refuses_the_run_naming_the_extra(monkeypatch):
    monkeypatch.setitem(EXTRAS, "mlflow", ("mlflow", "kdrl_no_such_module"))
    with pytest.raises(RuntimeError, match=r"pip install 'kdrl\[mlflow\]'"):
        check_installed(["tensorboard", "mlflow"])


def test_a_run_reaches_tensorboard_and_mlflow_and_a_tracker_added_later_is_backfilled(tmp_path, tiny_run_config,
                                                                                       embedded_cache):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = {"run.mlflow_tracking_uri": uri, "run.tracker_project": "kdrl-test", "run.eval_every": 1,
                 "run.steps": 2}
    run_dir = tmp_path / "runs" / "tracked"
    train_without_prefect(tiny_run_config(tmp_path, **overrides, **{"run.report_to": "[tensorboard]"}), run_dir)
    paths = RunPaths(run_dir)
    assert json.loads((run_dir / "trackers.json").read_text())["tensorboard"]["sent"] == 2

    # TensorBoard: every step's row under the trackers' names at step s + 1, evaluations included
    scalars = _tensorboard_scalars(run_dir / "tensorboard")
    for step in range(2):
        row = read_table(paths.metrics(step), table="step_metrics").row(0, named=True)
        for column in ("pg_loss", "kd_loss", "reward_mean", "beta", "response_len_mean", "time_total_s"):
            assert scalars[ALIASES[column]][step + 1] == pytest.approx(row[column], rel=1e-6)
    assert sorted(scalars["val/pass_at_1"]) == [0, 1, 2] and 0 in scalars["val/teacher_pass_at_1"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    images.Reload()
    assert [e.step for e in images.Images("learning_curve")] == [2]

    # MLflow added to the finished run (same run id: trackers are not in its hash): backfilled from
    # the files; TensorBoard, already sent, gets nothing twice
    both = tiny_run_config(tmp_path, **overrides, **{"run.report_to": "[tensorboard, mlflow]"})
    train_without_prefect(both, run_dir)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("kdrl-test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location == (tmp_path / "mlflow-artifacts").as_uri()  # beside the store, not ./mlruns
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["run.steps"] == "2" and run.data.tags["kdrl.run_id"] == "tracked"
    losses = [read_table(paths.metrics(s), table="step_metrics")["pg_loss"][0] for s in range(2)]
    assert _mlflow_history(uri, run.info.run_id, "actor/pg_loss") == [(1, pytest.approx(losses[0])),
                                                                       (2, pytest.approx(losses[1]))]
    assert [s for s, _ in _mlflow_history(uri, run.info.run_id, "val/pass_at_1")] == [0, 1, 2]
    assert {"heldout_summary.md", "learning_curve.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("actor/pg_loss")] == [1, 2]

    # once more: the same MLflow run resumes, nothing is sent twice
    train_without_prefect(both, run_dir)
    (again,) = client.search_runs([experiment.experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [s for s, _ in _mlflow_history(uri, run.info.run_id, "actor/pg_loss")] == [1, 2]


def _wandb_records(run_dir) -> list:
    """Every record of a W&B offline run's .wandb file: W&B's header (":W&B", 7 bytes), then the
    LevelDB log format (32 KiB blocks of CRC32 / length / type chunks; FULL, or FIRST MIDDLE*
    LAST) holding `wandb_internal_pb2.Record` protobufs. wandb 0.31 ships no Python reader."""
    import struct

    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B", path
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:  # a block's tail too short for a chunk header is padding
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if (length, kind) == (0, 0):
                pos += left
                continue
            payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            pending = payload if kind in (1, 2) else pending + payload
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
    return records


def test_a_run_reaches_wandb_offline_and_a_rerun_sends_nothing_twice(tmp_path, tiny_run_config, embedded_cache,
                                                                      monkeypatch):
    pytest.importorskip("wandb")
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONFIG_DIR", tmp_path / "wbc"),
                        ("WANDB_CACHE_DIR", tmp_path / "wbcache"), ("WANDB_DATA_DIR", tmp_path / "wbdata")):
        monkeypatch.setenv(name, str(value))
    cfg = tiny_run_config(tmp_path, **{"run.report_to": "[wandb]", "run.tracker_project": "kdrl-test",
                                       "run.eval_every": 1, "run.steps": 2})
    run_dir = tmp_path / "runs" / "wb"
    train_without_prefect(cfg, run_dir)
    records = _wandb_records(run_dir)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.display_name, run.project) == ("wb", "kdrl-test")
    assert run.run_id == json.loads((run_dir / "trackers.json").read_text())["wandb"]["run_id"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["run"]["steps"] == 2 and config["loss"]["beta_init"] == cfg.loss.beta_init
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    losses = [read_table(RunPaths(run_dir).metrics(s), table="step_metrics")["pg_loss"][0] for s in range(2)]
    assert [(h["_step"], h["actor/pg_loss"]) for h in history if "actor/pg_loss" in h] == [
        (1, pytest.approx(losses[0])), (2, pytest.approx(losses[1]))]
    assert [h["_step"] for h in history if "val/pass_at_1" in h] == [0, 1, 2]
    assert [h["_step"] for h in history if h.get("learning_curve/_type") == "image-file"] == [2]  # the plot, at the end
    assert list(run_dir.glob("wandb/offline-run-*/files/media/images/learning_curve_2_*.png"))
    # the same command again: everything was sent, so no new W&B run is opened
    train_without_prefect(cfg, run_dir)
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1


def test_a_run_reaches_trackio_locally(tmp_path, tiny_run_config, embedded_cache):
    pytest.importorskip("trackio")  # its store: TRACKIO_DIR, set for the session by conftest (read at import)
    cfg = tiny_run_config(tmp_path, **{"run.report_to": "[trackio]", "run.tracker_project": "kdrl-test",
                                       "run.eval_every": 1, "run.steps": 2})
    run_dir = tmp_path / "runs" / "tio"
    train_without_prefect(cfg, run_dir)
    from trackio import SQLiteStorage

    logs = SQLiteStorage.get_logs("kdrl-test", "tio")
    losses = [read_table(RunPaths(run_dir).metrics(s), table="step_metrics")["pg_loss"][0] for s in range(2)]
    assert [(row["step"], row["actor/pg_loss"]) for row in logs if "actor/pg_loss" in row] == [
        (1, pytest.approx(losses[0])), (2, pytest.approx(losses[1]))]
    assert [row["step"] for row in logs if "val/pass_at_1" in row] == [0, 1, 2]
    assert any("learning_curve" in row for row in logs)
    assert SQLiteStorage.get_run_config("kdrl-test", "tio")["run"]["steps"] == 2


def test_a_comparison_reaches_every_tracker_once(tmp_path, tiny_run_config, monkeypatch):
    """kdrl compare's table and plot as one run per tracker, named after the comparison folder;
    the same comparison again sends nothing (the state file holds the table's digest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdrl.trackers import report_comparison

    for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONFIG_DIR", tmp_path / "wbc"),
                        ("WANDB_CACHE_DIR", tmp_path / "wbcache"), ("WANDB_DATA_DIR", tmp_path / "wbdata")):
        monkeypatch.setenv(name, str(value))
    root = tmp_path / "runs" / "compare-x"
    root.mkdir(parents=True)
    (root / "comparison.md").write_text("| method | pass@1 |\n|---|---|\n| kdrl | 0.5 |\n")
    (root / "compare.yaml").write_text("arms: [grpo, kdrl]\nseeds: [0]\n")
    fig = plt.figure(figsize=(2, 2))
    fig.savefig(root / "comparison.png")
    plt.close(fig)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_run_config(tmp_path, **{"run.report_to": "[tensorboard, mlflow, wandb, trackio]",
                                       "run.mlflow_tracking_uri": uri, "run.tracker_project": "kdrl-cmp"})
    messages: list[str] = []
    for _ in range(2):
        report_comparison(cfg, root, log=messages.append)
    assert messages == []
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("kdrl-cmp").experiment_id])
    assert run.info.run_name == "compare-x"
    assert {"comparison.md", "comparison.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert len(list(root.glob("wandb/offline-run-*"))) == 1
    history = [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
               for r in _wandb_records(root) if r.WhichOneof("record_type") == "history"]
    assert any("comparison/_type" in h for h in history)
    from trackio import SQLiteStorage

    assert any("comparison" in row for row in SQLiteStorage.get_logs("kdrl-cmp", "compare-x"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("comparison")] == [0]


def _fake_run(root, steps: int):
    """A run folder with `steps` metrics rows (what the trackers read), written by kdrl's storage."""
    paths = RunPaths(root)
    for step in range(steps):
        row = {c: 0.5 for c in STEP_METRICS} | {"step": step, "pg_loss": float(step), "num_tokens": 10,
                                                 "teacher_tokens": 10}
        paths.iter_dir(step).mkdir(parents=True)
        from kdrl.storage import write_table

        write_table(pl.DataFrame([row], schema=STEP_METRICS), paths.metrics(step), table="step_metrics")
    return paths


def test_a_tracker_that_is_down_warns_trains_on_and_catches_up(tmp_path, tiny_run_config, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # kdrl's default of 2 retries costs seconds here
    down = f"http://127.0.0.1:{_closed_port()}"
    cfg = tiny_run_config(tmp_path, **{"run.report_to": "[mlflow]", "run.mlflow_tracking_uri": down,
                                       "run.steps": 3})
    run_dir = tmp_path / "runs" / "down"
    _fake_run(run_dir, 3)
    from kdrl.config import dump_config

    (run_dir / "config.yaml").write_text(dump_config(cfg))
    messages: list[str] = []
    trackers = Trackers(cfg, run_dir, log=messages.append)
    for step in range(3):
        trackers.publish(step)
    assert trackers.close(timeout=120)
    assert len(messages) == 1 and "tracker mlflow failed" in messages[0] and "retried" in messages[0], messages
    assert json.loads((run_dir / "trackers.json").read_text()).get("mlflow", {}).get("sent") is None

    # the server is back (here: a local store): the next open of the folder sends all three steps
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    back = tiny_run_config(tmp_path, **{"run.report_to": "[mlflow]", "run.mlflow_tracking_uri": uri, "run.steps": 3})
    trackers = Trackers(back, run_dir, log=messages.append)
    trackers.publish(2)
    assert trackers.close(timeout=120) and len(messages) == 1, messages
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"]
    assert _mlflow_history(uri, run_id, "actor/pg_loss") == [(1, 0.0), (2, 1.0), (3, 2.0)]
