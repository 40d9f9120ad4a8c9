"""Prefect artifacts for people watching a run in the UI (`prefect artifact ls`).

Small by design: the Parquet files stay the record; artifacts are a view of them.
"""

from __future__ import annotations

import re
from pathlib import Path
from uuid import UUID

import polars as pl
from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from kdrl.runs import run_metrics, student_heldout, summarize_evaluation
from kdrl.storage import RunPaths, read_table
from tasks.housekeeping import run_tag

_COLUMNS = ("step", "reward_mean", "kl_k1_mean", "beta", "loss", "response_len_mean", "heldout_pass_at_1",
            "time_generate_s", "time_reward_s", "time_teacher_s", "time_update_s", "time_sync_s", "time_total_s",
            "rollout_logp_gap_max")


MAX_TABLE_ROWS = 200  # the per-iteration table keeps every step up to this, then every k-th (and the last)


def artifact_key(folder: str | Path, suffix: str) -> str:
    """`<folder name>-<8 hex digits of host and absolute path>-<suffix>`: one key per folder, as
    run ids repeat (the arms of two comparisons, eval folders named `checkpoint`) and a key's
    latest version is what the UI shows. Keys allow lowercase letters, digits and dashes only.

    >>> key = artifact_key("/data/runs/grpo-s0", "report")
    >>> key.startswith("grpo-s0-") and key.endswith("-report") and len(key) == len("grpo-s0--report") + 8
    True
    >>> key != artifact_key("/data/other-comparison/grpo-s0", "report")
    True
    """
    name = re.sub(r"[^a-z0-9-]+", "-", Path(folder).name.lower()).strip("-")[:40] or "run"
    where = run_tag(folder).rsplit("-", 1)[1][:8]
    return f"{name}-{where}-{suffix}"


@task(cache_policy=NO_CACHE)
def start_progress(run_dir: str, done: int, total: int) -> UUID:
    """A progress artifact over the run's iterations."""
    return create_progress_artifact(progress=100.0 * done / max(total, 1), key=artifact_key(run_dir, "progress"),
                                    description=f"iterations of {Path(run_dir).name}")


# The rows published so far in this process, per run directory: each publish reads its own
# step's files, and earlier steps' only once (after a resume), not the whole run again.
_published: dict[str, dict[int, dict]] = {}


def _iteration_row(paths: RunPaths, step: int) -> dict:
    row = read_table(paths.metrics(step), table="step_metrics").row(0, named=True)
    row["heldout_pass_at_1"] = None
    if paths.evaluation(step).exists():
        heldout = student_heldout(read_table(paths.evaluation(step), table="evaluations"))
        row["heldout_pass_at_1"] = heldout["heldout_pass_at_1"][0] if len(heldout) else None
    # NaN (a gap not measured) is published as null by Prefect's TableArtifact
    return {k: (round(row[k], 6) if isinstance(row[k], float) else row[k]) for k in _COLUMNS}


@task(cache_policy=NO_CACHE, task_run_name="publish-{step}")
def publish_iteration(run_dir: str, step: int, progress_id: UUID, total: int) -> None:
    """The run's table artifact so far: one row per iteration up to `step` (reward, KL, β, length,
    held-out accuracy, stage seconds), so its latest version is the whole curve. Past
    MAX_TABLE_ROWS iterations, every k-th row and the last (each version is stored whole)."""
    paths, seen = RunPaths(Path(run_dir)), _published.setdefault(run_dir, {})
    for s in range(step):
        if s not in seen:
            seen[s] = _iteration_row(paths, s)
    seen[step] = _iteration_row(paths, step)  # always this step's own files, as written now
    stride = -(-(step + 1) // MAX_TABLE_ROWS)
    rows = [seen[s] for s in sorted({*range(0, step + 1, stride), step})]
    create_table_artifact(rows, key=artifact_key(run_dir, "iteration"), description=f"{Path(run_dir).name} step {step}")
    update_progress_artifact(progress_id, progress=100.0 * (step + 1) / max(total, 1))
    if (step + 1) % REPORT_EVERY == 0 and step + 1 < total:  # the last step's report is final_report's
        create_markdown_artifact(run_report(run_dir, step, final=False), key=artifact_key(run_dir, "report"),
                                 description=f"{Path(run_dir).name} after step {step}")


REPORT_EVERY = 10  # the run report (markdown with the learning-curve plot) is rebuilt every this many steps


def run_report(run_dir: str, last_step: int, *, final: bool) -> str:
    """Markdown: held-out accuracy before and at the latest evaluation, the learning-curve plot
    inlined as a PNG, and a thinned table of the curve."""
    import base64
    import io

    from kdrl.runs import run_curve_figure

    paths = RunPaths(Path(run_dir))
    state = "complete" if final else f"after step {last_step}"
    lines = [f"# kdrl run `{paths.root.name}` ({state})", "", "## Held-out accuracy", "",
             "| when | model | pass@1 | mean length | p90 length |", "|---|---|---|---|---|"]
    metrics = run_metrics(paths.root)
    evaluated = metrics.filter(pl.col("heldout_pass_at_1").is_not_null())["step"].to_list()
    baseline_path = paths.offline / "eval_baseline.parquet"
    baseline = teacher = None
    sources = [("before", baseline_path)] + ([(f"after step {evaluated[-1]}", paths.evaluation(evaluated[-1]))]
                                             if evaluated else [])
    for when, path in sources:
        if path.exists():
            for r in summarize_evaluation(read_table(path, table="evaluations")).iter_rows(named=True):
                lines.append(f"| {when} | {r['model']} | {r['pass_at_1']:.3f} | {r['mean_len']:.1f} | {r['p90_len']} |")
                if when == "before" and r["model"] == "student" and baseline is None:
                    baseline = r["pass_at_1"]
                if when == "before" and r["model"] == "teacher" and teacher is None:
                    teacher = r["pass_at_1"]
    if metrics.height:
        figure = run_curve_figure(metrics, baseline=baseline, teacher=teacher)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=72)
        import matplotlib.pyplot as plt

        plt.close(figure)
        lines += ["", "## Learning curve", "", f"![learning curve](data:image/png;base64,"
                  f"{base64.b64encode(buffer.getvalue()).decode()})"]
    lines += ["", "| step | reward | KL (k1) | β | KD share | held-out pass@1 | s/iter |",
              "|---|---|---|---|---|---|---|"]
    stride = max(1, metrics.height // 20)
    for r in metrics.gather_every(stride).iter_rows(named=True):
        heldout = "" if r["heldout_pass_at_1"] is None else f"{r['heldout_pass_at_1']:.3f}"
        share = "" if r["kd_signal_share"] is None else f"{r['kd_signal_share']:.3g}"
        lines.append(f"| {r['step']} | {r['reward_mean']:.3f} | {r['kl_k1_mean']:+.4f} | {r['beta']:.4f} | {share} "
                     f"| {heldout} | {r['time_total_s']:.2f} |")
    return "\n".join(lines)


@task(cache_policy=NO_CACHE)
def final_report(run_dir: str, last_step: int) -> str:
    """The run report, complete: held-out accuracy before/after, the learning-curve plot, the curve."""
    markdown = run_report(run_dir, last_step, final=True)
    create_markdown_artifact(markdown, key=artifact_key(run_dir, "report"),
                             description=f"{Path(run_dir).name} summary")
    return markdown
