"""The verdicts of the chain task's pre-registered hypotheses (docs/experiments.md), read off a
`kdrl compare` folder by the rules written there before the comparison ran.

    python scripts/prereg_verdicts.py runs/chain-prereg

Every number comes from the folder's tables (curves.parquet, runs.parquet, comparison.parquet,
step metrics): paired differences by seed (`kdrl.compare.paired_differences`) at the final
evaluation and, for the curves, at every evaluation. Prints markdown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl  # noqa: E402

from kdrl.compare import eval_temperature, load_plan, paired_differences, teacher_reference  # noqa: E402
from kdrl.storage import read_table  # noqa: E402

ABOUT_THE_SAME = 0.05
"""H4 (c): a pass@1 difference whose interval lies within ± this is "about the same"."""


def side(row: dict | None) -> str:
    """'above' / 'below' when the 95% interval of the mean difference excludes 0, else 'unresolved'."""
    if row is None or row["diff_ci95"] is None:
        return "unresolved"
    low, high = row["diff"] - row["diff_ci95"], row["diff"] + row["diff_ci95"]
    return "above" if low > 0 else "below" if high < 0 else "unresolved"


def fmt(row: dict | None, digits: int = 3) -> str:
    if row is None:
        return "–"
    half = "" if row["diff_ci95"] is None else f" ± {row['diff_ci95']:.{digits}f}"
    return f"{row['diff']:+.{digits}f}{half} ({side(row)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    args = parser.parse_args()
    plan = load_plan(args.root)
    temperature = eval_temperature(plan)
    curves = read_table(args.root / "curves.parquet", table="compare_curves")
    runs = read_table(args.root / "runs.parquet", table="compare_runs")
    sampled = curves.filter((pl.col("temperature") - temperature).abs() < 1e-6)
    steps = plan.config(plan.arms[0], plan.seeds[0]).run.steps
    references = ("grpo", "kd_rkl", "kdrl", "sft")

    def paired_at(step: int) -> dict[tuple[str, str, str], dict]:
        at = sampled.filter(pl.col("steps_trained") == step)
        table = paired_differences(plan.arms, at, references=references)
        return {(r["method"], r["reference"], r["metric"]): r for r in table.iter_rows(named=True)}

    final = paired_at(steps)
    share = dict(zip(*runs.group_by("method").agg(pl.col("kd_signal_share").mean()).to_dict(as_series=False).values()))
    tokens = dict(zip(*runs.group_by("method").agg(pl.col("teacher_tokens").mean()).to_dict(as_series=False).values()))
    teacher = teacher_reference(plan)
    teacher_ood = None
    if teacher.height:
        t_row = teacher.filter((pl.col("temperature") - temperature).abs() < 1e-6)
        teacher_ood = t_row["ood_pass_at_1"][0] if t_row.height else None
    seeds = runs.group_by("method").len()
    print(f"# Verdicts: `{args.root}`\n\n{len(plan.arms)} arms; seeds per arm: "
          f"{dict(seeds.iter_rows())}; final evaluation after {steps} steps; pass@1 at T={temperature}.\n")

    def get(method: str, reference: str, metric: str = "pass_at_1", table=None) -> dict | None:
        return (final if table is None else table).get((method, reference, metric))

    lines = ["| hypothesis | evidence (paired difference, mean ± 95% interval) | verdict |", "|---|---|---|"]
    # H1
    h1 = get("kd_rkl", "grpo")
    early = paired_at(20) if steps > 20 else {}
    verdict = {"above": "confirmed", "below": "refuted"}.get(side(h1), "unresolved")
    lines.append(f"| H1 KD helps where RL cannot explore | KD-RKL − GRPO: {fmt(h1)}; at step 20: "
                 f"{fmt(get('kd_rkl', 'grpo', table=early)) if early else '–'} | {verdict} |")
    # H2
    h2 = get("kd_rkl", "grpo", "ood_pass_at_1")
    verdict = {"below": "confirmed", "above": "refuted"}.get(side(h2), "unresolved")
    if verdict == "unresolved" and teacher_ood is not None and teacher_ood < 0.2:
        verdict += f" (teacher OOD pass@1 {teacher_ood:.3f} < 0.2: floor)"
    lines.append(f"| H2 KD alone generalizes worse OOD | KD-RKL − GRPO, OOD: {fmt(h2)}; in-domain: {fmt(h1)} "
                 f"| {verdict} |")
    # H3
    vs_grpo, vs_kd = get("kdrl", "grpo"), get("kdrl", "kd_rkl")
    if side(vs_grpo) == "below" or side(vs_kd) == "below":
        verdict = "refuted"
    elif side(vs_grpo) == "above" and side(vs_kd) != "below":
        verdict = "confirmed"
    else:
        verdict = "unresolved"
    lines.append(f"| H3 KDRL combines the two | KDRL − GRPO: {fmt(vs_grpo)}; KDRL − KD-RKL: {fmt(vs_kd)}; OOD: "
                 f"{fmt(get('kdrl', 'grpo', 'ood_pass_at_1'))}, {fmt(get('kdrl', 'kd_rkl', 'ood_pass_at_1'))} "
                 f"| {verdict} |")
    # H4
    for mask in ("kdrl_mask_response", "kdrl_mask_group"):
        if mask not in plan.arms:
            continue
        length, acc = get(mask, "kdrl", "mean_len"), get(mask, "kdrl")
        fewer = tokens.get(mask) is not None and tokens.get("kdrl") and tokens[mask] < tokens["kdrl"]
        ratio = f"{tokens[mask] / tokens['kdrl']:.2f}× KDRL's" if fewer is not None and tokens.get("kdrl") else "–"
        b = {"below": "confirmed", "above": "refuted"}.get(side(length), "unresolved")
        same = (acc is not None and acc["diff_ci95"] is not None
                and abs(acc["diff"]) + acc["diff_ci95"] <= ABOUT_THE_SAME)
        c = "confirmed" if same else "unresolved" if side(acc) == "unresolved" else "refuted"
        lines.append(f"| H4 {mask} | (a) teacher tokens {ratio}; (b) length − KDRL: {fmt(length, 1)}; "
                     f"(c) pass@1 − KDRL: {fmt(acc)} | (a) {'confirmed' if fewer else 'refuted'}, (b) {b}, "
                     f"(c) {c} |")
    # H5
    paper = share.get("kdrl")
    part1 = ("confirmed" if paper is not None and paper < 0.15 and side(vs_grpo) == "unresolved" else "refuted"
             if paper is not None else "–")
    big = share.get("kdrl_beta10")
    beta10 = get("kdrl_beta10", "grpo")
    part2 = ("confirmed" if big is not None and big >= 0.3 and side(beta10) == "above" else
             "refuted" if big is not None and (big < 0.3 or side(beta10) == "below") else "unresolved")
    lines.append(f"| H5 β's scale | KD share at β=5e-3: {paper if paper is None else f'{paper:.3f}'}, KDRL − GRPO "
                 f"{fmt(vs_grpo)}; at 10×: {big if big is None else f'{big:.3f}'}, KDRL(10×β) − GRPO {fmt(beta10)} "
                 f"| paper β: {part1}; 10×: {part2} |")
    # H6: SFT < GRPO < KD-RKL < KDRL < KDRL-Annealing
    chain = [("grpo", "sft"), ("kd_rkl", "grpo"), ("kdrl", "kd_rkl"), ("kdrl_anneal", "kdrl")]
    rows = [get(a, b) or (lambda r: r and {**r, "diff": -r["diff"]})(get(b, a)) for a, b in chain]
    sides = [side(r) for r in rows]
    verdict = ("confirmed" if all(s == "above" for s in sides) else "refuted" if "below" in sides else "unresolved")
    lines.append("| H6 the paper's order | " + "; ".join(f"{a} − {b}: {fmt(r)}" for (a, b), r in zip(chain, rows))
                 + f" | {verdict} |")
    print("\n".join(lines))

    # The curves, every evaluation: mean pass@1 in and out of domain, and the length
    print("\nMean over seeds at each evaluation (in-domain pass@1 / OOD pass@1 / length):\n")
    evals = sorted(sampled["steps_trained"].unique().to_list())
    print("| method | " + " | ".join(f"step {s}" for s in evals) + " |\n|---|" + "---|" * len(evals))
    means = sampled.group_by("method", "steps_trained").agg(pl.col("pass_at_1", "ood_pass_at_1", "mean_len").mean())
    for arm in plan.arms:
        mine = {r["steps_trained"]: r for r in means.filter(pl.col("method") == arm).iter_rows(named=True)}
        def cell(r: dict) -> str:
            ood = "–" if r["ood_pass_at_1"] is None else f"{r['ood_pass_at_1']:.3f}"
            return f"{r['pass_at_1']:.3f} / {ood} / {r['mean_len']:.1f}"

        cells = [cell(mine[s]) if s in mine else "–" for s in evals]
        print(f"| {arm} | " + " | ".join(cells) + " |")
    # Paired differences against GRPO at every evaluation: does an ordering hold along the way?
    print("\nEach arm − GRPO, in-domain pass@1, at each evaluation (mean ± 95% interval):\n")
    print("| method | " + " | ".join(f"step {s}" for s in evals if s) + " |\n|---|" + "---|" * len(evals[1:]))
    by_step = {s: paired_at(s) for s in evals if s}
    for arm in plan.arms:
        if arm != "grpo":
            cells = [fmt(by_step[s].get((arm, "grpo", "pass_at_1"))) for s in evals if s]
            print(f"| {arm} | " + " | ".join(cells) + " |")
    # The KD signal share along training, from every run's step metrics
    frames = []
    for arm, seed in plan.runs():
        files = sorted(plan.run_dir(arm, seed).glob("iter_*/metrics.parquet"))
        if files:
            frames.append(pl.concat([read_table(f, table="step_metrics") for f in files])
                          .select("step", "kd_signal_share", "zero_std_group_frac", "teacher_tokens")
                          .with_columns(method=pl.lit(arm), seed=pl.lit(seed)))
    if frames:
        window = 10
        metrics = pl.concat(frames).with_columns(window=pl.col("step") // window * window)
        print(f"\nKD signal share along training (median over the steps of each {window}-step window and the seeds; "
              "∞: no GRPO signal) and the share of groups with equal rewards:\n")
        windows = sorted(metrics["window"].unique().to_list())
        print("| method | " + " | ".join(f"steps {w}–{w + window - 1}" for w in windows) + " |\n|---|"
              + "---|" * len(windows))
        summary = metrics.group_by("method", "window").agg(
            pl.col("kd_signal_share").fill_nan(None).median(), pl.col("zero_std_group_frac").mean())
        for arm in plan.arms:
            mine = {r["window"]: r for r in summary.filter(pl.col("method") == arm).iter_rows(named=True)}

            def share_cell(r: dict | None) -> str:
                if r is None:
                    return "–"
                value = r["kd_signal_share"]
                shown = "–" if value is None else "∞" if value == float("inf") else f"{value:.3f}"
                return f"{shown} ({r['zero_std_group_frac']:.2f})"

            print(f"| {arm} | " + " | ".join(share_cell(mine.get(w)) for w in windows) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
