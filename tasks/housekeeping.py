"""Keeping Prefect's view of a run true to the run directory.

A driver killed by SIGKILL (or OOM, or a power cut) cannot tell the server that its flow run
ended, so the run stays RUNNING in the UI forever. The run lock says no other process works on
the run directory, so when a run starts, any other RUNNING/PENDING flow run of the same name (=
run id) is such a ghost: it is marked Crashed, saying so.
"""

from __future__ import annotations

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterName,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run
from prefect.states import Crashed


def crash_stale_flow_runs(run_name: str) -> int:
    """Mark every RUNNING or PENDING flow run named `run_name`, other than the current one, as
    Crashed; returns how many. Call it only while holding the run's lock."""
    current = flow_run.id
    with get_client(sync_client=True) as client:
        stale = [r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                     name=FlowRunFilterName(any_=[run_name]),
                     state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))))
                 if str(r.id) != str(current)]
        for run in stale:
            client.set_flow_run_state(run.id, Crashed(message=(
                f"its process is gone (no lock holder): found when {run_name} was started again; "
                "the run directory holds everything it finished")), force=True)
    if stale:
        get_run_logger().warning("marked %d earlier flow run(s) of %s as Crashed (their process had died without "
                                 "saying so): %s", len(stale), run_name, ", ".join(str(r.id) for r in stale))
    return len(stale)
