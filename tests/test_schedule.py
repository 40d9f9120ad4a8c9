"""prefect.yaml's deployments, on a real `prefect server` (the one `kdrl train` starts, services
on, not the test harness): `prefect deploy --all` deploys them as documented, and the nightly one
really fires: the server's scheduler gives it SCHEDULED flow runs within a bounded wait.

Why a whole server: a registered, active cron schedule proves nothing. With SQLAlchemy 2.1 the
scheduler service of Prefect 3.7 failed on every loop ("Can't evaluate bulk DML statement") while
`prefect deployment ls` showed the schedule as active and manual runs worked; nothing ran at night.

One server and one deploy serve both tests (a server and two `prefect` commands are ~20 s on 2
cores); the deployments are read while the scheduler's first loops run.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from datetime import timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LOOP_SECONDS = 5  # the scheduler's loop; Prefect's default is 60
WAIT_S = 120  # bound on the wait: several loops, on a loaded 2-core box


def _prefect(args: list[str], env: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-4000:]}"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A local server (scheduler loop LOOP_SECONDS) with prefect.yaml deployed to it: its API URL,
    when the deploy finished, and the server's log file. The server stops at module teardown."""
    from flows.server import local_server

    tmp = tmp_path_factory.mktemp("schedule")
    home = tmp / "prefect_home"
    base = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "KDRL_FAULT")}
    server_env = {**base, "PREFECT_HOME": str(home),
                  "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": str(LOOP_SECONDS)}
    with local_server(env=server_env, log_path=str(tmp / "server.log")) as url:
        # `prefect deploy` needs nothing else non-interactively: prefect.yaml names the work pool and
        # the pull step, --all skips the deployment picker and --no-prompt the "save?" questions. It
        # imports the entrypoint (flows/train.py), so it must run from the repository root. Its
        # "{{ $PWD }}" is the PWD environment variable, not the working directory: a shell's `cd`
        # sets it, subprocess(cwd=...) does not, so it is set here as a shell would.
        client_env = {**base, "PREFECT_API_URL": url, "PREFECT_HOME": str(home), "PWD": str(ROOT)}
        _prefect(["work-pool", "create", "kdrl-process", "--type", "process"], client_env)
        _prefect(["--no-prompt", "deploy", "--all"], client_env)
        yield SimpleNamespace(url=url, at=time.monotonic(), log=tmp / "server.log")


def _read_deployments(url: str, names: list[str]) -> list:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            return [await client.read_deployment_by_name(name) for name in names]

    with temporary_settings(updates={PREFECT_API_URL: url}):
        return asyncio.run(read())


def test_prefect_yaml_deploys_the_nightly_and_manual_deployments(deployed):
    nightly, manual = _read_deployments(deployed.url, ["kdrl-train/nightly", "kdrl-train/manual"])
    for deployment in (nightly, manual):
        assert deployment.entrypoint == "flows/train.py:kdrl_train" and deployment.work_pool_name == "kdrl-process"
        assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
        assert deployment.global_concurrency_limit.limit == 1
    [schedule] = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 2 * * *", "UTC", True)
    assert nightly.parameters == {"config_path": "data/configs/default.yaml", "overrides": [],
                                  "run_id": "nightly-{date}"}
    assert nightly.concurrency_options.collision_strategy == "CANCEL_NEW"  # a late night run never overlaps the next
    assert nightly.job_variables["env"]["HF_HUB_OFFLINE"] == "1"
    assert manual.schedules == [] and manual.parameters == {"config_path": None, "overrides": [], "run_id": None}
    assert manual.concurrency_options.collision_strategy == "ENQUEUE"
    [on_ray] = _read_deployments(deployed.url, ["kdrl-train/ray"])
    assert on_ray.entrypoint == "flows/train.py:kdrl_train" and on_ray.work_pool_name == "kdrl-process"
    from kdrl.config import load_config

    cfg = load_config(on_ray.parameters["config_path"], on_ray.parameters["overrides"])  # valid as deployed
    assert (cfg.cluster.backend, cfg.cluster.address) == ("ray", "auto")
    compare, evaluate = _read_deployments(deployed.url, ["kdrl-compare/compare", "kdrl-eval/eval"])
    assert compare.entrypoint == "flows/compare.py:kdrl_compare" and compare.parameters["seeds"] == 3
    assert evaluate.entrypoint == "flows/evaluate.py:kdrl_eval" and evaluate.parameters["dataset"] == "embedded"
    assert evaluate.parameters["evals_dir"].startswith("~/")  # outside the checkout the worker runs in
    # the deployed flows' parameters are the functions' (a renamed argument breaks the deployment)
    assert "checkpoint" in evaluate.parameter_openapi_schema["required"]
    assert set(compare.parameter_openapi_schema["properties"]) >= {"seeds", "steps", "eval_samples",
                                                                   "eval_temperature", "arms"}

    from flows.train import resolve_run_dir

    assert resolve_run_dir(load_config(), "nightly-{date}").name == "nightly-" + time.strftime("%Y%m%d", time.gmtime())


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


def test_the_nightly_deployment_gets_scheduled_flow_runs_from_a_real_server(deployed):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: deployed.url}):
        runs = []
        while not runs and time.monotonic() - deployed.at < WAIT_S:
            time.sleep(2)
            runs = asyncio.run(_scheduled_runs("kdrl-train/nightly"))
        manual = asyncio.run(_scheduled_runs("kdrl-train/manual"))
    waited = time.monotonic() - deployed.at
    log = deployed.log.read_text(errors="replace")
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
