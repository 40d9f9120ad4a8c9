"""Read run directories back: one row per run (``list_runs``), one row per step (``run_metrics``).

Pure reading of the Parquet files a run writes (see ``kdrl.storage``); no torch, so the ``kdrl
runs`` / ``kdrl show`` commands answer at once even while a run trains. Partial runs are fine:
whatever has not been written yet reads as null.

``summarize_evaluation`` lives here (``kdrl.stages`` re-exports it) so that pass@1 can be
computed without importing the training stack.
"""

from __future__ import annotations

import math
import os
from datetime import datetime
from pathlib import Path

import polars as pl
import yaml

from kdrl.runlock import lock_holder
from kdrl.storage import STEP_METRICS, RunPaths, read_table

# One row per run directory (``list_runs``). Step metrics are those of the last step written;
# heldout_* come from the newest iter_*/eval.parquet, baseline_* from offline/eval_baseline.parquet
# (student rows). status: "running" (locked by a live process), "complete" (every step written
# and the last step checkpointed), "stopped", or "damaged" (a file of the run cannot be read:
# reason says which and why; only run_id, method, steps_total, steps_done and modified are filled).
RUNS = pl.Schema(
    {
        "run_id": pl.String,
        "method": pl.String,
        "status": pl.String,
        "steps_total": pl.Int64,
        "steps_done": pl.Int64,
        "last_step": pl.Int64,
        "reward_mean": pl.Float64,
        "kl_k1_mean": pl.Float64,
        "beta": pl.Float64,
        "baseline_pass_at_1": pl.Float64,
        "heldout_pass_at_1": pl.Float64,
        "heldout_step": pl.Int64,
        "modified": pl.Datetime("us"),
        "reason": pl.String,
    }
)

# ``run_metrics``: STEP_METRICS plus the student's held-out pass@1 and mean length at the steps
# that were evaluated (null elsewhere).
RUN_METRICS = pl.Schema(
    {**STEP_METRICS, "heldout_pass_at_1": pl.Float64, "heldout_mean_len": pl.Float64}
)


class RunNotFoundError(FileNotFoundError):
    """A run id or path that names no run directory (one holding a config.yaml)."""


def summarize_evaluation(evaluations: pl.DataFrame, split: str = "heldout") -> pl.DataFrame:
    """One row per (step, model, temperature): pass@1 averaged over the k samples of each
    prompt (the mean of per-prompt accuracies), mean and p90 response length; over the rows of
    `split` ("heldout": the in-domain held-out prompts, also rows without a split; "ood": a task
    family's out-of-domain ones).

    >>> ev = pl.DataFrame({"step": [0, 0, 0], "prompt_id": [1, 1, 2], "model": ["student"] * 3,
    ...                    "temperature": [1.0] * 3, "correct": [True, False, True],
    ...                    "completion_len": [4, 6, 5]})
    >>> summarize_evaluation(ev).select("pass_at_1", "num_prompts", "mean_len").row(0)
    (0.75, 2, 5.0)
    """
    if "split" in evaluations.columns:
        in_split = pl.col("split") == split
        evaluations = evaluations.filter((in_split | pl.col("split").is_null()) if split == "heldout" else in_split)
    elif split != "heldout":
        evaluations = evaluations.clear()
    return (
        evaluations.group_by("step", "model", "temperature", "prompt_id")
        .agg(pl.col("correct").mean().alias("acc"), pl.col("completion_len").mean().alias("len"),
             pl.col("completion_len").alias("lens"))
        .group_by("step", "model", "temperature")
        .agg(
            pl.col("acc").mean().alias("pass_at_1"),
            pl.len().alias("num_prompts"),
            pl.col("lens").explode().mean().alias("mean_len"),
            pl.col("lens").explode().quantile(0.9, "nearest").alias("p90_len"),
        )
        .sort("step", "model")
    )


def list_runs(runs_dir: str | os.PathLike) -> pl.DataFrame:
    """One ``RUNS`` row per directory of ``runs_dir`` holding a config.yaml, newest first.

    Directories starting with "_" or "." (shared caches) are skipped; a missing ``runs_dir``
    gives an empty table. A run with a file that cannot be read (a truncated Parquet file, a
    config.yaml that is not UTF-8 YAML) is listed as "damaged", with the reason; the others as usual.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = (Path(d) / "demo").mkdir()
    ...     _ = (Path(d) / "demo/config.yaml").write_text("run: {method: grpo, steps: 4}")
    ...     list_runs(d).select("run_id", "method", "status", "steps_total", "steps_done").row(0)
    ('demo', 'grpo', 'stopped', 4, 0)
    """
    rows = [_run_row_or_damaged(root) for root in _run_dirs(Path(runs_dir))]
    return pl.DataFrame(rows, schema=RUNS, orient="row").sort("modified", "run_id", descending=True)


def run_metrics(run_dir: str | os.PathLike) -> pl.DataFrame:
    """Every step's metrics (``RUN_METRICS``), sorted by step, with held-out pass@1 where evaluated.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = (Path(d) / "config.yaml").write_text("run: {steps: 4}")
    ...     empty = run_metrics(d)
    >>> (empty.height, empty.columns[-2:])
    (0, ['heldout_pass_at_1', 'heldout_mean_len'])
    """
    root = Path(run_dir)
    if not RunPaths(root).config.is_file():
        raise RunNotFoundError(f"{root} is not a run directory (it has no config.yaml)")
    frames = [read_table(p, table="step_metrics") for _, p in _iter_files(root, "metrics.parquet")]
    metrics = pl.concat(frames) if frames else STEP_METRICS.to_frame()
    evals = [read_table(p, table="evaluations") for _, p in _iter_files(root, "eval.parquet")]
    heldout = student_heldout(pl.concat(evals) if evals else None)
    joined = metrics.sort("step").join(heldout, on="step", how="left")
    return joined.select(list(RUN_METRICS)).cast(RUN_METRICS)


def resolve_run(run: str, *, runs_dir: str | os.PathLike) -> Path:
    """The directory of ``run``: a run id under ``runs_dir``, else a path to a run directory.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = (Path(d) / "a").mkdir()
    ...     _ = (Path(d) / "a/config.yaml").write_text("run: {}")
    ...     found = resolve_run("a", runs_dir=d) == Path(d) / "a"
    ...     try:
    ...         resolve_run("b", runs_dir=d)
    ...     except RunNotFoundError as err:
    ...         message = str(err)
    ...     (found, message.endswith("runs there: a"))
    (True, True)
    """
    runs_dir = Path(runs_dir)
    for candidate in (runs_dir / run, Path(run)):
        if RunPaths(candidate).config.is_file():
            return candidate
    known = ", ".join(sorted(p.name for p in _run_dirs(runs_dir))) or "(none)"
    raise RunNotFoundError(f"no run {run!r}: not a run id under {runs_dir} nor a run directory; "
                           f"runs there: {known}")


def format_table(df: pl.DataFrame, *, columns: list[str] | None = None) -> str:
    """``df`` (optionally only ``columns``, in that order) as a compact aligned text table.

    >>> print(format_table(pl.DataFrame({"step": [0, 1], "loss": [0.5, None]}), columns=["loss"]))
     loss
      0.5
     null
    """
    if columns is not None:
        unknown = [c for c in columns if c not in df.columns]
        if unknown:
            raise ValueError(f"unknown column(s) {unknown}; available: {', '.join(df.columns)}")
        df = df.select(columns)
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=10_000, tbl_formatting="NOTHING",
                   tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True,
                   tbl_hide_dtype_separator=True, tbl_cell_numeric_alignment="RIGHT"):
        text = str(df)
    return "\n".join(line.rstrip() for line in text.splitlines())


def _run_dirs(runs_dir: Path) -> list[Path]:
    if not runs_dir.is_dir():
        return []
    return [p for p in runs_dir.iterdir()
            if p.is_dir() and p.name[:1] not in ("_", ".") and RunPaths(p).config.is_file()]


def latest_checkpoint(paths: RunPaths) -> int | None:
    """The highest step with a complete checkpoint in the run directory, if any."""
    done = [step for step, _ in _iter_files(paths.root, "checkpoint/trainer_state.pt")]
    return max(done) if done else None


def require_checkpoint(paths: RunPaths) -> int:
    """`latest_checkpoint` of a run that must have one (what `kdrl eval` / `kdrl merge-lora` of a
    run directory read); FileNotFoundError naming the run otherwise."""
    step = latest_checkpoint(paths)
    if step is None:
        raise FileNotFoundError(f"run {paths.root} has no checkpoint yet (iter_*/checkpoint/trainer_state.pt)")
    return step


def _iter_files(root: Path, name: str) -> list[tuple[int, Path]]:
    """(step, path) of every ``iter_<step>/<name>``, by step (the glob order breaks past 99999)."""
    found = []
    for path in root.glob(f"iter_*/{name}"):
        digits = path.relative_to(root).parts[0].removeprefix("iter_")
        if digits.isdigit():
            found.append((int(digits), path))
    return sorted(found)


def student_heldout(evaluations: pl.DataFrame | None) -> pl.DataFrame:
    """(step, heldout_pass_at_1, heldout_mean_len) of the student, lowest temperature per step."""
    schema = {"step": pl.Int64, "heldout_pass_at_1": pl.Float64, "heldout_mean_len": pl.Float64}
    if evaluations is None:
        return pl.DataFrame(schema=schema)
    summary = summarize_evaluation(evaluations.filter(pl.col("model") == "student"))
    return (
        summary.sort("step", "temperature").unique("step", keep="first", maintain_order=True)
        .select("step", pl.col("pass_at_1").alias("heldout_pass_at_1"),
                pl.col("mean_len").alias("heldout_mean_len"))
        .cast(schema)
    )


def _read_evaluations(path: Path | None) -> pl.DataFrame | None:
    return None if path is None else read_table(path, table="evaluations")


def _read_run_section(root: Path) -> dict:
    """config.yaml's ``run`` section, read as plain YAML so configs of older versions still list;
    a ValueError naming the file when it is not UTF-8 YAML."""
    path = RunPaths(root).config
    todo = "restore it from a copy (it is the run's config as `kdrl train` wrote it)"
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is damaged: not UTF-8 text ({err.reason} at byte {err.start}); {todo}") from err
    except yaml.YAMLError as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"{path} is damaged: not valid YAML ({first}); {todo}") from err
    section = loaded.get("run") if isinstance(loaded, dict) else None
    return section if isinstance(section, dict) else {}


def _run_row_or_damaged(root: Path) -> dict:
    """``_run_row``, or a "damaged" row with the reason when a file of the run cannot be read."""
    try:
        return _run_row(root)
    except (ValueError, OSError) as err:  # StorageError, a config that is not UTF-8 YAML, a permission
        try:
            section = _read_run_section(root)
        except ValueError:
            section = {}
        steps_total = section.get("steps")
        return {"run_id": root.name, "method": _text(section.get("method")), "status": "damaged",
                "steps_total": steps_total if isinstance(steps_total, int) else None,
                "steps_done": len(_iter_files(root, "metrics.parquet")), "modified": _modified(root),
                "reason": str(err) or type(err).__name__}


def _text(value) -> str | None:
    return None if value is None else str(value)


def _run_row(root: Path) -> dict:
    paths = RunPaths(root)
    section = _read_run_section(root)
    steps_total = section.get("steps")
    metrics_files = _iter_files(root, "metrics.parquet")
    last = {}
    if metrics_files:
        last = read_table(metrics_files[-1][1], table="step_metrics").row(-1, named=True)
    eval_files = _iter_files(root, "eval.parquet")
    heldout = student_heldout(_read_evaluations(eval_files[-1][1] if eval_files else None))
    base = paths.offline / "eval_baseline.parquet"
    baseline = student_heldout(_read_evaluations(base if base.exists() else None))
    complete = _complete(paths, steps_total, len(metrics_files))
    status = "running" if lock_holder(root) is not None else "complete" if complete else "stopped"
    return {
        "run_id": root.name,
        "method": _text(section.get("method")),
        "status": status,
        "steps_total": steps_total if isinstance(steps_total, int) else None,
        "steps_done": len(metrics_files),
        "last_step": last.get("step"),
        "reward_mean": last.get("reward_mean"),
        "kl_k1_mean": last.get("kl_k1_mean"),
        "beta": last.get("beta"),
        "baseline_pass_at_1": baseline["heldout_pass_at_1"].first() if baseline.height else None,
        "heldout_pass_at_1": heldout["heldout_pass_at_1"].first() if heldout.height else None,
        "heldout_step": heldout["step"].first() if heldout.height else None,
        "modified": _modified(root),
        "reason": None,
    }


def _complete(paths: RunPaths, steps_total, steps_done: int) -> bool:
    return (
        isinstance(steps_total, int) and steps_total > 0 and steps_done == steps_total
        and (paths.checkpoint(steps_total - 1) / "trainer_state.pt").is_file()
        and paths.evaluation(steps_total - 1).is_file()
    )


def is_complete(run_dir: str | os.PathLike) -> bool:
    """Whether every step of the run is written, the last one checkpointed and evaluated."""
    paths = RunPaths(Path(run_dir))
    if not paths.config.is_file():
        return False
    try:
        steps_total = _read_run_section(paths.root).get("steps")
    except ValueError:  # a damaged config.yaml: not a complete run
        return False
    return _complete(paths, steps_total, len(_iter_files(paths.root, "metrics.parquet")))


def _modified(root: Path) -> datetime:
    """Newest mtime of the run directory and its entries (a write into iter_s/ touches iter_s)."""
    stamps = [root.stat().st_mtime] + [entry.stat().st_mtime for entry in os.scandir(root)]
    return datetime.fromtimestamp(max(stamps)).replace(microsecond=0)


def run_curve_figure(metrics: pl.DataFrame, *, baseline: float | None = None, teacher: float | None = None,
                     title: str = ""):
    """One run's learning curve (`run_metrics`' frame) as three panels against optimizer steps
    (integer ticks): training reward and held-out pass@1 (axis 0 to 1; the baseline and teacher
    dotted), the KD signal share and β, and the mean and p90 response length (from 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def col(name: str) -> list[float]:  # null (not measured, an older file) and ±inf (no GRPO signal) → a gap
        values = metrics[name].cast(pl.Float64).fill_null(float("nan")).to_list()
        return [v if math.isfinite(v) else float("nan") for v in values]

    fig, (acc_ax, kd_ax, len_ax) = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    x = (metrics["step"] + 1).to_list()  # updates done, as trackers count them
    acc_ax.plot(x, col("reward_mean"), color="tab:blue", label="training reward", alpha=0.8)
    evaluated = metrics.filter(pl.col("heldout_pass_at_1").is_not_null())
    if baseline is not None:
        evaluated = pl.concat([pl.DataFrame({"step": [-1], "heldout_pass_at_1": [baseline]}),
                               evaluated.select("step", "heldout_pass_at_1")], how="diagonal_relaxed")
    acc_ax.plot((evaluated["step"] + 1).to_list(), evaluated["heldout_pass_at_1"].to_list(), "o-", color="tab:green",
                label="held-out pass@1")
    if teacher is not None:
        acc_ax.axhline(teacher, color="black", linestyle=":", label="teacher (held-out)")
    acc_ax.set(ylim=(0, 1), ylabel="reward / pass@1", title="accuracy")
    kd_ax.plot(x, col("kd_signal_share"), color="tab:purple", label="KD signal share ‖β·KD‖/‖GRPO‖")
    kd_ax.plot(x, col("beta"), color="tab:orange", linestyle="--", label="β")
    kd_ax.set(ylabel="share / β", title="distillation")
    kd_ax.set_ylim(bottom=0)
    len_ax.plot(x, col("response_len_mean"), color="tab:red", label="mean")
    len_ax.plot(x, col("response_len_p90"), color="tab:red", linestyle=":", label="p90")
    len_ax.set(ylabel="response length (tokens)", title="response length")
    len_ax.set_ylim(bottom=0)
    for ax in (acc_ax, kd_ax, len_ax):
        ax.set_xlabel("optimizer steps")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig
