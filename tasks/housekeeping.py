"""Keeping Prefect's view of a run true to the run directory.

A driver killed by SIGKILL (or OOM, or a power cut) cannot tell the server that its flow run
ended, so the run stays RUNNING in the UI forever. Each training flow run carries a tag naming its
run directory (host + absolute path: run ids alone repeat, e.g. `grpo-s0` in every comparison).
The run lock says no other process works on that directory, so when a run starts, any other
RUNNING/PENDING flow run with its tag is such a ghost: it is marked Crashed, saying so.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run
from prefect.states import Crashed


def run_tag(run_dir: str | Path) -> str:
    """The tag of every flow run that works on `run_dir` on this host."""
    where = f"{socket.gethostname()}:{Path(run_dir).resolve()}"
    return "kdrl-run-" + hashlib.sha256(where.encode()).hexdigest()[:16]


def crash_stale_flow_runs(run_dir: str | Path) -> int:
    """Tag the current flow run with `run_tag(run_dir)` and mark every other RUNNING or PENDING
    flow run with that tag as Crashed; returns how many. Call it only while holding the run's lock."""
    tag, current = run_tag(run_dir), flow_run.id
    with get_client(sync_client=True) as client:
        if current is not None:
            client.update_flow_run(current, tags=sorted({*client.read_flow_run(current).tags, tag}))
        stale = [r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                     tags=FlowRunFilterTags(all_=[tag]),
                     state=FlowRunFilterState(
                         type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))))
                 if str(r.id) != str(current)]
        for run in stale:
            client.set_flow_run_state(run.id, Crashed(message=(
                f"its process is gone (nothing held the lock of {run_dir}): found when the run was started again; "
                "the run directory holds everything it finished")), force=True)
    if stale:
        get_run_logger().warning("marked %d earlier flow run(s) of %s as Crashed (their process had died without "
                                 "saying so): %s", len(stale), Path(run_dir).name, ", ".join(r.name for r in stale))
    return len(stale)
