"""`kdrl compare`: the paper's methods on the same prompts, seeds and step budget.

A comparison is a folder of ordinary runs, one per (arm, seed), plus tables read from them::

    runs/compare-<hash>/
      compare.yaml              what is compared: base config, overrides, arms, seeds
      <arm>-s<seed>/            a normal run directory (kdrl show/replay/eval work on it)
      runs.parquet              COMPARE_RUNS: one row per run (tokens, teacher tokens, seconds)
      curves.parquet            COMPARE_CURVES: held-out pass@1 and length at every evaluation
      comparison.parquet/.md    COMPARISON: one row per arm, mean ± 95% interval over seeds
      comparison.png            held-out pass@1 and response length against step, per arm
      comparison-panels.png     the same as small multiples, one column per arm (and out-of-domain pass@1)
      paired.parquet            COMPARE_PAIRED: each arm minus GRPO and minus KD-RKL, paired by seed

Every arm starts from the same config (same data, so the same prompts and held-out set, the same
warm-started student and teacher, the same step budget and evaluation protocol); an arm only adds
its method: a ``run.method`` preset and, for an ablation, a few overrides on top (`ARMS`); seed s
sets ``run.seed`` (sampling and prompt order).
Rerunning the same command resumes: complete runs are skipped, a stopped one resumes after its
last checkpoint. The tables are rewritten from the run folders after every run, so a comparison
can be read while it is being made.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import yaml

from kdrl.config import COMPARE_PROTOCOL, PRESETS, RunConfig, load_config
from kdrl.runs import summarize_evaluation
from kdrl.storage import COMPARE_CURVES, COMPARE_PAIRED, COMPARE_RUNS, COMPARISON, RunPaths, read_table, write_table

ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    **{method: (method, ()) for method in PRESETS if method != "custom"},
    "kdrl_k3": ("kdrl", ("loss.kl_estimator=k3",)),
    "kdrl_topk": ("kdrl", ("loss.kl_estimator=topk", "teacher.top_k=16")),
    "kdrl_beta10": ("kdrl", ("loss.beta_init=0.05",)),
}
"""Arm name → (its run.method preset, the overrides it adds to that preset), applied after the
common overrides. Every preset but custom is an arm of its own name, so an arm is its preset and
cannot drift from it. kdrl_k3 is the paper's estimator ablation (forward-KL gradient); kdrl_topk
and kdrl_beta10 (KDRL at 10× the paper's β, the β sweep of docs/experiments.md) are available
but not in the default set."""

DEFAULT_ARMS = ("sft", "grpo", "kd_rkl", "kdrl", "kdrl_anneal", "kdrl_mask_response", "kdrl_mask_group", "kdrl_k3")

# Two-sided 95% Student-t quantiles, t_{0.975, df}, for df = 1..30 (beyond: 1.96 + a 1/df term).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def ci95_halfwidth(values: list[float]) -> float | None:
    """Half-width of the Student-t 95% interval of the mean of `values` (None below 2 values).

    >>> round(ci95_halfwidth([0.5, 0.6, 0.7]), 4)   # 4.303 * 0.1 / sqrt(3)
    0.2484
    >>> ci95_halfwidth([0.5]) is None
    True
    """
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    df = n - 1
    t = _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df
    return t * sd / math.sqrt(n)


@dataclass(frozen=True)
class ComparePlan:
    """What a comparison runs; saved as compare.yaml in its folder."""

    root: Path
    config_path: str | None
    overrides: tuple[str, ...]
    arms: tuple[str, ...]
    seeds: tuple[int, ...]

    def run_id(self, arm: str, seed: int) -> str:
        return f"{arm}-s{seed}"

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.root / self.run_id(arm, seed)

    def run_overrides(self, arm: str, seed: int) -> list[str]:
        """Common overrides, then the arm's, then the seed and the comparison folder."""
        preset, extra = ARMS[arm]
        return [*self.overrides, f"run.method={preset}", *extra, f"run.seed={seed}", f"run.runs_dir={self.root}"]

    def config(self, arm: str, seed: int) -> RunConfig:
        return load_config(self.config_path, self.run_overrides(arm, seed))

    def runs(self) -> list[tuple[str, int]]:
        """(arm, seed) in execution order: seed-major, so every arm has a result early."""
        return [(arm, seed) for seed in self.seeds for arm in self.arms]

    def to_yaml(self) -> str:
        return yaml.safe_dump({"config_path": self.config_path, "overrides": list(self.overrides),
                               "arms": list(self.arms), "seeds": list(self.seeds)}, sort_keys=False)


def protocol_overrides(overrides: list[str] | tuple[str, ...] = (), *, steps: int | None = None,
                       eval_samples: int | None = None, eval_temperature: float | None = None,
                       eval_every: int | None = None) -> list[str]:
    """`kdrl compare`'s flags (and the kdrl-compare flow's parameters) as the run config keys they
    set: the evaluation flags before `overrides` (a `--set` of the same key wins), `steps` last.

    >>> protocol_overrides(["loss.beta_init=0.1"], steps=5, eval_every=2)
    ['run.eval_every=2', 'loss.beta_init=0.1', 'run.steps=5']
    """
    flags = {"run.eval_samples": eval_samples, "run.eval_temperature": eval_temperature, "run.eval_every": eval_every}
    return [*(f"{key}={value}" for key, value in flags.items() if value is not None), *overrides,
            *([f"run.steps={steps}"] if steps is not None else [])]


def plan_compare(config_path: str | None = None, overrides: list[str] | tuple[str, ...] = (), *, arms=DEFAULT_ARMS,
                 seeds: int = 3, name: str | None = None) -> ComparePlan:
    """Validate every (arm, seed) config now — a typo fails before the first run, not the tenth —
    and place the comparison under run.runs_dir (default name: compare-<hash of the configs>).
    Every arm gets `COMPARE_PROTOCOL`, then `overrides`."""
    overrides = [*(f"{key}={value}" for key, value in COMPARE_PROTOCOL.items()), *overrides]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    base = load_config(config_path, overrides)
    first_seed = base.run.seed
    probe = ComparePlan(Path("."), config_path, tuple(overrides), tuple(arms),
                        tuple(range(first_seed, first_seed + seeds)))
    hashes = [probe.config(arm, seed).hash() for arm, seed in probe.runs()]  # validates each
    digest = hashlib.sha256(json.dumps(hashes).encode()).hexdigest()[:8]
    root = Path(base.run.runs_dir) / (name or f"compare-{digest}")
    return ComparePlan(root, config_path, probe.overrides, probe.arms, probe.seeds)


def prepare(plan: ComparePlan) -> None:
    """Create the comparison folder, or check that it holds this same comparison."""
    saved = plan.root / "compare.yaml"
    if saved.exists():
        if yaml.safe_load(saved.read_text()) != yaml.safe_load(plan.to_yaml()):
            raise ValueError(f"{plan.root} holds another comparison (see {saved}); use another --name")
        return
    plan.root.mkdir(parents=True, exist_ok=True)
    saved.write_text(plan.to_yaml())


def load_plan(root: str | Path) -> ComparePlan:
    """The plan of an existing comparison folder."""
    root = Path(root)
    saved = yaml.safe_load((root / "compare.yaml").read_text())
    return ComparePlan(root, saved["config_path"], tuple(saved["overrides"]), tuple(saved["arms"]),
                       tuple(saved["seeds"]))


# ---------------------------------------------------------------------------------------------
# Reading the runs back


def _run_row(plan: ComparePlan, arm: str, seed: int, wall_s: float | None) -> dict:
    root = plan.run_dir(arm, seed)
    frames = [read_table(p, table="step_metrics") for p in sorted(root.glob("iter_*/metrics.parquet"))]
    metrics = pl.concat(frames) if frames else pl.DataFrame(
        schema={"num_tokens": pl.Int64, "teacher_tokens": pl.Int64, "time_total_s": pl.Float64,
                "kd_signal_share": pl.Float64})
    # The median over the steps that measured it: a step whose groups all have equal rewards has
    # no GRPO signal and an infinite share (KD-RKL's every step), which a mean would let dominate.
    share = metrics["kd_signal_share"].fill_nan(None).median()
    return {"method": arm, "seed": seed, "run_id": plan.run_id(arm, seed), "steps_done": len(frames),
            "rollout_tokens": int(metrics["num_tokens"].sum()), "teacher_tokens": int(metrics["teacher_tokens"].sum()),
            "train_time_s": float(metrics["time_total_s"].sum()), "wall_s": wall_s,
            "kd_signal_share": None if share is None else float(share)}


def _curve_rows(plan: ComparePlan, arm: str, seed: int) -> list[pl.DataFrame]:
    paths = RunPaths(plan.run_dir(arm, seed))
    files = [(0, paths.offline / "eval_baseline.parquet")]
    files += [(int(p.parent.name.removeprefix("iter_")) + 1, p) for p in paths.root.glob("iter_*/eval.parquet")]
    out = []
    for steps_trained, path in files:
        if not path.exists():
            continue
        student = read_table(path, table="evaluations").filter(pl.col("model") == "student")
        summary = _with_ood(summarize_evaluation(student), summarize_evaluation(student, split="ood"))
        out.append(summary.select(pl.lit(arm).alias("method"), pl.lit(seed).alias("seed"),
                                  pl.lit(steps_trained).alias("steps_trained"), "temperature", "pass_at_1", "mean_len",
                                  pl.col("p90_len").cast(pl.Float64), "ood_pass_at_1", "ood_mean_len"))
    return out


def _with_ood(heldout: pl.DataFrame, ood: pl.DataFrame) -> pl.DataFrame:
    """`heldout` summary rows with ood_pass_at_1 / ood_mean_len from `ood`'s rows of the same
    (model, temperature) (null where there are none)."""
    ood = ood.select("model", "temperature", pl.col("pass_at_1").alias("ood_pass_at_1"),
                     pl.col("mean_len").alias("ood_mean_len"))
    return heldout.join(ood, on=["model", "temperature"], how="left")


def teacher_reference(plan: ComparePlan) -> pl.DataFrame:
    """The teacher's held-out summary (with ood_* columns), from the baseline evaluation of the first run that
    evaluated it (runs without a teacher, e.g. GRPO's, have none), if any."""
    for arm, seed in plan.runs():
        path = RunPaths(plan.run_dir(arm, seed)).offline / "eval_baseline.parquet"
        if path.exists():
            teacher = read_table(path, table="evaluations").filter(pl.col("model") == "teacher")
            if teacher.height:
                return _with_ood(summarize_evaluation(teacher), summarize_evaluation(teacher, split="ood"))
    return pl.DataFrame()


def collect(plan: ComparePlan, wall_s: dict[tuple[str, int], float] | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(COMPARE_RUNS, COMPARE_CURVES) of every run started so far. wall_s gives measured wall
    times; runs without one keep the time recorded in an earlier runs.parquet, if any."""
    known: dict[tuple[str, int], float | None] = {}
    previous = plan.root / "runs.parquet"
    if previous.exists():
        for row in read_table(previous, table="compare_runs").iter_rows(named=True):
            known[(row["method"], row["seed"])] = row["wall_s"]
    known.update(wall_s or {})
    started = [(arm, seed) for arm, seed in plan.runs() if RunPaths(plan.run_dir(arm, seed)).config.exists()]
    runs = pl.DataFrame([_run_row(plan, arm, seed, known.get((arm, seed))) for arm, seed in started],
                        schema=COMPARE_RUNS, orient="row")
    curves = [frame for arm, seed in started for frame in _curve_rows(plan, arm, seed)]
    curve_table = (pl.concat(curves) if curves else COMPARE_CURVES.to_frame()).cast(COMPARE_CURVES)
    return runs, curve_table.sort("method", "seed", "steps_trained", "temperature")


def eval_temperature(plan: ComparePlan) -> float:
    """The temperature pass@1 is reported at (the runs' run.eval_temperature)."""
    return plan.config(plan.arms[0], plan.seeds[0]).run.eval_temperature


def comparison_table(plan: ComparePlan, runs: pl.DataFrame, curves: pl.DataFrame) -> pl.DataFrame:
    """COMPARISON: per arm, over the seeds whose run finished, the final held-out pass@1 (at the
    evaluation temperature) and greedy accuracy with 95% intervals, mean response length, teacher
    tokens scored, wall time per run, the out-of-domain pass@1 (task families with that split)
    and the KD signal share (per run the median over training steps). Two reference rows come
    first: the student before training ("student@0") and the teacher."""
    steps = plan.config(plan.arms[0], plan.seeds[0]).run.steps
    temperature = eval_temperature(plan)

    def at(frame: pl.DataFrame, t: float) -> pl.DataFrame:
        return frame.filter((pl.col("temperature") - t).abs() < 1e-6)

    rows = []
    baseline = curves.filter(pl.col("steps_trained") == 0)
    teacher = teacher_reference(plan)
    for label, frame, seeds_col in (("student@0", baseline, True), ("teacher", teacher, False)):
        if frame.height == 0 or at(frame, temperature).height == 0:
            continue
        sampled = at(frame, temperature).unique(["seed"] if seeds_col else ["temperature"])
        greedy = at(frame, 0.0)
        rows.append({"method": label, "seeds": sampled.height if seeds_col else None, "steps": 0,
                     "pass_at_1": sampled["pass_at_1"].mean(), "pass_at_1_ci95": None,
                     "greedy": greedy["pass_at_1"].mean() if greedy.height else None, "greedy_ci95": None,
                     "mean_len": sampled["mean_len"].mean(), "mean_len_ci95": None, "teacher_tokens": None,
                     "wall_s": None, "ood_pass_at_1": sampled["ood_pass_at_1"].mean(), "ood_pass_at_1_ci95": None,
                     "kd_signal_share": None})
    final = curves.filter(pl.col("steps_trained") == steps)
    for arm in plan.arms:
        mine = final.filter(pl.col("method") == arm)
        sampled = at(mine, temperature).sort("seed")
        if sampled.height == 0:
            continue
        greedy = at(mine, 0.0).sort("seed")
        done = runs.filter((pl.col("method") == arm) & pl.col("seed").is_in(sampled["seed"].implode()))
        rows.append({
            "method": arm, "seeds": sampled.height, "steps": steps,
            "pass_at_1": sampled["pass_at_1"].mean(), "pass_at_1_ci95": ci95_halfwidth(sampled["pass_at_1"].to_list()),
            "greedy": greedy["pass_at_1"].mean() if greedy.height else None,
            "greedy_ci95": ci95_halfwidth(greedy["pass_at_1"].to_list()) if greedy.height else None,
            "mean_len": sampled["mean_len"].mean(), "mean_len_ci95": ci95_halfwidth(sampled["mean_len"].to_list()),
            "teacher_tokens": done["teacher_tokens"].cast(pl.Float64).mean(), "wall_s": done["wall_s"].mean(),
            "ood_pass_at_1": sampled["ood_pass_at_1"].mean(),
            "ood_pass_at_1_ci95": ci95_halfwidth(sampled["ood_pass_at_1"].drop_nulls().to_list()),
            "kd_signal_share": done["kd_signal_share"].mean(),
        })
    return pl.DataFrame(rows, schema=COMPARISON, orient="row")


PAIRED_REFERENCES = ("grpo", "kd_rkl", "kdrl")
"""The arms every other arm is compared with seed by seed: RL alone, distillation alone, and
plain KDRL (what its schedule, masks and estimator variants change)."""

PAIRED_METRICS = ("pass_at_1", "ood_pass_at_1", "mean_len")


def paired_differences(arms: tuple[str, ...], final: pl.DataFrame,
                       references: tuple[str, ...] = PAIRED_REFERENCES) -> pl.DataFrame:
    """COMPARE_PAIRED from `final`, one row per (method, seed) at the end of training (at the
    evaluation temperature): for each reference arm present and each other arm, the mean over the
    seeds both finished of (arm − reference), per metric of `PAIRED_METRICS` that both have, and
    the 95% interval of that mean. A seed pairs runs that saw the same prompts in the same order
    with the same sampling seeds, so what both share cancels.

    >>> final = pl.DataFrame({"method": ["grpo", "grpo", "kdrl", "kdrl"], "seed": [0, 1, 0, 1],
    ...                       "pass_at_1": [0.5, 0.7, 0.6, 0.9], "ood_pass_at_1": [None] * 4,
    ...                       "mean_len": [20.0, 20.0, 18.0, 19.0]})
    >>> paired_differences(("grpo", "kdrl"), final).select("method", "reference", "metric", "diff").rows()[:2]
    [('kdrl', 'grpo', 'pass_at_1', 0.15000000000000002), ('kdrl', 'grpo', 'mean_len', -1.5)]
    """
    rows = []
    for reference in (r for r in references if r in arms):
        base = final.filter(pl.col("method") == reference)
        for arm in (a for a in arms if a != reference):
            pair = final.filter(pl.col("method") == arm).join(base, on="seed", suffix="_ref").sort("seed")
            for metric in PAIRED_METRICS:
                both = pair.filter(pl.col(metric).is_not_null() & pl.col(f"{metric}_ref").is_not_null())
                if both.height == 0:
                    continue
                diffs = (both[metric] - both[f"{metric}_ref"]).to_list()
                rows.append({"method": arm, "reference": reference, "metric": metric, "seeds": len(diffs),
                             "diff": sum(diffs) / len(diffs), "diff_ci95": ci95_halfwidth(diffs)})
    return pl.DataFrame(rows, schema=COMPARE_PAIRED, orient="row")


def final_rows(plan: ComparePlan, curves: pl.DataFrame) -> pl.DataFrame:
    """`curves` at the end of training and at the evaluation temperature: one row per (arm, seed)."""
    steps = plan.config(plan.arms[0], plan.seeds[0]).run.steps
    temperature = eval_temperature(plan)
    return curves.filter((pl.col("steps_trained") == steps) & ((pl.col("temperature") - temperature).abs() < 1e-6))


# ---------------------------------------------------------------------------------------------
# Reporting


def _fmt(mean, half, digits=3) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" if half is None else f"{mean:.{digits}f} ± {half:.{digits}f}"


def comparison_markdown(plan: ComparePlan, table: pl.DataFrame, *, image: str | None = "comparison.png",
                        paired: pl.DataFrame | None = None, panels: str | None = None) -> str:
    """The comparison as markdown: settings, the table, the paired differences (`paired`), and
    the plots (`image`, `panels`: paths or data URIs; None leaves one out). The OOD column is
    there when the task family has an out-of-domain split."""
    cfg = plan.config(plan.arms[0], plan.seeds[0])
    k, t = cfg.run.eval_samples, cfg.run.eval_temperature
    ood = table["ood_pass_at_1"].is_not_null().any()
    lines = [
        f"# kdrl compare `{plan.root.name}`", "",
        f"{len(plan.arms)} arms × seeds {list(plan.seeds)}, {cfg.run.steps} steps of "
        f"{cfg.rollout.prompts_per_step}×{cfg.rollout.samples_per_prompt} rollouts each; held-out set of "
        f"{cfg.data.num_heldout} prompts ({cfg.data.source}{', and as many out-of-domain ones' if ood else ''}). "
        f"pass@1 = mean accuracy of {k} sample(s) at T={t}; "
        "± = half-width of the 95% Student-t interval over seeds; teacher tokens = tokens the teacher scored "
        "per run; wall = seconds per run; KD share = ‖β·KD‖/‖GRPO‖ of the per-token gradient coefficients, "
        "the median over training steps (∞: no GRPO term, KD-RKL).", "",
        f"| method | seeds | pass@1 (k={k}, T={t}) | greedy | mean length | teacher tokens | wall s |"
        f"{' OOD pass@1 |' if ood else ''} KD share |",
        f"|---|---|---|---|---|---|---|{'---|' if ood else ''}---|",
    ]
    for r in table.iter_rows(named=True):
        tokens = "–" if r["teacher_tokens"] is None else f"{r['teacher_tokens']:,.0f}"
        wall = "–" if r["wall_s"] is None else f"{r['wall_s']:.0f}"
        share = ("–" if r["kd_signal_share"] is None else "∞" if math.isinf(r["kd_signal_share"])
                 else f"{r['kd_signal_share']:.3f}")
        ood_cell = f" {_fmt(r['ood_pass_at_1'], r['ood_pass_at_1_ci95'])} |" if ood else ""
        lines.append(f"| {r['method']} | {r['seeds'] if r['seeds'] is not None else '–'} | "
                     f"{_fmt(r['pass_at_1'], r['pass_at_1_ci95'])} | {_fmt(r['greedy'], r['greedy_ci95'])} | "
                     f"{_fmt(r['mean_len'], r['mean_len_ci95'], 1)} | {tokens} | {wall} |{ood_cell} {share} |")
    if paired is not None and paired.height:
        lines += ["", "Paired by seed, each arm minus the reference, at the end of training (mean ± 95% interval "
                  "of the per-seed differences; pass@1 as a fraction, length in tokens):", "",
                  "| method | vs | seeds | Δ pass@1 |" + (" Δ OOD pass@1 |" if ood else "") + " Δ mean length |",
                  "|---|---|---|---|" + ("---|" if ood else "") + "---|"]
        for (method, reference), rows in paired.group_by("method", "reference", maintain_order=True):
            by = {r["metric"]: r for r in rows.iter_rows(named=True)}
            cells = [_fmt_diff(by.get(m), 3 if m != "mean_len" else 1)
                     for m in ("pass_at_1", *(["ood_pass_at_1"] if ood else []), "mean_len")]
            lines.append(f"| {method} | {reference} | {rows['seeds'].max()} | " + " | ".join(cells) + " |")
    if image:
        lines += ["", f"![held-out pass@1 and response length against step]({image})"]
    if panels:
        lines += ["", f"![one panel per arm: pass@1 in and out of domain, response length]({panels})"]
    return "\n".join(lines) + "\n"


def _fmt_diff(row: dict | None, digits: int) -> str:
    if row is None:
        return "–"
    half = "" if row["diff_ci95"] is None else f" ± {row['diff_ci95']:.{digits}f}"
    return f"{row['diff']:+.{digits}f}{half}"


MAX_BANDS = 4  # more arms than this: mean lines only, the 95% bands would hide each other


def plot_curves(plan: ComparePlan, curves: pl.DataFrame, path: str | Path) -> Path:
    """PNG of `curve_figure`."""
    return _save(curve_figure(plan, curves), Path(path))


def curve_figure(plan: ComparePlan, curves: pl.DataFrame):
    """Held-out pass@1 (at the evaluation temperature, axis from 0 to 1) and mean response length
    (from 0) against steps trained (integer ticks): one line per arm, the mean over seeds, with a
    labelled 95% band over seeds when there are 2+ seeds and at most MAX_BANDS arms; the teacher
    dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    temperature = eval_temperature(plan)
    sampled = curves.filter((pl.col("temperature") - temperature).abs() < 1e-6)
    fig, (acc_ax, len_ax) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    colors = plt.get_cmap("tab10")
    per_arm = {arm: sampled.filter(pl.col("method") == arm) for arm in plan.arms}
    shown = [arm for arm, mine in per_arm.items() if mine.height]
    banded = False
    for i, (arm, mine) in enumerate(per_arm.items()):
        if mine.height == 0:
            continue
        grouped = mine.group_by("steps_trained").agg(pl.col("pass_at_1"), pl.col("mean_len")).sort("steps_trained")
        x = grouped["steps_trained"].to_list()
        for ax, column in ((acc_ax, "pass_at_1"), (len_ax, "mean_len")):
            values = grouped[column].to_list()
            mean = [sum(v) / len(v) for v in values]
            style = "--" if arm in ("sft", "grpo", "kd_rkl") else "-"
            ax.plot(x, mean, style, color=colors(i % 10), label=arm, marker="o", markersize=3)
            half = [ci95_halfwidth(v) for v in values]
            if len(shown) <= MAX_BANDS and all(h is not None for h in half):
                ax.fill_between(x, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                                color=colors(i % 10), alpha=0.12)
                banded = True
    teacher = teacher_reference(plan)
    if teacher.height:
        t_row = teacher.filter((pl.col("temperature") - temperature).abs() < 1e-6)
        if t_row.height:
            acc_ax.axhline(t_row["pass_at_1"][0], color="black", linestyle=":", label="teacher")
            len_ax.axhline(t_row["mean_len"][0], color="black", linestyle=":", label="teacher")
    seeds = len(plan.seeds)
    how = (f"mean of {seeds} seeds, band: 95% interval" if banded else
           f"mean of {seeds} seeds" if seeds > 1 else "one seed")
    acc_ax.set(xlabel="optimizer steps", ylabel=f"held-out pass@1 (T={temperature})", title=f"accuracy ({how})",
               ylim=(0, 1))
    len_ax.set(xlabel="optimizer steps", ylabel="mean response length (tokens)", title=f"response length ({how})")
    len_ax.set_ylim(bottom=0)
    for ax in (acc_ax, len_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8, ncol=2)
    return fig


def panels_figure(plan: ComparePlan, curves: pl.DataFrame):
    """Small multiples: one column per arm, one row per measure (held-out pass@1, out-of-domain
    pass@1 when the task has that split, mean response length) against steps trained, all on
    shared axes. Each panel shows the arm's mean over seeds with its 95% band (2+ seeds), the
    seeds themselves as thin lines, the reference arm's mean (GRPO, else the first arm) in grey
    and the teacher dotted, so every arm is read against the same two lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    temperature = eval_temperature(plan)
    sampled = curves.filter((pl.col("temperature") - temperature).abs() < 1e-6)
    measures = [("pass_at_1", f"held-out pass@1 (T={temperature})", (0, 1))]
    if sampled["ood_pass_at_1"].is_not_null().any():
        measures.append(("ood_pass_at_1", f"out-of-domain pass@1 (T={temperature})", (0, 1)))
    measures.append(("mean_len", "mean response length (tokens)", None))
    arms = [arm for arm in plan.arms if sampled.filter(pl.col("method") == arm).height]
    reference = "grpo" if "grpo" in arms else arms[0] if arms else None
    fig, axes = plt.subplots(len(measures), max(len(arms), 1), figsize=(2.3 * max(len(arms), 1) + 0.6,
                             2.2 * len(measures) + 0.4), sharex=True, sharey="row", squeeze=False,
                             constrained_layout=True)
    teacher = teacher_reference(plan)
    t_row = teacher.filter((pl.col("temperature") - temperature).abs() < 1e-6) if teacher.height else teacher

    def mean_curve(arm: str, column: str) -> tuple[list[int], list[float], list[float | None]]:
        grouped = (sampled.filter((pl.col("method") == arm) & pl.col(column).is_not_null())
                   .group_by("steps_trained").agg(pl.col(column)).sort("steps_trained"))
        values = grouped[column].to_list()
        return (grouped["steps_trained"].to_list(), [sum(v) / len(v) for v in values],
                [ci95_halfwidth(v) for v in values])

    for col, arm in enumerate(arms):
        mine = sampled.filter(pl.col("method") == arm)
        for row, (column, label, ylim) in enumerate(measures):
            ax = axes[row][col]
            for _, seed_rows in mine.sort("steps_trained").group_by("seed"):
                ax.plot(seed_rows["steps_trained"].to_list(), seed_rows[column].to_list(), color="tab:blue",
                        alpha=0.25, linewidth=0.8)
            x, mean, half = mean_curve(arm, column)
            ax.plot(x, mean, color="tab:blue", marker="o", markersize=2.5, label=arm)
            if x and all(h is not None for h in half):
                ax.fill_between(x, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                                color="tab:blue", alpha=0.15)
            if reference is not None and arm != reference:
                rx, rmean, _ = mean_curve(reference, column)
                ax.plot(rx, rmean, color="grey", linewidth=1.2, label=reference)
            if t_row.height and t_row[column][0] is not None:
                ax.axhline(t_row[column][0], color="black", linestyle=":", linewidth=1)
            if ylim:
                ax.set_ylim(*ylim)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(arm, fontsize=10)
            if col == 0:
                ax.set_ylabel(label, fontsize=8)
            if row == len(measures) - 1:
                ax.set_xlabel("optimizer steps", fontsize=8)
    for row in range(len(measures)):  # lengths from 0, shared by the row
        if measures[row][2] is None:
            axes[row][0].set_ylim(bottom=0)
    seeds = len(plan.seeds)
    fig.suptitle(f"{plan.root.name}: mean of {seeds} seed(s) (thin: each seed; band: 95% interval), "
                 f"grey: {reference}, dotted: teacher", fontsize=10)
    return fig


@dataclass(frozen=True)
class CompareOutput:
    runs: str
    curves: str
    comparison: str
    markdown: str
    plot: str | None
    paired: str
    panels: str | None


def write_comparison(plan: ComparePlan, wall_s: dict[tuple[str, int], float] | None = None, *,
                     plot: bool = True) -> CompareOutput:
    """Read every run of the comparison and (re)write its tables, markdown and plot."""
    runs, curves = collect(plan, wall_s)
    table = comparison_table(plan, runs, curves)
    meta = {"kdrl.compare": plan.root.name}
    write_table(runs, plan.root / "runs.parquet", table="compare_runs", metadata=meta)
    write_table(curves, plan.root / "curves.parquet", table="compare_curves", metadata=meta)
    write_table(table, plan.root / "comparison.parquet", table="comparison", metadata=meta)
    paired = paired_differences(plan.arms, final_rows(plan, curves))
    write_table(paired, plan.root / "paired.parquet", table="compare_paired", metadata=meta)
    png = plot_curves(plan, curves, plan.root / "comparison.png") if plot and curves.height else None
    panels = _save(panels_figure(plan, curves), plan.root / "comparison-panels.png") if png else None
    markdown = plan.root / "comparison.md"
    markdown.write_text(comparison_markdown(plan, table, image="comparison.png" if png else None, paired=paired,
                                            panels="comparison-panels.png" if panels else None))
    return CompareOutput(str(plan.root / "runs.parquet"), str(plan.root / "curves.parquet"),
                         str(plan.root / "comparison.parquet"), str(markdown), None if png is None else str(png),
                         str(plan.root / "paired.parquet"), None if panels is None else str(panels))


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_with_inline_plot(plan: ComparePlan) -> str:
    """comparison.md with the PNG inlined as a data URI (for a Prefect markdown artifact)."""
    table = read_table(plan.root / "comparison.parquet", table="comparison")
    paired = plan.root / "paired.parquet"

    def inline(png: Path) -> str | None:
        return f"data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}" if png.exists() else None

    return comparison_markdown(plan, table, image=inline(plan.root / "comparison.png"),
                               paired=read_table(paired, table="compare_paired") if paired.exists() else None,
                               panels=inline(plan.root / "comparison-panels.png")) + f"\nFiles: `{plan.root}`\n"
