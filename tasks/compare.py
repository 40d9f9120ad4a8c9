"""Prefect tasks of `kdrl compare`: write the comparison tables and publish them.

The runs themselves are `kdrl-train` subflows (flows/compare.py). These tasks only read the run
folders, so none is cached: each call reflects the runs as they are on disk.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from kdrl.compare import (
    CompareOutput,
    load_plan,
    markdown_with_inline_plot,
    plan_compare,
    prepare,
    write_comparison,
)
from tasks.logs import info
from tasks.report import artifact_key


@task(cache_policy=NO_CACHE)
def open_compare(config_path: str | None, overrides: list[str], arms: list[str], seeds: int, name: str | None) -> str:
    """Validate every run's config, create the comparison folder (or check it holds this same
    comparison); returns the folder."""
    plan = plan_compare(config_path, overrides, arms=tuple(arms), seeds=seeds, name=name)
    prepare(plan)
    return str(plan.root)


@task(cache_policy=NO_CACHE)
def summarize(root: str, wall_s: list[tuple[str, int, float]], plot: bool = True) -> CompareOutput:
    """(Re)write runs/curves/comparison Parquet, comparison.md and (plot) comparison.png.
    wall_s: (arm, seed, seconds) measured by the flow for the runs it trained."""
    return write_comparison(load_plan(root), {(arm, seed): s for arm, seed, s in wall_s}, plot=plot)


@task(cache_policy=NO_CACHE)
def track(root: str) -> None:
    """The comparison's table and plot to the arms' trackers (run.report_to), as one run of its own."""
    from kdrl.trackers import report_comparison

    plan = load_plan(root)
    report_comparison(plan.config(plan.arms[0], plan.seeds[0]), root, log=info)


@task(cache_policy=NO_CACHE)
def publish(root: str) -> str:
    """A markdown artifact with the comparison table and the plot inlined."""
    markdown = markdown_with_inline_plot(load_plan(root))
    create_markdown_artifact(markdown, key=artifact_key(root, "comparison"),
                             description=f"kdrl compare {Path(root).name}")
    return markdown
