"""The nightly deployment really fires: `prefect.yaml` deployed against a real `prefect server`
(the one `kdrl train` starts, services on, not the test harness) gets SCHEDULED flow runs from the
server's scheduler within a bounded wait.

Why a whole server: a registered, active cron schedule proves nothing. With SQLAlchemy 2.1 the
scheduler service of Prefect 3.7 failed on every loop ("Can't evaluate bulk DML statement") while
`prefect deployment ls` showed the schedule as active and manual runs worked; nothing ran at night.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from datetime import timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOOP_SECONDS = 5  # the scheduler's loop; Prefect's default is 60
WAIT_S = 120  # bound on the wait: several loops, on a loaded 2-core box


def _prefect(args: list[str], env: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-4000:]}"


async def _scheduled_runs(deployment_name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    async with get_client() as client:
        deployment = await client.read_deployment_by_name(deployment_name)
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
        )


@pytest.mark.slow
def test_the_nightly_deployment_gets_scheduled_flow_runs_from_a_real_server(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.server import local_server

    home = tmp_path / "prefect_home"
    base = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "KDRL_FAULT")}
    server_env = {**base, "PREFECT_HOME": str(home),
                  "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": str(LOOP_SECONDS)}
    with local_server(env=server_env, log_path=str(tmp_path / "server.log")) as url:
        # "{{ $PWD }}" in prefect.yaml is the PWD variable, which a shell's `cd` sets and cwd= does not
        client_env = {**base, "PREFECT_API_URL": url, "PREFECT_HOME": str(home), "PWD": str(ROOT)}
        _prefect(["work-pool", "create", "kdrl-process", "--type", "process"], client_env)
        _prefect(["--no-prompt", "deploy", "--all"], client_env)
        deployed = time.monotonic()
        with temporary_settings(updates={PREFECT_API_URL: url}):
            runs = []
            while not runs and time.monotonic() - deployed < WAIT_S:
                time.sleep(2)
                runs = asyncio.run(_scheduled_runs("kdrl-train/nightly"))
            manual = asyncio.run(_scheduled_runs("kdrl-train/manual"))
        waited = time.monotonic() - deployed
        log = (tmp_path / "server.log").read_text(errors="replace")  # before shutdown adds its own lines
    assert runs, (f"no SCHEDULED flow run for kdrl-train/nightly {waited:.0f} s after `prefect deploy --all` "
                  f"(scheduler loop {LOOP_SECONDS} s); the server's log ends:\n{log[-3000:]}")
    print(f"\n{len(runs)} SCHEDULED runs of kdrl-train/nightly {waited:.0f} s after deploy; first at "
          f"{min(r.expected_start_time for r in runs).isoformat()}")
    for run in runs:  # every one at 02:00 UTC, with the deployment's parameters
        start = run.expected_start_time.astimezone(timezone.utc)
        assert (start.hour, start.minute) == (2, 0), start
        assert run.parameters["run_id"] == "nightly-{date}"
    assert manual == []  # the manual deployment has no schedule
    assert "Traceback" not in log, log[-3000:]
