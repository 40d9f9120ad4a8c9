"""cluster.backend "ray", on a real local Ray cluster (CPU): rollout replicas sample what one
engine samples, a two-rank data-parallel update equals the single-process update, and a Ray run
killed (controller kill -9 through Prefect, or one of its actors) resumes to the uninterrupted
result and leaves no Ray process behind.

The unit tests share one cluster started in this process; the runs are `kdrl train` subprocesses,
each starting (and stopping) its own, as a user's would. Starting Ray and its five actors (each
importing torch and loading its model) takes far longer than a run's three steps, so Ray runs are
few: the uninterrupted reference, one run interrupted both ways (its actor killed, then its
rerun's controller), and that run's resume; its folder as the kill left it is copied for a
resume in one process, and the local-backend runs start no Ray.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

if not os.environ.get("CI"):  # CI installs the ray extra (scripts/test.sh): there it must run
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'kdrl[ray]')")

from kdrl.batching import collate, join_step_tables
from kdrl.config import ClusterConfig, load_config
from kdrl.engines.factory import EngineSpec
from kdrl.engines.hf import HFRolloutEngine, HFTeacherScorer
from kdrl.models import load_causal_lm, load_tokenizer
from kdrl.storage import RunPaths, read_table

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray for this module's unit tests (12 logical CPUs: actors share the 2 cores)."""
    from kdrl.cluster import RayCluster

    cluster = RayCluster.connect(ClusterConfig(backend="ray", num_cpus=12))
    yield cluster
    cluster.close()


def _config(tiny_model_dir: Path, **extra):
    settings = {"model.name_or_path": tiny_model_dir / "student", "teacher.name_or_path": tiny_model_dir / "teacher",
                "cluster.backend": "ray", "rollout.engine": "hf", "teacher.engine": "hf",
                "rollout.prompts_per_step": 3, "data.num_train": 24, "optim.lr": 1e-3, "optim.micro_batch_size": 5,
                **extra}
    return load_config(overrides=[f"{k}={v}" for k, v in settings.items()])


def test_rollouts_from_two_replicas_equal_one_replicas_key_by_key(ray_cluster, tiny_model_dir, tiny_tokenizer):
    from kdrl.cluster import ShardedEngine, prompt_shards, rollout_group, wait_ready

    cfg = _config(tiny_model_dir, **{"rollout.batch_size": 8})
    spec = EngineSpec("hf", str(tiny_model_dir / "student"), "float32", cfg.rollout.vllm, 8, seed=0)
    two, one = rollout_group(cfg, spec, replicas=2), rollout_group(cfg, spec, replicas=1)
    wait_ready(two, one)
    prompts = tiny_tokenizer(["12+34=", "5+7=", "123+9=", "8+8=", "40+2=", "3+99="])["input_ids"]
    assert prompt_shards(len(prompts), 4, 2, 8) == [(0, 4), (4, 6)]  # both replicas sample: 16 and 8 rows
    sampling = {"n": 4, "max_new_tokens": 10, "temperature": 1.0, "seed": 123}
    from_two = ShardedEngine(two, chunk_rows=8).generate(prompts, **sampling)
    from_one = ShardedEngine(one, chunk_rows=8).generate(prompts, **sampling)
    assert from_two == from_one  # every field of every row, log-probs bit for bit
    # and what this process's engine samples (tokens; log-probs to float rounding across thread counts)
    local = HFRolloutEngine(load_causal_lm(spec.model_path), tiny_tokenizer, batch_size=8).generate(prompts, **sampling)
    assert local.completion_token_ids == from_two.completion_token_ids
    assert local.prompt_index == from_two.prompt_index and local.sample_index == from_two.sample_index
    for a, b in zip(local.sampler_logprobs, from_two.sampler_logprobs):
        assert a == pytest.approx(b, abs=1e-5)
    assert len({tuple(c) for c in from_two.completion_token_ids}) > 12  # sampled, not one greedy answer


def test_teacher_scores_split_across_replicas_equal_one_scorers(ray_cluster, tiny_model_dir, step_tables):
    from kdrl.cluster import ShardedScorer, teacher_group, wait_ready

    cfg = _config(tiny_model_dir)
    path = str(tiny_model_dir / "teacher")
    spec = EngineSpec("hf", path, "float32", cfg.teacher.vllm, 256, seed=0)
    teachers = teacher_group(cfg, path, spec, replicas=2)
    wait_ready(teachers)
    rollouts = step_tables[0]
    prompts, completions = rollouts["prompt_token_ids"].to_list(), rollouts["completion_token_ids"].to_list()
    split = ShardedScorer(teachers).score(prompts, completions, top_k=3)
    whole = HFTeacherScorer(load_causal_lm(path), load_tokenizer(path)).score(prompts, completions, top_k=3)
    assert len(split.logprobs) == len(whole.logprobs) == 12
    for a, b in zip(split.logprobs, whole.logprobs):
        assert a == pytest.approx(b, abs=1e-5)
    assert split.topk_ids == whole.topk_ids


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_two_rank_update_equals_the_single_process_update(strategy, ray_cluster, tiny_model_dir, tiny_tokenizer,
                                                            step_tables, tmp_path):
    """Three prompt groups on two ranks: rank 0 gets two, rank 1 one, with different token counts,
    so a rank that divided by its own tokens (not the batch's, all-reduced) would weigh them
    differently from one process. With micro-batches of one row, rank 1 also makes fewer passes
    than rank 0 (FSDP2: it must join rank 0's weight gathering with zero-weighted ones). FSDP2's
    checkpoint is one process's: a local student resumes from it and takes the same next step."""
    import ray

    from kdrl.cluster import RayStudent, trainer_group, wait_ready
    from kdrl.workers import Student, load_student_model

    # optim.lr at its default: AdamW's first step is ~lr·sign(g), so where |g| is near eps the rounding
    # of a sum in another order moves a weight by up to ~lr·1e-2 (2.2e-6 at lr 1e-3)
    cfg = _config(tiny_model_dir, **{"trainer.world_size": 2, "optim.lr": 1e-4, "trainer.strategy": strategy,
                                     "optim.micro_batch_size": 4})
    path = str(tiny_model_dir / "student")
    batch = collate(join_step_tables(*step_tables), pad_token_id=tiny_tokenizer.pad_token_id)
    tokens = [int(batch.groups(a, b).completion_mask_BT.sum()) for a, b in ((0, 2), (2, 3))]
    assert tokens[0] != 2 * tokens[1]  # unequal shares: the per-rank and global denominators differ

    torch.manual_seed(cfg.run.seed)
    single = Student(cfg, load_student_model(cfg, path), load_tokenizer(path), path)
    expected = single.update(batch)
    ranks = trainer_group(cfg, path)
    wait_ready(ranks)
    student = RayStudent(cfg, tiny_tokenizer, path, ranks)
    got = student.update(batch)

    rank0 = ray.get(student.weights())
    if strategy == "ddp":
        rank1 = ray.get(ranks.actors[1].weights.remote())
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), name  # the ranks took the same step
    initial = load_causal_lm(path).state_dict()
    assert rank0.keys() == initial.keys()
    worst = max(float((rank0[n] - v).abs().max()) for n, v in single.model.state_dict().items())
    moved = max(float((rank0[n] - initial[n]).abs().max()) for n in rank0)
    assert worst <= 1e-6 and moved > 1e-5, (worst, moved)  # the step moved weights ≫ the tolerance
    assert got.metrics["num_tokens"] == expected.metrics["num_tokens"] == sum(tokens)
    for key in ("loss", "pg_loss", "kd_loss", "grad_norm", "clip_frac", "kd_token_frac", "kl_k1_mean"):
        assert got.metrics[key] == pytest.approx(expected.metrics[key], rel=1e-5, abs=1e-7), key
    assert torch.equal(got.advantages_B, expected.advantages_B) and torch.equal(got.kd_mask_B, expected.kd_mask_B)
    assert torch.allclose(got.student_logp_BT, expected.student_logp_BT, atol=1e-6)
    assert student.optimizer_step == single.optimizer_step == 1
    if strategy == "fsdp2":
        # the weight-sync check's trainer side: every sharded rank's forward, rank 0's answer
        rollouts = step_tables[0]
        args = (rollouts["prompt_token_ids"].to_list(), rollouts["completion_token_ids"].to_list())
        ours = student.score(*args)
        theirs = HFTeacherScorer(single.model, tiny_tokenizer).score(*args).logprobs
        assert max(abs(a - b) for ra, rb in zip(ours, theirs) for a, b in zip(ra, rb)) < 1e-5
        # the gathered checkpoint resumes in one process, the next step equal too
        single.save(tmp_path / "single", 0)
        student.save(tmp_path / "sharded", 0)
        for name in ("config.json", "generation_config.json"):  # the folder one process writes
            sharded, alone = (tmp_path / where / "model" / name for where in ("sharded", "single"))
            assert sharded.read_text() == alone.read_text(), name
        resumed = Student(cfg, load_student_model(cfg, path), load_tokenizer(path), path)
        resumed.restore(tmp_path / "sharded")
        reference = Student(cfg, load_student_model(cfg, path), load_tokenizer(path), path)
        reference.restore(tmp_path / "single")
        again, twice = resumed.update(batch), reference.update(batch)
        assert again.metrics["loss"] == pytest.approx(twice.metrics["loss"], rel=1e-5)
        worst = max(float((resumed.model.state_dict()[n] - v).abs().max())
                    for n, v in reference.model.state_dict().items())
        assert worst <= 1e-6, worst
        # and the sharded ranks resume from one process's checkpoint
        student.restore(tmp_path / "single")
        student.update(batch)
        worst = max(float((ray.get(student.weights())[n] - v).abs().max())
                    for n, v in reference.model.state_dict().items())
        assert worst <= 1e-6, worst
        # a checkpoint that rank 0 finds wrong fails on every rank, none left waiting in the scatter
        import shutil

        from safetensors.torch import load_file, save_file

        shutil.copytree(tmp_path / "single", tmp_path / "broken")
        file = tmp_path / "broken" / "model" / "model.safetensors"
        weights = load_file(file)
        dropped = sorted(weights)[3]
        save_file({k: v for k, v in weights.items() if k != dropped}, file, metadata={"format": "pt"})
        with pytest.raises(Exception, match=f"do not match the student's \\(missing \\['{re.escape(dropped)}'"):
            student.restore(tmp_path / "broken")
    for actor in ranks.actors:
        ray.kill(actor)


# --- runs -------------------------------------------------------------------------------------

STEPS = 3
RAY_RUN = {
    "run.method": "kdrl_anneal", "run.steps": STEPS, "run.checkpoint_every": 1, "run.eval_every": 0,
    "run.num_threads": 1, "embedded.teacher_steps": 3, "embedded.student_steps": 3,
    "data.num_train": 24, "data.num_heldout": 4, "data.max_digits": 2,
    "rollout.prompts_per_step": 3, "rollout.samples_per_prompt": 4, "rollout.max_new_tokens": 12,
    "optim.lr": 1e-3, "optim.micro_batch_size": 5,
    # two of each where it matters: 12 rows in chunks of 4 spread over both replicas
    "cluster.backend": "ray", "cluster.num_cpus": 6, "trainer.world_size": 2, "rollout.replicas": 2,
    "rollout.batch_size": 4,
}
RAY_FILES = re.compile(r"files under (/\S+kdrl-ray-\w+)\)")


@pytest.fixture(scope="module")
def ray_runs(tmp_path_factory, embedded_cache, prefect_harness):
    root = tmp_path_factory.mktemp("ray_runs")
    flags = [arg for k, v in {**RAY_RUN, "run.runs_dir": root, "run.cache_dir": embedded_cache}.items()
             for arg in ("--set", f"{k}={v}")]
    env = {k: v for k, v in os.environ.items() if k != "KDRL_FAULT"}
    env.update(PREFECT_API_URL=prefect_harness, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")  # lines as they are printed: the actor test acts on one
    return root, flags, env


LOCAL = ["--set", "cluster.backend=local", "--set", "trainer.world_size=1", "--set", "rollout.replicas=1"]
"""The same run in one process."""


def _train(ray_runs, run_id: str, *, plain: bool, fault: str | None = None, extra: list[str] = ()) -> subprocess.Popen:
    _, flags, env = ray_runs
    argv = [sys.executable, "-m", "flows.cli", "train", "--run-id", run_id, *flags, *extra,
            *(["--no-prefect"] * plain)]
    return subprocess.Popen(argv, cwd=ROOT, env={**env, **({"KDRL_FAULT": fault} if fault else {})}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def _ray_processes(files: str) -> list[int]:
    """PIDs of the processes of the local Ray whose files are under `files`: named on their
    command line, or (renamed ones: ray::DashboardAgent, ray::IDLE) holding a file open there."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            if files.encode() in (entry / "cmdline").read_bytes() or any(
                    os.readlink(fd).startswith(files) for fd in (entry / "fd").iterdir()):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _assert_no_ray_left(out: str) -> None:
    """The run's local Ray is gone: no process of it, no folder (waits up to 20 s for the reaper)."""
    [files] = RAY_FILES.findall(out) or [None]
    assert files, out[-3000:]
    deadline = time.monotonic() + 20
    while (_ray_processes(files) or Path(files).exists()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _ray_processes(files) == [] and not Path(files).exists(), files


def _assert_same_run(reference: Path, run: Path, steps: int = STEPS) -> None:
    """`run`'s first `steps` steps equal `reference`'s (the records, and the checkpoint after the last), but
    their timings."""
    a, b = RunPaths(reference), RunPaths(run)
    weights = Path("model") / "model.safetensors"
    assert (b.checkpoint(steps - 1) / weights).read_bytes() == (a.checkpoint(steps - 1) / weights).read_bytes()
    for step in range(steps):
        for name, table in (("rollouts", "rollouts"), ("teacher", "teacher_logprobs"), ("advantages", "advantages"),
                            ("metrics", "step_metrics")):
            fa, fb = (read_table(getattr(p, name)(step), table=table) for p in (a, b))
            timing = [c for c in fa.columns if c.startswith("time_") or c == "tokens_per_s"]
            assert fb.drop(timing).equals(fa.drop(timing)), f"{name} of step {step}"


@pytest.fixture(scope="module")
def ray_reference(ray_runs) -> Path:
    """An uninterrupted Ray run (plain loop): what every interrupted one must reproduce."""
    code, out = _finish(_train(ray_runs, "reference", plain=True))
    assert code == 0, out[-4000:]
    assert "[kdrl] ray: trainer 2 rank(s)" in out and "rollout hf × 2" in out, out[-4000:]
    _assert_no_ray_left(out)
    return ray_runs[0] / "reference"


@pytest.fixture(scope="module")
def interrupted(ray_runs) -> dict:
    """One Ray run ("killed") interrupted twice, each way once (a Ray start costs more than all
    three steps, so the two interruptions share a run):

    1. plain loop: rollout actor 0 is killed -9 once step 0 is done, which fails step 1;
    2. the rerun, through Prefect, resumes after step 0 and is killed -9 in the last update
       (KDRL_FAULT update:2): rollouts and checkpoint of every step but the last update on disk;
    3. the run folder as the kill left it is copied to "moved" (before any resume) for the
       world-size test.

    Returns each attempt's exit code and output, and the killed actor's PID."""
    proc = _train(ray_runs, "killed", plain=True)
    lines, victim = [], None
    for line in proc.stdout:  # the rollout actors' PIDs, then the first step's record
        lines.append(line)
        if match := re.search(r"rollout hf × 2 \(pids \[(\d+), (\d+)\]\)", line):
            victim = int(match.group(1))
        if line.startswith("[step    0]") and victim is not None:
            os.kill(victim, signal.SIGKILL)  # a Ray actor dies (OOM killer, lost node, ...)
            break
    code, rest = _finish(proc)
    actor_killed = (code, "".join(lines) + rest)
    rerun = _finish(_train(ray_runs, "killed", plain=False, fault=f"update:{STEPS - 1}"))
    root = ray_runs[0]
    shutil.copytree(root / "killed", root / "moved")
    return {"victim": victim, "actor_killed": actor_killed, "rerun": rerun}


@pytest.mark.slow
def test_a_rollout_actor_killed_mid_run_fails_the_step_clearly_and_the_rerun_resumes(ray_runs, ray_reference,
                                                                                    interrupted):
    code, out = interrupted["actor_killed"]
    assert code != 0, out[-4000:]
    victim = interrupted["victim"]
    assert re.search(rf"rollout actor 0 \(pid {victim}\) died during (the weight sync|generation)", out), out[-4000:]
    assert "rerun the same command to resume" in out
    _assert_no_ray_left(out)
    code, out = interrupted["rerun"]  # the rerun: resumed, and its one full step equals the uninterrupted run's
    assert f"resuming {ray_runs[0] / 'killed'} after step 0" in out, out[-4000:]
    _assert_same_run(ray_reference, ray_runs[0] / "killed", steps=STEPS - 1)


@pytest.mark.slow
def test_a_ray_run_through_prefect_killed_9_resumes_to_the_uninterrupted_result(ray_runs, ray_reference, interrupted):
    code, out = interrupted["rerun"]
    assert code == 137, out[-4000:]  # the controller died as with kill -9: no cleanup of its own
    _assert_no_ray_left(out)  # the reaper stopped the run's Ray all the same
    code, out = _finish(_train(ray_runs, "killed", plain=False))
    assert code == 0, out[-4000:]
    assert f"resuming {ray_runs[0] / 'killed'} after step {STEPS - 2}" in out, out[-4000:]
    _assert_no_ray_left(out)
    _assert_same_run(ray_reference, ray_runs[0] / "killed")


@pytest.mark.slow
def test_a_ray_run_resumes_in_one_process_with_another_world_size(ray_runs, ray_reference, interrupted):
    """Checkpoints are whole HF folders written by rank 0: a two-rank Ray run killed in its last
    update (a copy of the one above, as the kill left it) resumes with the local backend (one
    process, world size 1, no Prefect: the files decide) and ends where the uninterrupted two-rank
    run did, to float rounding (the gradient sums in another order)."""
    assert interrupted["rerun"][0] == 137, interrupted["rerun"][1][-4000:]
    root = ray_runs[0]
    code, out = _finish(_train(ray_runs, "moved", plain=True, extra=LOCAL))
    assert code == 0, out[-4000:]
    assert f"resuming {root / 'moved'} after step {STEPS - 2}" in out and "ray:" not in out
    a, b = RunPaths(ray_reference), RunPaths(root / "moved")
    for step in range(STEPS):  # the rollouts of every step were written by the Ray run (the last before the kill)
        assert read_table(b.rollouts(step), table="rollouts").equals(read_table(a.rollouts(step), table="rollouts"))
    from safetensors.torch import load_file

    weights = Path("model") / "model.safetensors"
    ref, moved = (load_file(p.checkpoint(STEPS - 1) / weights) for p in (a, b))
    assert max(float((ref[k] - moved[k]).abs().max()) for k in ref) <= 1e-5


@pytest.mark.slow
def test_a_ray_run_writes_the_records_of_a_local_run(ray_runs, ray_reference):
    """The same command with the local backend (one process, one thread) writes the same files:
    the same rows and columns everywhere; step 0's rollouts and teacher scores bit for bit (the
    same weights, rows and seeds, whatever the replicas), later values to float rounding (the
    two-rank gradient sum rounds differently)."""
    code, out = _finish(_train(ray_runs, "local", plain=True, extra=LOCAL))
    assert code == 0, out[-4000:]
    a, b = RunPaths(ray_reference), RunPaths(ray_runs[0] / "local")
    assert (a.root / "config.yaml").read_text() != (b.root / "config.yaml").read_text()  # the placement differs...
    assert read_table(a.prompts, table="prompts").equals(read_table(b.prompts, table="prompts"))  # ...the run not
    for name, table in (("rollouts", "rollouts"), ("teacher", "teacher_logprobs")):
        assert read_table(getattr(a, name)(0), table=table).equals(read_table(getattr(b, name)(0), table=table)), name
    for step in range(STEPS):
        ra, rb = (read_table(p.metrics(step), table="step_metrics") for p in (a, b))
        assert ra.columns == rb.columns
        for column in ("loss", "pg_loss", "kd_loss", "grad_norm", "beta", "lr", "num_tokens"):
            assert rb[column][0] == pytest.approx(ra[column][0], rel=1e-4, abs=1e-6), (step, column)
