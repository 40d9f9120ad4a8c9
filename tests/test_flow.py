"""The `kdrl-train` flow and its deployment: a run killed inside any stage resumes to the same
weights and metrics as an uninterrupted one, a locked run is refused without touching it,
and the tasks' logic runs without the engine (`.fn`). (prefect.yaml's deployments are checked in
test_schedule.py, on the real server that also shows the nightly one firing.)

The crash tests run `kdrl train` as subprocesses, as a person would, against one `prefect server`
started for this module: a process killed with exit code 137 (`KDRL_FAULT`, like `kill -9`) would
leave an ephemeral server behind. All runs share one embedded-model cache and one Prefect result
storage, so the rerun of a killed run finds the cache records its earlier attempts left. The kills
inside the Prefect flow are one chain: a single run killed inside each stage of its last step in
turn, every kill in the rerun of the attempt before (with a damaged file on the way), then a clean
rerun — 6 processes where a kill and a rerun per stage took 12, each link checked on its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from flows.cli import main
from kdrl.storage import RunPaths, read_table, write_table

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("generate", "rewards", "teacher", "update", "evaluate")
STEPS = 4
LAST = STEPS - 1
# Checkpoints after steps 1 and 3 ((step + 1) % 2 == 0, and always after the last). A run killed
# inside step 3 therefore resumes from checkpoint 1 and must *replay* update 2 from its persisted
# Parquet inputs before redoing step 3. (With 3 steps, checkpoint_every=2 would checkpoint after
# step 1, and a kill in step 2 would resume without replaying anything.)
TINY = {
    "run.method": "kdrl_anneal", "run.steps": STEPS, "run.checkpoint_every": 2, "run.eval_every": 0,
    "embedded.teacher_steps": 3, "embedded.student_steps": 3,
    "data.num_train": 24, "data.num_heldout": 4, "data.max_digits": 2,
    "rollout.prompts_per_step": 3, "rollout.samples_per_prompt": 4, "rollout.max_new_tokens": 12,
    "optim.lr": 1e-3, "optim.micro_batch_size": 5,
}
# One torch thread in the subprocesses: two OpenMP threads on a 2-core box that also runs pytest
# and the Prefect server spin against each other (a 1M-parameter backward then takes seconds).
SUBPROCESS = {"run.num_threads": 1}
TIMING = re.compile(r"^time_.*_s$|^tokens_per_s$")
TASK_STATE = re.compile(r"Task run '([a-z_]+-[-0-9]+)' - Finished in state (\w+)")


def _flags(settings: dict) -> list[str]:
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def _env(**updates: str) -> dict[str, str]:
    """This process's environment without a Prefect API or a fault, plus `updates`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "KDRL_FAULT")}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **updates}


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """The same low-priority local server `kdrl train` starts (flows/server.py), with its own
    PREFECT_HOME (SQLite); yields its API URL and stops it at module teardown."""
    from flows.server import local_server

    home = tmp_path_factory.mktemp("prefect_server_home")
    with local_server(env=_env(PREFECT_HOME=str(home)), log_path=str(home / "server.log")) as api_url:
        yield api_url


@pytest.fixture(scope="module")
def flow_env(prefect_server, tmp_path_factory, embedded_cache):
    """What every `kdrl train` subprocess of this module shares: the server, the client's home,
    the result storage (cache records), the runs folder and the embedded-model cache."""
    root = tmp_path_factory.mktemp("flow_runs")
    env = _env(PREFECT_API_URL=prefect_server, PREFECT_HOME=str(root / "prefect_home"),
               PREFECT_LOCAL_STORAGE_PATH=str(root / "prefect_storage"))
    settings = {**TINY, **SUBPROCESS, "run.runs_dir": root / "runs", "run.cache_dir": embedded_cache}
    return SimpleNamespace(env=env, runs_dir=root / "runs", flags=_flags(settings))


def _kdrl_train(flow_env, run_id: str, *, fault: str | None = None, plain: bool = False,
                extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`python -m flows.cli train` as a subprocess; stdout and stderr (Prefect's log) in one string."""
    env = flow_env.env if fault is None else {**flow_env.env, "KDRL_FAULT": fault}
    argv = ["train", "--run-id", run_id, *flow_env.flags, *extra, *(["--no-prefect"] if plain else [])]
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                          check=False)


@pytest.fixture(scope="module")
def reference(flow_env) -> Path:
    """The uninterrupted run every resumed run must reproduce (reporting to TensorBoard, which is
    not part of what it computes)."""
    done = _kdrl_train(flow_env, "reference", extra=("--set", "run.report_to=[tensorboard]"))
    assert done.returncode == 0, done.stdout[-4000:]
    return flow_env.runs_dir / "reference"


def test_a_flow_run_reports_every_step_to_tensorboard(reference):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reference / "tensorboard"))
    acc.Reload()
    losses = [read_table(RunPaths(reference).metrics(s), table="step_metrics")["pg_loss"][0] for s in range(STEPS)]
    assert [(e.step, e.value) for e in acc.Scalars("actor/pg_loss")] == [
        (s + 1, pytest.approx(loss, rel=1e-6)) for s, loss in enumerate(losses)]
    assert [e.step for e in acc.Scalars("val/pass_at_1")][0] == 0  # the baseline, before any update


def _task_states(log: str) -> dict[str, str]:
    """{task run name: final state} of the per-step tasks in a flow's log ("generate-3": "Cached")."""
    return {name: state for name, state in TASK_STATE.findall(log)
            if re.match(r"(generate|rewards|teacher|update|evaluate)-", name)}


def _expected_states_after_kill(stage: str, killed_in: str | None = None) -> dict[str, str]:
    """The per-step task states in the log of the rerun of a run killed inside `stage` of the last
    step, the rerun itself killed inside `killed_in` of that step (None: it runs to the end). A
    killed task logs nothing: it and the tasks after it are missing."""
    expected = {"evaluate--1": "Cached"}
    if stage == "evaluate":  # step 3's checkpoint was written: only its evaluation is left
        return expected if killed_in == "evaluate" else {**expected, f"evaluate-{LAST}": "Completed"}
    # resumed from checkpoint 1: step 2 comes from the cache and its update is replayed
    expected.update({"generate-2": "Cached", "rewards-2": "Cached", "teacher-2": "Cached", "update-2": "Completed"})
    finished = STAGES[: STAGES.index(stage)]  # the stages of step 3 that wrote their file
    for name in STAGES[: STAGES.index(killed_in) if killed_in else None]:
        cached = name in finished and name in ("generate", "rewards", "teacher")  # update is never cached
        expected[f"{name}-{LAST}"] = "Cached" if cached else "Completed"
    return expected


def _assert_same_run(reference: Path, resumed: Path) -> None:
    a, b = RunPaths(reference), RunPaths(resumed)
    weights = Path("model") / "model.safetensors"
    assert (b.checkpoint(LAST) / weights).read_bytes() == (a.checkpoint(LAST) / weights).read_bytes()
    for step in range(STEPS):
        for name, table in (("rollouts", "rollouts"), ("rewards", "rewards"), ("teacher", "teacher_logprobs"),
                            ("advantages", "advantages"), ("metrics", "step_metrics")):
            fa = read_table(getattr(a, name)(step), table=table)
            fb = read_table(getattr(b, name)(step), table=table)
            timing = [c for c in fa.columns if TIMING.match(c)]
            assert fb.drop(timing).equals(fa.drop(timing)), f"{name} of step {step}"
    for path in (Path("offline") / "eval_baseline.parquet", b.evaluation(LAST).relative_to(b.root)):
        assert read_table(b.root / path, table="evaluations").equals(
            read_table(a.root / path, table="evaluations")), path


@pytest.mark.slow
def test_a_run_killed_inside_each_stage_in_turn_resumes_to_the_uninterrupted_result(flow_env, prefect_server,
                                                                                    reference):
    """One run, killed inside each stage of its last step in turn (`KDRL_FAULT=<stage>:3`, exit
    137), each kill in the rerun of the attempt before; step 3's rewards file is truncated (a
    partial copy, a full disk) before the rerun killed in the evaluation; a last, clean rerun
    finishes it. Every rerun marks the ghost of the attempt before Crashed (only that one: a
    RUNNING flow run of the same id in another folder is another run's) and resumes from the
    cache as far as it gets; the end result is bit-identical to the uninterrupted `reference`.
    (One chain of 6 processes instead of a kill and a rerun per stage: the same kills and
    resumptions, half the processes.)"""
    run_id = "killed-in-each-stage"
    killed = _kdrl_train(flow_env, run_id, fault=f"generate:{LAST}")
    where = f"attempt 1 (killed in generate:{LAST}); its output ends:\n{killed.stdout[-4000:]}"
    assert killed.returncode == 137, f"exit code {killed.returncode}, {where}"
    # kill -9 (exit 137, no cleanup) leaves its flow run RUNNING on the server: a ghost
    [ghost] = _flow_runs(prefect_server, run_id)  # flow runs are named after the run id
    assert ghost.state.type.value == "RUNNING", where
    # a run of the same id in another folder is another run: its ghost is not ours to end
    elsewhere = _running_flow_run(prefect_server, run_id, flow_env.runs_dir.with_name("elsewhere") / run_id)
    ran = {f"{name}-{step}": "Completed" for step in range(LAST) for name in STAGES[:4]}  # steps 0-2; not generate-3
    assert _task_states(killed.stdout) == {"evaluate--1": "Completed", **ran}, where
    previous, paths = "generate", RunPaths(flow_env.runs_dir / run_id)
    for attempt, stage in enumerate(("rewards", "teacher", "update", "evaluate", None), start=2):
        if stage == "evaluate":  # a cached file damaged after a kill (in update) is recomputed
            rewards = paths.rewards(LAST)
            rewards.write_bytes(rewards.read_bytes()[: rewards.stat().st_size // 2])
        rerun = _kdrl_train(flow_env, run_id, fault=stage and f"{stage}:{LAST}")
        link = (f"attempt {attempt} (after a kill in {previous}:{LAST}, "
                f"{f'killed in {stage}:{LAST}' if stage else 'to the end'})")
        where = f"{link}; its output ends:\n{rerun.stdout[-4000:]}"
        assert rerun.returncode == (137 if stage else 0), f"exit code {rerun.returncode}, {where}"
        # ... the rerun marks the ghost of the attempt before Crashed before it starts its own
        assert f"marked 1 earlier flow run(s) of {run_id} as Crashed" in rerun.stdout, where
        runs = [r for r in _flow_runs(prefect_server, run_id) if r.id != elsewhere]
        states = [r.state.type.value for r in runs]
        assert states == ["CRASHED"] * (attempt - 1) + ["RUNNING" if stage else "COMPLETED"], f"{states}, {where}"
        assert runs[-2].id == ghost.id and "process is gone" in runs[-2].state.message, where
        ghost = runs[-1]
        # Prefect's cache did the resuming: finished stages came back Cached, the rest ran
        expected = _expected_states_after_kill(previous, stage)
        if stage == "evaluate":
            # the truncated file: its task comes back Cached, then is recomputed (its last line, Completed); the
            # same bytes as before, so the teacher scores keyed on them stay Cached
            expected[f"rewards-{LAST}"] = "Completed"
        assert _task_states(rerun.stdout) == expected, where
        previous = stage
    _assert_same_run(reference, paths.root)
    assert {r.id: r.state.type.value for r in _flow_runs(prefect_server, run_id)}[elsewhere] == "RUNNING"


@pytest.mark.slow
def test_the_plain_loop_killed_in_the_final_evaluation_resumes_too(flow_env, reference):
    # the same resume rule without Prefect (`kdrl train --no-prefect`): no cache, files decide
    killed = _kdrl_train(flow_env, "plain-killed-in-evaluate", fault=f"evaluate:{LAST}", plain=True)
    assert killed.returncode == 137, killed.stdout[-4000:]
    resumed = _kdrl_train(flow_env, "plain-killed-in-evaluate", plain=True)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert f"resuming {flow_env.runs_dir / 'plain-killed-in-evaluate'} after step {LAST}" in resumed.stdout
    _assert_same_run(reference, flow_env.runs_dir / "plain-killed-in-evaluate")


def _flow_runs(api_url: str, name: str) -> list:
    """The flow runs named `name` (a run id), oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            return await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])),
                                               sort=FlowRunSort.EXPECTED_START_TIME_ASC)

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return asyncio.run(read())


def _running_flow_run(api_url: str, name: str, run_dir: Path):
    """A RUNNING kdrl-train flow run named `name` that works on `run_dir` (tagged as
    `crash_stale_flow_runs` tags it), as a driver killed there would leave; returns its id."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Running

    from flows.train import kdrl_train
    from tasks.housekeeping import run_tag

    async def create():
        async with get_client() as client:
            return await client.create_flow_run(kdrl_train, name=name, tags=[run_tag(run_dir)], state=Running())

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return asyncio.run(create()).id


def _flow_run_logs(api_url: str, flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return [log.message for log in asyncio.run(read())]


@pytest.mark.slow
def test_kdrl_warnings_reach_the_flow_runs_log_in_the_ui(flow_env, prefect_server, tiny_model_dir, tmp_path):
    # a local dataset with repeated questions: the count of dropped rows is a kdrl.data WARNING
    rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(8) for b in range(8)]
    (tmp_path / "dups.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:5]))
    settings = {**TINY, **SUBPROCESS, "run.steps": 1, "run.runs_dir": flow_env.runs_dir,
                "data.source": tmp_path / "dups.jsonl", "data.num_train": 40,
                "model.name_or_path": tiny_model_dir / "student", "teacher.name_or_path": tiny_model_dir / "teacher"}
    del settings["data.max_digits"]
    done = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--run-id", "dups", *_flags(settings)],
                          cwd=ROOT, env=flow_env.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-4000:]
    [run] = _flow_runs(prefect_server, "dups")
    assert any("5 duplicate row(s) dropped" in message for message in _flow_run_logs(prefect_server, run.id))


@pytest.mark.slow
def test_the_warm_start_is_a_task_with_progress_in_the_ui(flow_env, prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from kdrl.config import load_config
    from kdrl.embedded import cache_key

    settings = {**TINY, **SUBPROCESS, "run.runs_dir": tmp_path / "runs", "run.cache_dir": tmp_path / "cache",
                "run.steps": 1, "embedded.log_every_s": 0}
    done = _kdrl_train(SimpleNamespace(**{**vars(flow_env), "flags": _flags(settings)}), "fresh-cache")
    assert done.returncode == 0, done.stdout[-4000:]
    states = dict(re.findall(r"Task run '(warm-start-\w+)' - Finished in state (\w+)", done.stdout))
    assert states == {"warm-start-student": "Completed", "warm-start-teacher": "Completed"}, done.stdout[-4000:]
    assert re.search(r"\[embedded\]   step 1/3  loss", done.stdout)  # logged by the clock (every 0 s here)
    key = cache_key(load_config(None, [f"{k}={v}" for k, v in settings.items()]))

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="embedded-")))

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        artifacts = {a.key: a for a in asyncio.run(read())}
    for role in ("teacher", "student"):
        artifact = artifacts[f"embedded-{role}-{key}"]
        assert artifact.type == "progress" and artifact.data == 100.0


@pytest.mark.slow
@pytest.mark.parametrize("when", ["between-tasks", "inside-a-task"])
def test_sigterm_marks_the_flow_run_crashed_and_stops_the_local_server(when, flow_env, tmp_path, server_pids):
    """A scheduler's polite stop (SIGTERM to the process group, as `timeout` or a worker sends):
    exit 143 promptly with a word of what happened, the flow run Crashed on the server kdrl
    started itself, that server gone; the same command then resumes. The second case stops it
    inside a task (a long warm start), where Prefect's task engine sees the signal first."""
    import signal
    import sqlite3
    from contextlib import closing

    env = {k: v for k, v in flow_env.env.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    flags, marker = flow_env.flags, ("update-1", "Finished in state Completed")
    if when == "inside-a-task":  # a fresh embedded cache and a long teacher warm start
        flags = [*flags, "--set", f"run.cache_dir={tmp_path}/cache", "--set", "embedded.teacher_steps=2000",
                 "--set", "embedded.log_every_s=0"]
        marker = ("warm-start-teacher", "step 3/2000")
    argv = [sys.executable, "-m", "flows.cli", "train", "--run-id", "terminated", *flags]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, url, sent = [], None, None
    for line in proc.stdout:
        lines.append(line)
        url = url or (re.search(r"local Prefect server at (\S+)", line) or [None, None])[1]
        if all(m in line for m in marker):
            os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as a terminal or a supervisor does
            sent = time.monotonic()
            break
    try:
        lines.append(proc.communicate(timeout=120)[0])
    except subprocess.TimeoutExpired:  # hung: its stacks (PYTHONFAULTHANDLER) say where
        proc.send_signal(signal.SIGABRT)
        lines.append(proc.communicate(timeout=60)[0])
    code = proc.returncode
    out = "".join(lines)
    assert sent is not None, out[-4000:]
    took = time.monotonic() - sent
    assert (code, took < 30) == (143, True), (f"exit code {code} {took:.0f} s after SIGTERM; "
                                              f"output before:\n{out[-3000:]}")
    assert "kdrl train: stopped by SIGTERM while running the kdrl-train flow" in out, out[-4000:]
    assert url is not None and server_pids(url) == []
    # that server is gone; its database (SQLite, in the PREFECT_HOME it was given) says how the flow run ended
    with closing(sqlite3.connect(tmp_path / "home" / "prefect.db")) as db:
        states = db.execute("SELECT state_type FROM flow_run WHERE name = 'terminated'").fetchall()
    assert states == [("CRASHED",)], states
    if when == "between-tasks":
        resumed = _kdrl_train(flow_env, "terminated")
        assert resumed.returncode == 0, resumed.stdout[-4000:]


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("plain", [False, True], ids=["flow", "no-prefect"])
def test_a_locked_run_is_refused_and_left_as_it_was(plain, tmp_path, capsys, prefect_harness, embedded_cache,
                                                    locked_by_subprocess):
    run_dir = tmp_path / "runs" / "busy"
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("written before the refused attempt\n")
    argv = ["train", "--run-id", "busy",
            *_flags({**TINY, "run.runs_dir": tmp_path / "runs", "run.cache_dir": embedded_cache})]
    with locked_by_subprocess(run_dir) as holder:
        before = _snapshot(run_dir)
        code = main(argv + (["--no-prefect"] if plain else []))
        after = _snapshot(run_dir)
    assert code == 3
    err = capsys.readouterr().err
    assert f"kdrl: run {run_dir} is locked by PID {holder.pid} on " in err
    assert after == before and set(before) == {".lock", "notes.txt"}  # no config.yaml, no prompts: refused first


def test_tasks_run_without_the_engine(tmp_path, embedded_cache):
    from kdrl.config import load_config
    from kdrl.handoff import Artifact
    from kdrl.stages import score_rewards
    from tasks import train as t

    # no run.num_threads here: it would change torch's thread count for the rest of this process
    cfg = load_config(overrides=[f"{k}={v}" for k, v in
                                 {**TINY, "run.runs_dir": tmp_path / "runs", "run.cache_dir": embedded_cache}.items()])
    run_dir = str(tmp_path / "runs" / "fn")
    paths = RunPaths(Path(run_dir))
    opened = t.open_run.fn(run_dir, cfg)
    assert opened.start == 0
    run, prompts = opened.info, opened.prompts
    try:
        generated = t.generate.fn(run, opened.rollout, prompts, 0)
        rewarded = t.rewards.fn(run, generated, prompts, 0)
        scored = t.teacher.fn(run, opened.teacher, generated, rewarded, 0)
        updated = t.update.fn(run, opened.student, opened.rollout, generated, rewarded, scored, 0)

        # cache keys come from the inputs: the rewards key is the content of its input files, the
        # generate key the run and the step
        ctx = SimpleNamespace(task=SimpleNamespace(name="rewards"))
        inputs = {"run": run, "rollouts": generated, "prompts": prompts, "step": 0}
        key = t.stage_key(ctx, inputs)
        assert key == t.stage_key(ctx, dict(inputs))
        gen = SimpleNamespace(task=SimpleNamespace(name="generate"))
        gen_inputs = {"run": run, "rollout": opened.rollout, "prompts": prompts, "teacher_samples": None}
        assert t.stage_key(gen, {**gen_inputs, "step": 0}) != t.stage_key(gen, {**gen_inputs, "step": 1})
        rollouts = read_table(paths.rollouts(0), table="rollouts")
        changed = rollouts.with_columns(
            pl.when(pl.col("sample_idx") == 0).then(pl.lit("x")).otherwise("completion_text").alias("completion_text"))
        write_table(changed, paths.rollouts(0), table="rollouts")
        assert t.stage_key(ctx, {**inputs, "rollouts": Artifact.of(paths.rollouts(0))}) != key
    finally:
        t.close_run.fn(opened)

    assert (generated.path, rewarded.path, scored.path, updated.path) == tuple(
        str(p) for p in (paths.rollouts(0), paths.rewards(0), paths.teacher(0), paths.metrics(0)))
    assert rollouts.height == 3 * 4 and rollouts["step"].unique().to_list() == [0]
    expected = score_rewards(rollouts, read_table(paths.prompts, table="prompts"), cfg.reward)
    got = read_table(rewarded.path, table="rewards")
    assert_frame_equal(got, expected.select(got.columns), check_dtypes=False)
    metrics = read_table(updated.path, table="step_metrics").row(0, named=True)
    assert metrics["step"] == 0 and metrics["teacher_tokens"] > 0 and metrics["beta"] == pytest.approx(5e-3)
    assert metrics["time_generate_s"] == generated.seconds and metrics["time_teacher_s"] == scored.seconds
    assert not (paths.checkpoint(0) / "trainer_state.pt").exists()  # checkpoint_every=2: the first is after step 1
