"""The stages over files (kdrl.pipeline) and the flow body run without Prefect: teacher offload,
SFT from precomputed teacher samples, and refusing to mix configs in one run directory."""

from pathlib import Path

import polars as pl
import pytest

from flows.train import train_without_prefect
from kdrl.pipeline import write_evaluation, write_rewards, write_rollouts, write_teacher_logprobs
from kdrl.storage import RunPaths, read_table
from kdrl.workers import load_run


def test_teacher_offload_frees_the_teacher_and_changes_nothing(tmp_path, tiny_run_config, embedded_cache):
    outputs = {}
    for offload in (False, True):
        cfg = tiny_run_config(tmp_path, **{"teacher.offload": offload, "run.cache_dir": embedded_cache})
        s = load_run(cfg, tmp_path / "runs" / f"offload-{offload}", log=lambda _: None)
        rollouts = write_rollouts(s.info, s.rollout, s.prompts, 0)
        rewards = write_rewards(s.info, rollouts, s.prompts, 0)
        out = write_teacher_logprobs(s.info, s.teacher, rollouts, rewards, 0)
        assert (s.teacher._model is None) == offload
        outputs[offload] = read_table(out.path, table="teacher_logprobs")
    assert outputs[True].equals(outputs[False])


@pytest.mark.parametrize("top_k", [0, 3])
def test_sft_trains_on_precomputed_teacher_samples(tmp_path, top_k, tiny_run_config, embedded_cache):
    cfg = tiny_run_config(tmp_path, **{"run.method": "sft", "run.steps": 2, "teacher.top_k": top_k,
                                        "run.cache_dir": embedded_cache})
    run_dir = tmp_path / "runs" / "sft"
    train_without_prefect(cfg, run_dir)
    paths = RunPaths(run_dir)
    pool = read_table(paths.offline / "teacher_samples.parquet", table="rollouts")
    # exactly the prompts the run's 2 steps draw (3 each), G=4 samples each; not all 24 train prompts
    drawn = {pid for step in range(2) for pid in read_table(paths.rollouts(step), table="rollouts")["prompt_id"]}
    assert pool["step"].unique().to_list() == [-1] and set(pool["prompt_id"]) == drawn and pool.height == 2 * 3 * 4
    teacher_rewards = read_table(paths.offline / "teacher_rewards.parquet", table="rewards")
    assert teacher_rewards.select("prompt_id", "sample_idx").equals(pool.select("prompt_id", "sample_idx"))
    topk_file = paths.offline / "teacher_logprobs.parquet"
    assert topk_file.exists() == (top_k > 0)
    if top_k:
        scores = read_table(topk_file, table="teacher_logprobs")
        assert scores["topk_ids"].list.eval(pl.element().list.len()).explode().unique().to_list() == [3]
    step1 = read_table(paths.rollouts(1), table="rollouts")
    expected = pool.filter(pl.col("prompt_id").is_in(step1["prompt_id"].unique().to_list())).drop("step")
    assert step1.drop("step").sort("prompt_id", "sample_idx").equals(expected.sort("prompt_id", "sample_idx"))
    metrics = pl.read_parquet(str(run_dir / "iter_*" / "metrics.parquet"))
    assert (metrics["nll_loss"] > 0).all() and (metrics["pg_loss"] == 0).all()
    assert (metrics["teacher_tokens"] == 0).all()


def test_a_run_directory_keeps_its_config(tmp_path, tiny_run_config, embedded_cache):
    cfg = tiny_run_config(tmp_path, **{"run.steps": 1, "run.cache_dir": embedded_cache})
    run_dir = tmp_path / "runs" / "fixed"
    load_run(cfg, run_dir, log=lambda _: None)
    other = tiny_run_config(tmp_path, **{"run.steps": 1, "loss.beta_init": 0.1, "run.cache_dir": embedded_cache})
    with pytest.raises(ValueError, match="started with another config"):
        load_run(other, run_dir, log=lambda _: None)


def test_the_baseline_of_a_resumed_run_uses_the_initial_weights(tmp_path, tiny_run_config, embedded_cache):
    cfg = tiny_run_config(tmp_path, **{"run.steps": 2, "optim.lr": 1e-2, "run.cache_dir": embedded_cache})
    run_dir = tmp_path / "runs" / "baseline"
    train_without_prefect(cfg, run_dir)
    paths = RunPaths(run_dir)
    original = read_table(paths.offline / "eval_baseline.parquet", table="evaluations")
    trained = read_table(paths.evaluation(1), table="evaluations")
    student_texts = lambda df: df.filter(model="student")["completion_text"].to_list()  # noqa: E731
    assert student_texts(trained) != student_texts(original)  # training changed the outputs: the check below can fail
    s = load_run(cfg, run_dir, log=lambda _: None)  # resumed after step 1
    mtime = (paths.offline / "eval_baseline.parquet").stat().st_mtime_ns
    evaluate = lambda step: write_evaluation(s.info, s.student, s.rollout, s.teacher, s.prompts, step,  # noqa: E731
                                             include_teacher=step < 0)
    assert evaluate(-1).seconds == 0.0  # the record is not recomputed
    assert (paths.offline / "eval_baseline.parquet").stat().st_mtime_ns == mtime
    (paths.offline / "eval_baseline.parquet").unlink()
    for cached in (Path(embedded_cache) / "evaluations").glob("student-*.parquet"):
        cached.unlink()  # not from the cache of baselines either
    evaluate(-1)  # recomputed: from the initial weights, not step 1's
    assert read_table(paths.offline / "eval_baseline.parquet", table="evaluations").equals(original)
    with pytest.raises(ValueError, match="student is at step 1"):
        evaluate(0)


def test_step_metrics_report_response_lengths_truncation_and_signal(tmp_path, tiny_run_config):
    """max_new_tokens 6 cuts most worked answers: the cut ones score 0 and are counted, and the
    length quantiles are those of the step's rollouts."""
    cfg = tiny_run_config(tmp_path, **{"run.steps": 2, "rollout.max_new_tokens": 6})
    run_dir = tmp_path / "runs" / "lengths"
    train_without_prefect(cfg, run_dir)
    paths = RunPaths(run_dir)
    for step in range(2):
        m = read_table(paths.metrics(step), table="step_metrics").row(0, named=True)
        rollouts = read_table(paths.rollouts(step), table="rollouts")
        rewards = read_table(paths.rewards(step), table="rewards")
        lengths = sorted(rollouts["completion_token_ids"].list.len().to_list())
        n = len(lengths)
        assert m["response_len_max"] == lengths[-1] == 6
        assert m["response_len_p50"] == lengths[(n - 1) // 2] and m["response_len_p90"] == lengths[int(0.9 * (n - 1))]
        cut = rewards.filter(pl.col("truncated"))
        assert m["truncated_frac"] == cut.height / n > 0
        assert (cut["reward"] == 0).all()
        assert m["no_answer_frac"] == rewards["extracted_answer"].null_count() / n
        # the signal: reward spread, groups without any (all rewards equal), KD's share of the push
        assert m["reward_std"] == pytest.approx(float(rewards["reward"].std(ddof=0)))
        flat = rewards.group_by("prompt_id").agg(pl.col("reward").n_unique() == 1)["reward"]
        assert m["zero_std_group_frac"] == pytest.approx(float(flat.mean()))
        # all rewards equal in every group (most answers are cut here): GRPO has no push, KD all of it
        expected = float("inf") if m["zero_std_group_frac"] == 1 else pytest.approx(m["kd_signal_share"])
        assert cfg.loads_teacher and m["kd_signal_share"] == expected and m["kd_signal_share"] > 0


def test_model_gradient_checkpointing_is_applied_to_the_student(tmp_path, tiny_run_config, embedded_cache):
    cfg = tiny_run_config(tmp_path, **{"run.steps": 1, "model.gradient_checkpointing": True,
                                        "optim.max_tokens_per_microbatch": 64, "run.cache_dir": embedded_cache})
    s = load_run(cfg, tmp_path / "runs" / "gc", log=lambda _: None)
    try:
        assert s.student.model.is_gradient_checkpointing
        assert all(layer.gradient_checkpointing for layer in s.student.model.model.layers)
    finally:
        s.close()
    train_without_prefect(cfg, tmp_path / "runs" / "gc")  # generation (eval mode) and the update both run
    assert read_table(RunPaths(tmp_path / "runs" / "gc").metrics(0), table="step_metrics")["grad_norm"][0] > 0


def test_the_baseline_evaluation_is_cached_across_runs(tmp_path, tiny_run_config, embedded_cache, monkeypatch):
    """Every run of the same untrained models on the same prompts and protocol shares one baseline
    evaluation (kdrl.pipeline.baseline_cache_path); anything it depends on changes the key, and
    an unreadable cache file is evaluated again and replaced."""
    import kdrl.pipeline as pipeline

    calls = []
    evaluate_passes = pipeline.evaluate_passes

    def counted(engine, prompts, *, step, model_name, **kw):
        calls.append((step, model_name))
        return evaluate_passes(engine, prompts, step=step, model_name=model_name, **kw)

    monkeypatch.setattr(pipeline, "evaluate_passes", counted)
    # a protocol no other test uses, so the first run below is the first to evaluate it
    protocol = {"run.eval_samples": 2, "run.eval_temperature": 0.9, "run.seed": 4321, "run.steps": 1,
                "run.cache_dir": embedded_cache}
    baseline = lambda run: read_table(RunPaths(run).offline / "eval_baseline.parquet", table="evaluations")  # noqa: E731

    first = train_without_prefect(tiny_run_config(tmp_path, **protocol), tmp_path / "runs" / "a")
    assert sorted(c for c in calls if c[0] < 0) == [(-1, "student"), (-1, "teacher")]
    cached = sorted((Path(embedded_cache) / "evaluations").glob("*.parquet"))
    assert {p.name.split("-")[0] for p in cached} >= {"student", "teacher"}

    calls.clear()  # another run (another lr: another run id) of the same models and protocol
    second = train_without_prefect(tiny_run_config(tmp_path, **protocol, **{"optim.lr": 5e-3}), tmp_path / "runs" / "b")
    assert [c for c in calls if c[0] < 0] == []
    assert baseline(second).equals(baseline(first))
    assert pl.read_parquet(RunPaths(second).offline / "eval_baseline.parquet")["run_id"].unique().to_list() == ["b"]

    calls.clear()  # the protocol is in the key: another seed of a sampled evaluation is evaluated
    train_without_prefect(tiny_run_config(tmp_path, **{**protocol, "run.seed": 4322}), tmp_path / "runs" / "c")
    assert sorted(c for c in calls if c[0] < 0) == [(-1, "student"), (-1, "teacher")]

    calls.clear()  # a damaged cache file: evaluated again (same rows), and replaced
    for path in (Path(embedded_cache) / "evaluations").glob("*.parquet"):
        path.write_bytes(b"not parquet")
    third = train_without_prefect(tiny_run_config(tmp_path, **protocol, **{"optim.lr": 2e-3}), tmp_path / "runs" / "d")
    assert sorted(c for c in calls if c[0] < 0) == [(-1, "student"), (-1, "teacher")]
    assert baseline(third).equals(baseline(first))
    calls.clear()
    train_without_prefect(tiny_run_config(tmp_path, **protocol, **{"optim.lr": 3e-3}), tmp_path / "runs" / "e")
    assert [c for c in calls if c[0] < 0] == []


def test_a_baseline_cache_that_cannot_be_written_does_not_stop_the_run(tmp_path, tiny_run_config, caplog):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "evaluations").write_text("a file where the cache's folder would go")
    cfg = tiny_run_config(tmp_path, **{"run.steps": 1, "run.cache_dir": str(cache)})
    run = train_without_prefect(cfg, tmp_path / "runs" / "uncached")
    assert read_table(RunPaths(run).offline / "eval_baseline.parquet", table="evaluations").height > 0
    assert "could not cache the baseline evaluation" in caplog.text
