"""The run lock: one holder per run directory across processes and within one, released by the
kernel when the holder dies (even by SIGKILL), and readable without disturbing anyone."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import threading
import time

import pytest

from kdrl.runlock import RunLockedError, hold_run_lock, lock_holder


def test_another_process_is_refused_with_holder_and_advice(tmp_path, locked_by_subprocess):
    run_dir = tmp_path / "runs" / "r1"
    with locked_by_subprocess(run_dir) as proc:
        with pytest.raises(RunLockedError) as info:
            with hold_run_lock(run_dir):
                pytest.fail("acquired a lock another process holds")
    message = str(info.value)
    assert str(run_dir) in message and f"PID {proc.pid} on " in message
    assert "another `kdrl train` is using this run; wait for it, or stop PID" in message
    assert info.value.holder["pid"] == proc.pid and info.value.run_dir == run_dir


def test_sigkilled_holder_releases_at_once(tmp_path, locked_by_subprocess):
    run_dir = tmp_path / "r"
    with locked_by_subprocess(run_dir) as proc:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert (run_dir / ".lock").exists()  # the dead holder's file stays; only the lock is gone
        start = time.monotonic()
        with hold_run_lock(run_dir, wait_s=0.0) as note:
            assert note["pid"] == os.getpid()
        assert time.monotonic() - start < 0.5


def test_second_hold_in_the_same_process_is_refused(tmp_path):
    # flock belongs to the open file description: a second open()+flock in this process conflicts.
    with hold_run_lock(tmp_path) as me:
        with pytest.raises(RunLockedError, match=f"stop PID {me['pid']}"):
            with hold_run_lock(tmp_path, wait_s=0.0):
                pass
    with hold_run_lock(tmp_path, wait_s=0.0):  # released on exit: free again
        pass


def test_lock_file_holds_the_note_and_survives_release(tmp_path):
    with hold_run_lock(tmp_path / "new" / "run") as note:
        assert set(note) == {"pid", "host", "started"}
        assert json.loads((tmp_path / "new" / "run" / ".lock").read_text()) == note
    assert (tmp_path / "new" / "run" / ".lock").exists()


def test_acquire_rewrites_a_longer_stale_note(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "x" * 500, "started": "long ago"}))
    with hold_run_lock(tmp_path) as note:
        assert json.loads((tmp_path / ".lock").read_text()) == note  # truncated, not overlaid


def test_lock_holder_reports_the_other_process(tmp_path, locked_by_subprocess):
    assert lock_holder(tmp_path / "absent") is None
    assert not (tmp_path / "absent").exists()  # probing creates nothing
    with locked_by_subprocess(tmp_path) as proc:
        holder = lock_holder(tmp_path)
        assert holder["pid"] == proc.pid and holder["host"] and holder["started"]
        assert lock_holder(tmp_path) == holder  # probing twice changes nothing
    assert lock_holder(tmp_path) is None


def test_acquire_rides_out_a_probe(tmp_path):
    # A reader's shared lock (what lock_holder takes for an instant) must not refuse a real start.
    (tmp_path / ".lock").touch()
    fd = os.open(tmp_path / ".lock", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    with pytest.raises(RunLockedError):  # without the grace period, the probe would refuse us
        with hold_run_lock(tmp_path, wait_s=0.0):
            pass
    releaser = threading.Timer(0.05, lambda: os.close(fd))
    releaser.start()
    try:
        with hold_run_lock(tmp_path, wait_s=5.0) as note:
            assert note["pid"] == os.getpid()
    finally:
        releaser.join()


def test_a_held_lock_without_a_note_yet_reads_as_unknown(tmp_path):
    (tmp_path / ".lock").touch()
    fd = os.open(tmp_path / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert lock_holder(tmp_path) == {"pid": None, "host": None, "started": None}
        with pytest.raises(RunLockedError, match="has not recorded itself yet"):
            with hold_run_lock(tmp_path, wait_s=0.0):
                pass
    finally:
        os.close(fd)
