"""Stopping at a safe point (flows/interrupts.py): a signal that finds the main thread inside a
library that may hold a lock is delivered again once it is out, or after `force_after_s`; a stop
raises once; a clean-up that hangs is ended by the backstop. SIGUSR1 stands in for SIGTERM, so
that pytest's own handlers are left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flows import interrupts

ROOT = Path(__file__).resolve().parents[1]


class Stop(BaseException):
    pass


def _raise_stop(signum, frame):
    raise Stop()


def _module_function(module: str, source: str, name: str):
    """A function whose frames belong to module `module` (as a library's would)."""
    namespace = {"__name__": module}
    exec(textwrap.dedent(source), namespace)
    return namespace[name]


SPIN = """
    import os, time

    def spin(seconds, signum=None, then=None):
        if signum is not None:
            os.kill(os.getpid(), signum)
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            pass
        if then is not None:
            return then()
    """


@pytest.fixture
def installed():
    restores = []

    def install(**kwargs):
        restores.append(interrupts.install({signal.SIGUSR1: _raise_stop}, **kwargs))

    yield install
    for restore in restores:
        restore()


def test_a_frame_of_kdrl_code_is_safe_however_deep_in_a_library_it_was_called():
    inside_httpcore = _module_function("httpcore._sync.fake", SPIN, "spin")
    kdrl_code = _module_function("kdrl.fake", "import sys\ndef here():\n    return sys._getframe()", "here")
    httpcore_frame = _module_function("httpcore._sync.fake", "import sys\ndef here():\n    return sys._getframe()",
                                      "here")
    assert interrupts.holds_library_locks(httpcore_frame())
    assert not interrupts.holds_library_locks(kdrl_code())
    assert not interrupts.holds_library_locks(sys._getframe())  # pytest's frames and this test's: no library's
    # other code called from inside httpcore is inside httpcore still; kdrl's own code is not
    assert inside_httpcore(0.0, then=lambda: interrupts.holds_library_locks(sys._getframe()))
    assert not interrupts.holds_library_locks(inside_httpcore(0.0, then=kdrl_code))


def test_a_signal_inside_a_lock_holding_library_is_raised_once_the_main_thread_is_out_of_it(installed):
    installed()
    inside_httpcore = _module_function("httpcore._sync.fake", SPIN, "spin")
    returned = False
    with pytest.raises(Stop):
        inside_httpcore(0.3, signum=signal.SIGUSR1)  # the signal is handled (and put off) in there
        returned = True
        time.sleep(1.0)  # the re-delivery interrupts the sleep
    assert returned
    assert interrupts.stop_signal() == signal.SIGUSR1


def test_a_signal_is_raised_in_the_library_after_force_after_s(installed):
    installed(force_after_s=0.2)
    inside_logging = _module_function("logging.fake", SPIN, "spin")
    returned = False
    with pytest.raises(Stop):
        inside_logging(3.0, signum=signal.SIGUSR1)
        returned = True
    assert not returned


def test_a_stop_raises_once_and_a_signal_in_kdrl_code_at_once(installed):
    installed()
    with pytest.raises(Stop):
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGUSR1)  # already stopping: ignored
    time.sleep(0.05)


def test_prefects_sigterm_bridge_is_wrapped_once():
    import prefect.utilities.engine as engine

    interrupts.wrap_prefects_sigterm_bridge()
    wrapped = engine._prefect_sigterm_handler
    interrupts.wrap_prefects_sigterm_bridge()
    assert engine._prefect_sigterm_handler is wrapped
    assert wrapped.__wrapped__.__module__ == "prefect.utilities.engine"


def test_a_clean_up_that_hangs_is_ended_by_the_backstop_with_the_stacks():
    script = textwrap.dedent("""
        import os, signal, threading
        from flows import interrupts

        class Stop(BaseException):
            pass

        def stop(signum, frame):
            raise Stop()

        interrupts.install({signal.SIGTERM: stop}, backstop_s=1.0)
        lock = threading.Lock()
        lock.acquire()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            threading.Event().wait(30)
        except Stop:
            print("stopping", flush=True)
            lock.acquire()  # a clean-up that never ends
        """)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert time.monotonic() - started < 20
    assert done.stdout == "stopping\n"
    assert "kdrl: still running 1 s after SIGTERM; exiting now" in done.stderr
    assert "most recent call first" in done.stderr and "lock.acquire()" not in done.stdout
