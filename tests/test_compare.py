"""`kdrl compare`: the statistics by hand, the arms' configs, the table read from run folders, and
the CI smoke comparison (every arm, 1 seed, 2 steps, tiny models) through Prefect."""

from __future__ import annotations

import asyncio
import json
import math
import re
from pathlib import Path

import polars as pl
import pytest

from flows.cli import main
from kdrl.compare import (
    ARMS,
    DEFAULT_ARMS,
    ci95_halfwidth,
    collect,
    comparison_table,
    load_plan,
    plan_compare,
    prepare,
    write_comparison,
)
from kdrl.storage import STEP_METRICS, RunPaths, read_table, write_table

TINY = {
    "run.checkpoint_every": 1, "embedded.teacher_steps": 3, "embedded.student_steps": 3,
    "data.num_train": 24, "data.num_heldout": 4, "data.max_digits": 2,
    "rollout.prompts_per_step": 3, "rollout.samples_per_prompt": 4, "rollout.max_new_tokens": 12,
    "optim.lr": 1e-3, "optim.micro_batch_size": 6, "run.num_threads": 1,
}


def _sets(settings: dict) -> list[str]:
    return [f"{key}={value}" for key, value in settings.items()]


def test_ci95_is_the_student_t_interval():
    # n=3: mean 0.6, sd 0.1, t_{0.975,2} = 4.303 → 4.303 * 0.1 / sqrt(3)
    assert ci95_halfwidth([0.5, 0.6, 0.7]) == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    # n=2: sd = |a-b|/sqrt(2), t = 12.706
    assert ci95_halfwidth([0.2, 0.4]) == pytest.approx(12.706 * (0.2 / math.sqrt(2)) / math.sqrt(2))
    assert ci95_halfwidth([0.3, 0.3, 0.3]) == 0.0
    assert ci95_halfwidth([0.3]) is None
    # large n tends to the normal interval
    values = [float(i % 2) for i in range(400)]
    assert ci95_halfwidth(values) == pytest.approx(1.966 * 0.5006 / 20, rel=1e-3)


def test_every_arm_shares_data_and_budget_and_differs_only_in_its_method(tmp_path):
    plan = plan_compare(None, _sets({"run.runs_dir": tmp_path, "run.steps": 7}), arms=tuple(ARMS), seeds=2)
    assert plan.root.parent == tmp_path and plan.root.name.startswith("compare-")
    assert plan.seeds == (0, 1)
    configs = {(arm, seed): plan.config(arm, seed) for arm, seed in plan.runs()}
    assert len({c.hash() for c in configs.values()}) == len(configs)  # every run distinct
    for (arm, seed), cfg in configs.items():
        assert cfg.data == configs[("grpo", 0)].data and cfg.run.steps == 7 and cfg.run.seed == seed
        assert cfg.run.runs_dir == str(plan.root) and cfg.rollout == configs[("grpo", 0)].rollout.model_copy(
            update={"source": cfg.rollout.source})
    sft, grpo, k3 = configs[("sft", 0)], configs[("grpo", 0)], configs[("kdrl_k3", 0)]
    assert sft.rollout.source == "teacher" and sft.loss.nll_coef == 1.0 and not sft.uses_teacher
    assert not grpo.uses_teacher and grpo.loss.pg_coef == 1.0
    assert configs[("kd_rkl", 0)].loss.pg_coef == 0.0 and configs[("kd_rkl", 0)].loss.kl_estimator == "k2"
    assert k3.loss.kl_estimator == "k3" and k3.loss.beta_schedule == "constant" and k3.loss.beta_init == 5e-3
    assert configs[("kdrl_anneal", 0)].loss.beta_schedule == "linear"
    assert configs[("kdrl_mask_group", 1)].loss.kd_mask == "group"
    assert configs[("kdrl_topk", 0)].teacher.top_k == 16
    assert configs[("kdrl_beta10", 0)].loss.beta_init == 10 * configs[("kdrl", 0)].loss.beta_init
    # the same command plans the same folder; another budget another one
    same_budget = plan_compare(None, _sets({"run.runs_dir": tmp_path, "run.steps": 7}), arms=tuple(ARMS), seeds=2)
    assert same_budget.root == plan.root
    other_budget = plan_compare(None, _sets({"run.runs_dir": tmp_path, "run.steps": 8}), arms=tuple(ARMS), seeds=2)
    assert other_budget.root != plan.root


# The arms as they were written before they were derived from PRESETS (issue 14): the overrides
# each arm's run was made with. Comparisons made then must plan the same configs now.
ARMS_BEFORE = {
    "sft": ("run.method=sft",), "grpo": ("run.method=grpo",), "kd_rkl": ("run.method=kd_rkl",),
    "kdrl": ("run.method=kdrl",), "kdrl_anneal": ("run.method=kdrl_anneal",),
    "kdrl_mask_response": ("run.method=kdrl_mask_response",), "kdrl_mask_group": ("run.method=kdrl_mask_group",),
    "kdrl_k3": ("run.method=kdrl", "loss.kl_estimator=k3"),
    "kdrl_topk": ("run.method=kdrl", "loss.kl_estimator=topk", "teacher.top_k=16"),
    "kdrl_beta10": ("run.method=kdrl", "loss.beta_init=0.05"),  # added with the chain task
}


def test_every_arm_plans_the_config_it_planned_before_under_a_preset_name(tmp_path):
    from kdrl.config import PRESETS, load_config

    assert list(ARMS) == list(ARMS_BEFORE) and set(DEFAULT_ARMS) <= set(ARMS)
    base = _sets({"run.runs_dir": tmp_path, "loss.beta_min": 2e-3})  # a base override the presets must not undo
    plan = plan_compare(None, base, arms=tuple(ARMS), seeds=1)
    for arm, before in ARMS_BEFORE.items():
        then = load_config(None, [*plan.overrides, *before, "run.seed=0", f"run.runs_dir={plan.root}"])
        now = plan.config(arm, 0)
        assert now == then and now.hash() == then.hash(), arm
        assert now.run.method in PRESETS and now.run.method == before[0].removeprefix("run.method="), arm


def test_bad_arms_and_configs_fail_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="unknown arm.*'ppo'"):
        plan_compare(None, [f"run.runs_dir={tmp_path}"], arms=("grpo", "ppo"))
    with pytest.raises(ValueError, match="loss.beta_int"):
        plan_compare(None, [f"run.runs_dir={tmp_path}", "loss.beta_int=0.1"])
    with pytest.raises(ValueError, match="seeds"):
        plan_compare(None, [f"run.runs_dir={tmp_path}"], seeds=0)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_holding_another_comparison_is_refused(tmp_path):
    plan = plan_compare(None, [f"run.runs_dir={tmp_path}"], arms=("grpo",), seeds=1, name="mine")
    prepare(plan)
    prepare(plan)  # the same comparison again: fine
    other = plan_compare(None, [f"run.runs_dir={tmp_path}"], arms=("grpo", "kdrl"), seeds=1, name="mine")
    with pytest.raises(ValueError, match="holds another comparison"):
        prepare(other)
    assert load_plan(plan.root) == plan


def _fake_run(plan, arm, seed, *, final_acc: float, greedy_acc: float, length: int, teacher_tokens: int,
              ood_acc: float | None = None, kd_share: float = 0.0):
    """A run folder as a finished run leaves it: config, baseline + final evaluations, metrics.
    With `ood_acc`, 10 out-of-domain prompts too, answered `ood_acc` times as well as the others
    with responses twice as long."""
    paths = RunPaths(plan.run_dir(arm, seed))
    paths.root.mkdir(parents=True)
    paths.config.write_text(f"run: {{method: {arm}, steps: 2}}\n")
    steps = plan.config(arm, seed).run.steps

    def evaluations(step, acc, greedy, models=("student",)):
        rows = []
        for model in models:
            for temperature, k, p in ((0.6, 4, acc), (0.0, 1, greedy)):
                for prompt in range(10):  # 10 prompts, accuracy p: the first p*10 prompts right
                    for sample in range(k):
                        rows.append({"step": step, "prompt_id": prompt, "sample_idx": sample, "split": "heldout",
                                     "model": model, "temperature": temperature, "completion_text": "x",
                                     "completion_len": length, "finish_reason": "stop", "extracted_answer": "1",
                                     "correct": prompt < round(p * 10)})
                for prompt in range(10, 20) if ood_acc is not None else ():  # 10 out-of-domain prompts
                    for sample in range(k):
                        rows.append({**rows[-1], "prompt_id": prompt, "sample_idx": sample, "split": "ood",
                                     "completion_len": 2 * length, "correct": prompt - 10 < round(ood_acc * p * 10)})
        return pl.DataFrame(rows)

    # the teacher is evaluated beside the baseline only where the run loads one (not GRPO's)
    baseline = ("student", "teacher") if plan.config(arm, seed).loads_teacher else ("student",)
    write_table(evaluations(-1, 0.1, 0.2, baseline), paths.offline / "eval_baseline.parquet", table="evaluations")
    write_table(evaluations(steps - 1, final_acc, greedy_acc), paths.evaluation(steps - 1), table="evaluations")
    for step in range(steps):
        row = {name: 0.0 for name in STEP_METRICS}
        row.update(step=step, num_tokens=100, teacher_tokens=teacher_tokens, time_total_s=1.5, kd_signal_share=kd_share)
        write_table(pl.DataFrame([row], schema=STEP_METRICS), paths.metrics(step), table="step_metrics")


def test_the_table_is_mean_and_interval_over_seeds_at_the_final_step(tmp_path):
    plan = plan_compare(None, _sets({"run.runs_dir": tmp_path, "run.steps": 2, "run.eval_samples": 4,
                                     "run.eval_temperature": 0.6}), arms=("grpo", "kdrl"), seeds=3, name="fake")
    prepare(plan)
    for seed, (acc, greedy) in enumerate([(0.5, 0.6), (0.6, 0.6), (0.7, 0.9)]):
        _fake_run(plan, "grpo", seed, final_acc=acc, greedy_acc=greedy, length=20, teacher_tokens=0)
    _fake_run(plan, "kdrl", 0, final_acc=0.8, greedy_acc=0.8, length=10, teacher_tokens=40)  # one seed so far
    runs, curves = collect(plan, {("grpo", 0): 12.0})
    assert runs.height == 4 and runs.filter(method="grpo", seed=0)["wall_s"][0] == 12.0
    assert runs.filter(method="kdrl")["teacher_tokens"][0] == 80 and runs["train_time_s"][0] == pytest.approx(3.0)
    assert sorted(curves["steps_trained"].unique().to_list()) == [0, 2]
    table = comparison_table(plan, runs, curves)
    # the first arm (GRPO) evaluated no teacher: the reference comes from the first run that did
    assert table["method"].to_list() == ["student@0", "teacher", "grpo", "kdrl"]
    grpo = table.filter(method="grpo").row(0, named=True)
    assert grpo["seeds"] == 3 and grpo["pass_at_1"] == pytest.approx(0.6)
    assert grpo["pass_at_1_ci95"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert grpo["greedy"] == pytest.approx(0.7) and grpo["mean_len"] == 20 and grpo["mean_len_ci95"] == 0
    assert grpo["wall_s"] == 12.0 and grpo["teacher_tokens"] == 0
    kdrl = table.filter(method="kdrl").row(0, named=True)
    assert kdrl["seeds"] == 1 and kdrl["pass_at_1_ci95"] is None and kdrl["teacher_tokens"] == 80
    assert table.filter(method="student@0")["pass_at_1"][0] == pytest.approx(0.1)
    assert table.filter(method="teacher")["greedy"][0] == pytest.approx(0.2)

    out = write_comparison(plan, {("grpo", 0): 12.0})
    assert read_table(out.comparison, table="comparison").equals(table)
    markdown = Path(out.markdown).read_text()
    assert "| grpo | 3 | 0.600 ± 0.248 | 0.700 ± 0.430 | 20.0 ± 0.0 | 0 | 12 |" in markdown
    assert Path(out.plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # wall times measured earlier survive a rewrite that measured nothing new
    runs = read_table(write_comparison(plan, plot=False).runs, table="compare_runs")
    assert runs.filter(method="grpo", seed=0)["wall_s"][0] == 12.0


@pytest.mark.parametrize("arms", [("grpo", "kdrl"), ("sft", "grpo", "kd_rkl", "kdrl", "kdrl_anneal")])
def test_the_plot_reads_from_zero_on_integer_steps_with_labelled_bands_for_few_arms(arms, tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    from kdrl.compare import MAX_BANDS, curve_figure

    plan = plan_compare(None, _sets({"run.runs_dir": tmp_path, "run.steps": 3, "run.eval_samples": 4,
                                     "run.eval_temperature": 0.6}), arms=arms, seeds=2, name="plot")
    prepare(plan)
    for arm in arms:
        for seed in range(2):
            _fake_run(plan, arm, seed, final_acc=0.5 + 0.1 * seed, greedy_acc=0.5, length=20, teacher_tokens=0)
    fig = curve_figure(plan, collect(plan)[1])
    acc, length = fig.axes
    assert acc.get_ylim() == (0, 1) and length.get_ylim()[0] == 0
    assert all(float(t).is_integer() for ax in (acc, length) for t in ax.get_xticks())
    bands = [c for c in acc.collections if isinstance(c, PolyCollection)]
    if len(arms) <= MAX_BANDS:  # one band per arm, and the title says what it is
        assert len(bands) == len(arms) and "band: 95% interval" in acc.get_title()
    else:  # too many to tell apart: mean lines only
        assert bands == [] and acc.get_title() == "accuracy (mean of 2 seeds)"
    assert [t.get_text() for t in acc.get_legend().get_texts()] == [*arms, "teacher"]
    plt.close(fig)


def test_smoke_compare_every_arm_one_seed_two_steps(tmp_path, capsys, prefect_harness, embedded_cache):
    """The CI smoke comparison: all default arms on the tiny models, through the kdrl-compare
    flow (one kdrl-train subflow per arm); then the same command again skips every run."""
    settings = {**TINY, "run.runs_dir": tmp_path / "runs", "run.cache_dir": embedded_cache,
                "run.report_to": "[tensorboard]"}
    argv = ["compare", "--seeds", "1", "--steps", "2", "--eval-samples", "2", "--eval-every", "1", "--name", "smoke",
            *[arg for s in _sets(settings) for arg in ("--set", s)]]
    assert main(argv) == 0
    out = capsys.readouterr().out
    root = tmp_path / "runs" / "smoke"
    table = read_table(root / "comparison.parquet", table="comparison")
    assert table["method"].to_list() == ["student@0", "teacher", *DEFAULT_ARMS]
    assert table.filter(pl.col("steps") == 2)["seeds"].to_list() == [1] * len(DEFAULT_ARMS)
    runs = read_table(root / "runs.parquet", table="compare_runs")
    assert runs["steps_done"].to_list() == [2] * len(DEFAULT_ARMS) and runs["wall_s"].is_not_null().all()
    tokens = dict(zip(runs["method"], runs["teacher_tokens"]))
    assert tokens["sft"] == 0 and tokens["grpo"] == 0 and tokens["kd_rkl"] > 0 and tokens["kdrl"] > 0
    curves = read_table(root / "curves.parquet", table="compare_curves")
    assert sorted(curves["steps_trained"].unique().to_list()) == [0, 1, 2]  # eval_every 1
    assert (root / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "kdrl_k3" in (root / "comparison.md").read_text() and "kdrl_k3" in out
    # run.report_to: every arm is a TensorBoard run, and the comparison one of its own (table + plot)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert all((root / f"{arm}-s0" / "tensorboard").is_dir() for arm in DEFAULT_ARMS)
    events = EventAccumulator(str(root / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert events.Tags()["images"] == ["comparison"] and "comparison/text_summary" in events.Tags()["tensors"]

    from prefect.client.orchestration import get_client

    async def artifact():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    from tasks.report import artifact_key

    artifacts = {a.key: a for a in asyncio.run(artifact())}
    markdown = artifacts[artifact_key(root, "comparison")]
    assert "data:image/png;base64," in markdown.data and "| kdrl_anneal | 1 |" in markdown.data
    # per-iteration tables, every step so far in the latest version; keyed by run folder (the arms
    # of another comparison have the same names); a gap not measured (SFT trains on teacher
    # samples) is null, not NaN
    sft_rows = json.loads(artifacts[artifact_key(root / "sft-s0", "iteration")].data)
    grpo_rows = json.loads(artifacts[artifact_key(root / "grpo-s0", "iteration")].data)
    assert [r["step"] for r in sft_rows] == [r["step"] for r in grpo_rows] == [0, 1]
    assert all(r["rollout_logp_gap_max"] is None for r in sft_rows)
    assert all(0 <= r["rollout_logp_gap_max"] < 1e-4 and r["time_sync_s"] == 0 for r in grpo_rows)
    assert grpo_rows[1]["heldout_pass_at_1"] is not None  # eval_every 1

    before = {p: p.stat().st_mtime_ns for p in root.glob("*/iter_*/metrics.parquet")}
    assert main(argv) == 0  # complete runs are skipped, the tables are rewritten the same
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/iter_*/metrics.parquet")} == before
    assert read_table(root / "comparison.parquet", table="comparison").equals(table)


def test_out_of_domain_columns_and_paired_differences_by_hand(tmp_path):
    import matplotlib.pyplot as plt

    from kdrl.compare import final_rows, paired_differences, panels_figure

    plan = plan_compare(None, _sets({"run.runs_dir": tmp_path, "run.steps": 2, "run.eval_samples": 4,
                                     "run.eval_temperature": 0.6}),
                        arms=("grpo", "kd_rkl", "kdrl"), seeds=3, name="ood")
    prepare(plan)
    accs = {"grpo": (0.5, 0.6, 0.7), "kd_rkl": (0.6, 0.6, 0.9), "kdrl": (0.7, 0.8, 0.8)}
    for arm, values in accs.items():
        for seed, acc in enumerate(values):
            _fake_run(plan, arm, seed, final_acc=acc, greedy_acc=acc, length=20 + seed, teacher_tokens=0,
                      ood_acc=0.5, kd_share=0.0 if arm == "grpo" else 0.1 * (seed + 1))
    runs, curves = collect(plan)
    assert runs.filter(method="kdrl")["kd_signal_share"].to_list() == pytest.approx([0.1, 0.2, 0.3])
    final = final_rows(plan, curves)
    # 10 OOD prompts answered half as often as the in-domain ones: round(0.5 * acc * 10) of them
    assert final.filter(method="grpo").sort("seed")["ood_pass_at_1"].to_list() == pytest.approx([0.2, 0.3, 0.4])
    assert final.filter(method="grpo", seed=0)["ood_mean_len"][0] == 40
    table = comparison_table(plan, runs, curves)
    kdrl = table.filter(method="kdrl").row(0, named=True)
    assert kdrl["ood_pass_at_1"] == pytest.approx(0.4) and kdrl["kd_signal_share"] == pytest.approx(0.2)
    assert kdrl["ood_pass_at_1_ci95"] == pytest.approx(0)  # 0.4 on each seed: round(0.35·10) = round(0.4·10) = 4
    paired = paired_differences(plan.arms, final)
    # kdrl − grpo per seed: 0.2, 0.2, 0.1 → mean 0.1667, sd 0.0577, t(2) = 4.303
    row = paired.filter(method="kdrl", reference="grpo", metric="pass_at_1").row(0, named=True)
    assert row["seeds"] == 3 and row["diff"] == pytest.approx(0.5 / 3)
    assert row["diff_ci95"] == pytest.approx(4.303 * math.sqrt(1 / 300) / math.sqrt(3))
    # lengths are equal seed by seed: the paired difference is exactly 0 while each arm varies
    length = paired.filter(method="kdrl", reference="grpo", metric="mean_len").row(0, named=True)
    assert length["diff"] == 0 and length["diff_ci95"] == 0
    assert set(paired["reference"]) == {"grpo", "kd_rkl", "kdrl"}
    assert paired.filter(method="grpo", reference="grpo").height == 0 and paired.height == 6 * 3
    out = write_comparison(plan)
    assert read_table(out.paired, table="compare_paired").equals(paired)
    markdown = Path(out.markdown).read_text()
    assert "| OOD pass@1 | KD share |" in markdown and "| kdrl | grpo | 3 | +0.167 ± 0.143 |" in markdown
    assert "comparison-panels.png" in markdown and Path(out.panels).read_bytes()[:4] == b"\x89PNG"
    fig = panels_figure(plan, curves)  # rows: in-domain, out-of-domain, length; one column per arm
    assert len(fig.axes) == 9 and [ax.get_title() for ax in fig.axes[:3]] == ["grpo", "kd_rkl", "kdrl"]
    plt.close(fig)


@pytest.mark.slow
def test_chain_task_smoke_two_processes_share_one_comparison(tmp_path):
    """The CI smoke of the chain task (1 seed, 2 steps, tiny models; data/configs/chain.yaml): two
    `kdrl compare` processes started together on the same folder and an empty model cache. One
    warm-starts the embedded models while the other waits for them; each run is trained once; the
    tables hold every arm, with out-of-domain pass@1 and the paired differences."""
    import os
    import subprocess
    import sys

    root_dir = Path(__file__).resolve().parents[1]
    settings = {**TINY, "run.runs_dir": tmp_path / "runs", "run.cache_dir": tmp_path / "cache",
                "data.max_digits": 2, "rollout.max_new_tokens": 24}
    argv = [sys.executable, "-m", "flows.cli", "compare", "--config", str(root_dir / "data/configs/chain.yaml"),
            "--no-prefect", "--seeds", "1", "--steps", "2", "--eval-samples", "2", "--methods", "grpo,kd_rkl,kdrl",
            "--name", "chain-smoke", *[arg for s in _sets(settings) for arg in ("--set", s)]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen(argv, cwd=root_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    logs = "\n".join(outs)
    assert logs.count("training the tiny teacher") == 1 and logs.count("training the tiny student") == 1
    root = tmp_path / "runs" / "chain-smoke"
    runs = read_table(root / "runs.parquet", table="compare_runs")
    assert sorted(runs["method"]) == ["grpo", "kd_rkl", "kdrl"] and runs["steps_done"].to_list() == [2, 2, 2]
    skipped = re.compile(r"(\S+-s0)(?: is complete| is being trained by PID \d+ on \S+|: .*locked.*): skipped")
    # each run trained by one of the two and skipped by the other
    assert sorted(m.group(1) for m in skipped.finditer(logs)) == ["grpo-s0", "kd_rkl-s0", "kdrl-s0"], logs
    table = read_table(root / "comparison.parquet", table="comparison")
    assert table["method"].to_list() == ["student@0", "teacher", "grpo", "kd_rkl", "kdrl"]
    assert table["ood_pass_at_1"].is_not_null().all()
    paired = read_table(root / "paired.parquet", table="compare_paired")
    assert set(zip(paired["method"], paired["reference"])) == {
        ("kd_rkl", "grpo"), ("kdrl", "grpo"), ("grpo", "kd_rkl"), ("kdrl", "kd_rkl"), ("grpo", "kdrl"),
        ("kd_rkl", "kdrl")}
    assert set(paired["metric"]) == {"pass_at_1", "ood_pass_at_1", "mean_len"}
    evaluations = read_table(root / "kdrl-s0" / "offline" / "eval_baseline.parquet", table="evaluations")
    assert evaluations.group_by("model", "split").len().height == 4  # student and teacher, in and out of domain
    assert (root / "comparison-panels.png").read_bytes()[:4] == b"\x89PNG"
