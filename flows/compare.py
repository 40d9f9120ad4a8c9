"""The `kdrl-compare` flow: one `kdrl-train` subflow per (arm, seed), then the comparison.

Control flow only. Runs go seed-major (every arm's first seed before any second seed), a run that
is already complete is skipped, and the tables are rewritten after every run, so a stopped
comparison is read as far as it got and rerunning the same command finishes it.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger

from kdrl.compare import DEFAULT_ARMS, load_plan
from kdrl.runlock import hold_run_lock
from kdrl.runs import is_complete
from flows.train import kdrl_train
from tasks import compare as c


@flow(name="kdrl-compare")
def kdrl_compare(config_path: str | None = None, overrides: list[str] | None = None, arms: list[str] | None = None,
                 seeds: int = 3, steps: int | None = None, eval_samples: int = 4, eval_temperature: float = 0.6,
                 eval_every: int = 10, name: str | None = None) -> str:
    """Train every arm for every seed on the same config (held-out pass@1 over `eval_samples`
    samples at `eval_temperature`, every `eval_every` steps); returns the comparison folder."""
    root = c.open_compare(config_path, list(overrides or []), list(arms or DEFAULT_ARMS), seeds, name,
                          {"steps": steps, "eval_samples": eval_samples, "eval_temperature": eval_temperature, "eval_every": eval_every})
    plan = load_plan(root)
    logger = get_run_logger()
    with hold_run_lock(root):
        wall: list[tuple[str, int, float]] = []
        for arm, seed in plan.runs():
            run_id = plan.run_id(arm, seed)
            if is_complete(plan.run_dir(arm, seed)):
                logger.info("%s is complete: skipped", run_id)
                continue
            started = time.perf_counter()
            kdrl_train.with_options(flow_run_name=run_id)(config_path, plan.run_overrides(arm, seed), run_id)
            wall.append((arm, seed, time.perf_counter() - started))
            c.summarize(root, wall, plot=False)
        c.summarize(root, wall, plot=True)
        c.publish(root)
    logger.info("comparison written to %s/comparison.md", root)
    return root
