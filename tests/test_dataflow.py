"""Data flows between stages as values: each task receives the files the previous one returned,
so Prefect's flow-run graph has the edges generate → rewards → teacher → update, every per-step
file is read once per stage that consumes it and hashed once, by its writer, and the config is
validated once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from kdrl.storage import RunPaths

STEPS = 2


@pytest.fixture(scope="module")
def counted_run(tmp_path_factory, tiny_run_overrides, embedded_cache, prefect_harness):
    """A 2-step `kdrl-train` flow run in this process, counting Parquet reads and content hashes
    per file and config validations; returns (run dir, flow run id, reads, hashes, validations)."""
    import kdrl.config
    import kdrl.handoff
    from flows.train import kdrl_train

    reads: Counter[str] = Counter()
    hashes: Counter[str] = Counter()
    read_parquet, content_hash = pl.read_parquet, kdrl.handoff.content_hash

    def counting_read(path, *args, **kwargs):
        reads[str(Path(path).resolve())] += 1
        return read_parquet(path, *args, **kwargs)

    def counting_hash(path):
        hashes[str(Path(path).resolve())] += 1
        return content_hash(path)

    validations: list[str] = []
    validate = kdrl.config.validate_config

    def counting_validate(model, *args, **kwargs):
        validations.append(model.__name__)
        return validate(model, *args, **kwargs)

    root = tmp_path_factory.mktemp("dataflow")
    settings = tiny_run_overrides(root, **{"run.steps": STEPS, "run.cache_dir": embedded_cache})
    overrides = [f"{k}={v}" for k, v in settings.items()]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pl, "read_parquet", counting_read)
        patch.setattr(kdrl.handoff, "content_hash", counting_hash)
        patch.setattr(kdrl.config, "validate_config", counting_validate)
        kdrl.config._validated_config.cache_clear()
        state = kdrl_train(overrides=overrides, run_id="counted", return_state=True)
    assert state.is_completed(), state.message
    return Path(state.result()), state.state_details.flow_run_id, reads, hashes, validations


def test_stage_inputs_are_the_edges_of_the_flow_run_graph(counted_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    _, flow_run_id, _, _, _ = counted_run
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    names = {run.id: run.name for run in task_runs}
    upstream = {run.name: {names.get(getattr(i, "id", None)) for inputs in run.task_inputs.values() for i in inputs}
                for run in task_runs}
    for step in range(STEPS):
        assert {f"generate-{step}"} <= upstream[f"rewards-{step}"]
        assert {f"generate-{step}", f"rewards-{step}"} <= upstream[f"teacher-{step}"]
        assert {f"generate-{step}", f"rewards-{step}", f"teacher-{step}"} <= upstream[f"update-{step}"]
        assert {f"update-{step}"} <= upstream[f"checkpoint-{step}"]
        if step > 0:  # the weights generate samples with are the previous update's (Prefect's wait_for)
            assert {f"checkpoint-{step - 1}"} <= upstream[f"generate-{step}"]
    assert {f"checkpoint-{STEPS - 1}"} <= upstream[f"evaluate-{STEPS - 1}"]


def test_each_consumer_reads_a_stage_file_once_and_only_its_writer_hashes_it(counted_run):
    run_dir, _, reads, hashes, _ = counted_run
    paths = RunPaths(run_dir)
    for step in range(STEPS):
        files = (paths.rollouts(step), paths.rewards(step), paths.teacher(step))
        rollouts, rewards, teacher = (str(p.resolve()) for p in files)
        assert reads[rollouts] == 3, "rewards, teacher and update read the rollouts once each"
        assert reads[rewards] == 2, "teacher (its KD mask) and update"
        assert reads[teacher] == 1, "update"
        assert hashes[rollouts] == hashes[rewards] == hashes[teacher] == 1, "by the writer, for its Artifact"


def test_the_config_is_validated_once_per_process(counted_run):
    """The flow-run name, the flow body and every task share one validated RunConfig."""
    assert counted_run[4] == ["RunConfig"]
