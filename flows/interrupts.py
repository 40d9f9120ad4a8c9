"""Stopping `kdrl` on SIGTERM or Ctrl-C at a safe point, and always within a bound.

Python runs a signal handler in the main thread between two bytecodes, wherever that thread is.
A handler that raises there can leave a lock held: an exception raised as `with lock:` calls
`__exit__` skips the release. httpcore's connection pool takes a non-reentrant lock around every
request, and the Prefect client is called often (a progress artifact every warm-start step), so
now and then the exception that stops a run left that lock held, and Prefect's report of the
crash, made through the same client, then waited on it forever: a SIGTERMed `kdrl train` hung.

`at_a_safe_point(handler)` wraps a handler so that it raises only where the main thread holds no
library's lock. The innermost frames are walked outward to the first frame of kdrl's own code
(`kdrl`, `flows`, `tasks`); if any of them belongs to a library in LOCK_HOLDERS (HTTP, logging,
threading, Prefect's engine, ...), the signal is put off and delivered again every 10 ms until
the main thread is out of them, or after `force_after_s` (3 s) in any case. A stop raises once:
signals that arrive after it (re-deliveries in flight, Prefect handing the signal back to the
previous handler, a second Ctrl-C) are ignored, and a backstop ends the process `backstop_s`
(30 s) after the first signal, with every thread's stack on stderr, if the clean-up itself hangs.

The same wrapper is put around Prefect's own SIGTERM handler (`wrap_prefects_sigterm_bridge`),
which a flow run installs in place of ours: it raises Prefect's `TerminationSignal`, so the flow
run is still marked Crashed, or Cancelled when a worker cancels it.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

# Top-level packages whose frames may be holding a lock (or be half-way through a protocol) that
# the clean-up after a stop needs: the HTTP stack of the Prefect client, logging, threads and
# queues, context-manager exits, subprocesses, and Prefect's engine, client and log workers.
LOCK_HOLDERS = frozenset({
    "httpx", "httpcore", "h11", "h2", "anyio", "sniffio", "ssl", "socket", "selectors", "asyncio",
    "threading", "queue", "concurrent", "logging", "contextlib", "subprocess", "prefect", "sqlite3",
})
OURS = frozenset({"kdrl", "flows", "tasks"})

Handler = Callable[[int, FrameType | None], object]


class _Stop:
    """One installation's stop: the first signal's number and time, whether a handler raised, and
    the helper thread that delivers a put-off signal again and runs the backstop. The thread is
    started by `install`, not by a handler: starting a thread takes threading's own lock, which the
    main thread may hold where the signal found it."""

    def __init__(self, force_after_s: float, backstop_s: float) -> None:
        self.force_after_s, self.backstop_s = force_after_s, backstop_s
        self.signum: int | None = None
        self.first = 0.0
        self.raised = False
        self.signalled = threading.Event()  # the first signal arrived
        self.pending = threading.Event()  # a signal was put off: deliver it again soon
        self.retired = False
        threading.Thread(target=self._run, name="kdrl-stop", daemon=True).start()

    def _run(self) -> None:
        self.signalled.wait()
        main = threading.main_thread().ident
        deadline = self.first + self.backstop_s
        while not self.retired and (left := deadline - time.monotonic()) > 0:
            if self.pending.wait(timeout=left) and not self.retired:
                time.sleep(0.01)
                if self.pending.is_set() and not self.raised:
                    self.pending.clear()  # the handler sets it again if it has to wait longer
                    signal.pthread_kill(main, self.signum)
        if not self.retired:
            self._backstop()

    def _backstop(self) -> None:
        try:
            print(f"\nkdrl: still running {self.backstop_s:.0f} s after {signal.Signals(self.signum).name}; exiting"
                  " now without the rest of the clean-up (the flow run may stay Running until the run is"
                  " resumed). Please report this with the stacks below.", file=sys.stderr, flush=True)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
        except (OSError, ValueError):  # nobody reads our output any more
            pass
        os._exit(128 + self.signum)

    def retire(self) -> None:
        self.retired = True
        self.signalled.set()
        self.pending.set()


_stop: _Stop | None = None


def stop_signal() -> int | None:
    """The signal that is stopping this process (its first one), or None."""
    return None if _stop is None else _stop.signum


def holds_library_locks(frame: FrameType | None) -> bool:
    """Whether the main thread, stopped at `frame`, may be inside a library's critical section:
    a frame of a LOCK_HOLDERS package before (inward of) the first frame of kdrl's own code.

    >>> holds_library_locks(None)
    False
    """
    while frame is not None:
        package = str(frame.f_globals.get("__name__", "")).partition(".")[0]
        if package in OURS:
            return False
        if package in LOCK_HOLDERS:
            return True
        frame = frame.f_back
    return False


def at_a_safe_point(handler: Handler) -> Handler:
    """`handler` (which raises to stop the process), called only where raising is safe, once per
    stop; see the module docstring. Without `install`, `handler` is called as it is."""

    def deferred(signum: int, frame: FrameType | None) -> object:
        stop = _stop
        if stop is None:
            return handler(signum, frame)
        if stop.raised:
            return None  # already stopping: a re-delivery in flight, a handed-back or a second signal
        if stop.signum is None:
            stop.signum, stop.first = signum, time.monotonic()
            stop.signalled.set()
        if holds_library_locks(frame) and time.monotonic() - stop.first < stop.force_after_s:
            stop.pending.set()
            return None
        stop.raised = True
        return handler(signum, frame)

    deferred.__wrapped__ = handler  # type: ignore[attr-defined]
    return deferred


def install(handlers: dict[int, Handler], *, force_after_s: float = 3.0,
            backstop_s: float = 30.0) -> Callable[[], None]:
    """Install `handlers` ({signum: a handler that raises}) behind `at_a_safe_point`; returns the
    function that puts the previous handlers back and retires the helper. Main thread only.
    (Prefect's own SIGTERM handler is wrapped by `wrap_prefects_sigterm_bridge`, once Prefect is
    about to run a flow.)"""
    global _stop
    if _stop is not None:
        _stop.retire()
    _stop = stop = _Stop(force_after_s, backstop_s)
    previous = {signum: signal.signal(signum, at_a_safe_point(handler)) for signum, handler in handlers.items()}

    def restore() -> None:
        global _stop
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        stop.retire()
        if _stop is stop:
            _stop = None

    return restore


def wrap_prefects_sigterm_bridge() -> None:
    """Put `at_a_safe_point` around the SIGTERM handler that a Prefect flow run installs for its
    duration (`prefect.utilities.engine.capture_sigterm` looks it up by this module global each
    time). Idempotent. Without it, Prefect's handler raises wherever the main thread is."""
    import prefect.utilities.engine as engine

    bridge = engine._prefect_sigterm_handler
    if getattr(bridge, "__wrapped__", None) is None:
        engine._prefect_sigterm_handler = at_a_safe_point(bridge)
