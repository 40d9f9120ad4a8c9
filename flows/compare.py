"""The `kdrl-compare` flow: one `kdrl-train` run per (arm, seed), then the comparison.

Control flow only, written once: `run_comparison` is the body of the flow and of
`kdrl compare --no-prefect` (through `flows.runner`). Runs go seed-major (every arm's first seed
before any second seed), a run that is already complete is skipped, and the tables are rewritten
after every run, so a stopped comparison is read as far as it got and rerunning the same command
finishes it. Under Prefect each run is a `kdrl-train` subflow named after its run id.

The same command started again while one is working shares the work: each run is trained by
whoever takes its run lock first (`kdrl.runlock`), a run another process is training is skipped,
and the tables are rewritten under the comparison folder's lock. So N copies of the command use N
cores or GPUs; the last one to finish writes the complete tables.
"""

from __future__ import annotations

import functools
import time

from prefect import flow

from flows.runner import PlainStages, PrefectStages
from flows.train import kdrl_train, run_training
from kdrl.compare import DEFAULT_ARMS, load_plan, protocol_overrides
from kdrl.runlock import RunLockedError, hold_run_lock, lock_holder
from kdrl.runs import is_complete
from tasks import compare as c
from tasks.logs import info

SUMMARY_WAIT_S = 600.0
"""How long a process waits for another one's rewrite of the comparison's tables to finish."""


def run_comparison(config_path: str | None, overrides: list[str], arms: list[str], seeds: int, name: str | None,
                   stages: PrefectStages | PlainStages) -> str:
    """Train every arm for every seed; returns the comparison folder (see `kdrl.compare.plan_compare`)."""
    root = stages(c.open_compare, config_path, overrides, arms, seeds, name)
    plan = load_plan(root)
    wall: list[tuple[str, int, float]] = []
    for arm, seed in plan.runs():
        run_id, run_dir = plan.run_id(arm, seed), plan.run_dir(arm, seed)
        if is_complete(run_dir):
            info(f"{run_id} is complete: skipped")
            continue
        holder = lock_holder(run_dir)
        if holder is not None:
            info(f"{run_id} is being trained by PID {holder['pid']} on {holder['host']}: skipped")
            continue
        started = time.perf_counter()
        plain = functools.partial(run_training, plan.config(arm, seed), str(run_dir), PlainStages())
        try:
            stages.subflow(kdrl_train, run_id, plain,
                           config_path=config_path, overrides=plan.run_overrides(arm, seed), run_id=run_id)
        except RunLockedError as err:  # another process took it between the check and the start
            info(f"{run_id}: {err}: skipped")
            continue
        wall.append((arm, seed, time.perf_counter() - started))
        with hold_run_lock(root, wait_s=SUMMARY_WAIT_S):
            stages(c.summarize, root, wall, plot=False)
    with hold_run_lock(root, wait_s=SUMMARY_WAIT_S):
        stages(c.summarize, root, wall, plot=True)
    stages.report(c.publish, root)
    stages(c.track, root)  # the table and plot to run.report_to's trackers (none by default)
    busy = [plan.run_id(arm, seed) for arm, seed in plan.runs() if lock_holder(plan.run_dir(arm, seed)) is not None]
    if busy:
        info(f"{len(busy)} run(s) not complete yet ({', '.join(busy[:4])}{', …' if len(busy) > 4 else ''}): "
             "another process is training them, and whoever finishes last rewrites the tables")
    info(f"comparison written to {root}/comparison.md")
    return root


@flow(name="kdrl-compare")
def kdrl_compare(config_path: str | None = None, overrides: list[str] | None = None, arms: list[str] | None = None,
                 seeds: int = 3, steps: int | None = None, eval_samples: int | None = None,
                 eval_temperature: float | None = None, eval_every: int | None = None, name: str | None = None) -> str:
    """Train every arm for every seed on the same config; returns the comparison folder. steps and
    eval_*: the run config keys run.steps and run.eval_* (default: kdrl.config.COMPARE_PROTOCOL, held-out
    pass@1 over 4 samples at T=0.6 every 10 steps), the same as `--set run.eval_samples=...`."""
    overrides = protocol_overrides(overrides or [], steps=steps, eval_samples=eval_samples,
                                   eval_temperature=eval_temperature, eval_every=eval_every)
    return run_comparison(config_path, overrides, list(arms or DEFAULT_ARMS), seeds, name, PrefectStages())
