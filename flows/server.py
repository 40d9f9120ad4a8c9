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


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the local Prefect server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(f"the local Prefect server at {url} was not ready after {timeout_s:.0f} s")


@contextmanager
def local_server(*, env: dict[str, str] | None = None, log_path: str | None = None, timeout_s: float = 90.0) -> Iterator[str]:
    """Start `prefect server start` on a free loopback port at lower priority; yield its API URL.
    `env` replaces the server's environment (e.g. another PREFECT_HOME); `log_path` keeps its output."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
           "--analytics-off", "--no-ui"]
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_lower_priority_and_die_with_parent)
    try:
        _wait_healthy(url, proc, timeout_s)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log_path:
            out.close()
