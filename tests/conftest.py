"""Shared tiny fixtures: the char-level tokenizer and random-init Llama student/teacher, a
cache folder for the embedded warm-started models, one Prefect test harness per session, and the
helpers more than one test module uses (one step's tables of the tiny models, the tiny run config,
a process holding a run lock, the local Prefect servers' PIDs). Test modules never import each
other (tests/test_layering.py checks it): what they share lives here.

The models and tables are built once per session unless a fixture says otherwise, and shared: a
test that changes weights (an optimizer step, a patched head) must work on
``copy.deepcopy(tiny_student)``. Helpers that take arguments are fixtures returning the function.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _temp_dir_unless_set(name: str, prefix: str) -> None:
    """Set ``name`` to a fresh temp folder (removed at exit) unless the environment has one."""
    if name not in os.environ:
        path = tempfile.mkdtemp(prefix=prefix)
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        os.environ[name] = path


# Prefect reads its settings when it is imported: these must be set before any test module (or
# plugin) imports prefect. Subprocesses started by tests inherit them.
_temp_dir_unless_set("PREFECT_HOME", "kdrl-test-prefect-home-")
_temp_dir_unless_set("PREFECT_LOCAL_STORAGE_PATH", "kdrl-test-prefect-storage-")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")  # default 20 s: too short on CI
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Char-level tokenizer (pad 0, bos 1, eos 2, unk 3; left padding)."""
    from kdrl.models import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_student(tiny_tokenizer):
    """~1M-parameter random Llama (seed 0), fp32, eval mode. Do not mutate: deepcopy first."""
    from kdrl.models import TINY_STUDENT, build_tiny_llama

    return build_tiny_llama(tiny_tokenizer, **TINY_STUDENT, seed=0).eval()


@pytest.fixture(scope="session")
def tiny_teacher(tiny_tokenizer):
    """~6M-parameter random Llama (seed 1), fp32, eval mode. Do not mutate: deepcopy first."""
    from kdrl.models import TINY_TEACHER, build_tiny_llama

    return build_tiny_llama(tiny_tokenizer, **TINY_TEACHER, seed=1).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer, tiny_student, tiny_teacher):
    """A folder with ``student/`` and ``teacher/`` saved by ``kdrl.models.save_model`` (weights,
    config, tokenizer): load them with ``load_causal_lm`` / ``load_tokenizer``."""
    from kdrl.models import save_model

    root = tmp_path_factory.mktemp("tiny_models")
    save_model(tiny_student, tiny_tokenizer, root / "student")
    save_model(tiny_teacher, tiny_tokenizer, root / "teacher")
    return root


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """A ``run.cache_dir`` shared by the tests that train tiny embedded models (3 SFT steps), so
    each data/embedded config is warm-started once per session."""
    return tmp_path_factory.mktemp("embedded_cache")


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One Prefect API for the whole session (a temporary SQLite database behind a local server,
    7-8 s to start); yields its API URL, which subprocesses can be given as PREFECT_API_URL.

    The harness isolates only the database: results and cache records go to a temp
    PREFECT_LOCAL_STORAGE_PATH, so no cached task of an earlier session can leak into this one.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect_storage")
    # server_startup_timeout=None: wait PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (90 above)
    with (temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: storage}),
          prefect_test_harness(server_startup_timeout=None)):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def tiny_prompts(tiny_tokenizer):
    """Three addition prompts of different lengths (prompt ids 10, 11, 12), tokenized."""
    import polars as pl

    ids = tiny_tokenizer(["12+34=", "5+7=", "123+9="])["input_ids"]
    return pl.DataFrame({"prompt_id": [10, 11, 12], "prompt_token_ids": ids},
                        schema_overrides={"prompt_token_ids": pl.List(pl.Int32)})


@pytest.fixture(scope="session")
def rewards_for():
    """``rewards_for(rollouts, values)``: a rewards table giving the rollouts' rows ``values`` in
    order, no extracted answers, truncated where a rollout stopped at its length limit."""
    import polars as pl

    def rewards_for(rollouts, values):
        return rollouts.select("step", "prompt_id", "sample_idx").with_columns(
            pl.Series("reward", values, dtype=pl.Float32), pl.lit(None, pl.String).alias("extracted_answer"),
            (rollouts["finish_reason"] == "length").alias("truncated"),
        )

    return rewards_for


@pytest.fixture
def step_tables(tiny_tokenizer, tiny_student, tiny_teacher, tiny_prompts, rewards_for):
    """One step's (rollouts, rewards, teacher) of the tiny models: 3 prompts × 4 samples (seed 3),
    rewards mixed within groups, the teacher's scores where the default loss needs KD. Built for
    each test that asks (about 0.5 s on 2 loaded cores)."""
    from kdrl.config import LossConfig
    from kdrl.engines.hf import HFRolloutEngine, HFTeacherScorer
    from kdrl.stages import generate_rollouts, kd_needed, score_teacher

    engine = HFRolloutEngine(tiny_student, tiny_tokenizer)
    rollouts = generate_rollouts(engine, tiny_prompts, step=0, n=4, max_new_tokens=12, seed=3)
    rewards = rewards_for(rollouts, [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    teacher = score_teacher(HFTeacherScorer(tiny_teacher, tiny_tokenizer), rollouts,
                            kd_needed(rollouts, rewards, LossConfig()))
    return rollouts, rewards, teacher


_TINY_RUN = {
    "run.steps": 3, "run.checkpoint_every": 1, "run.eval_every": 0, "run.method": "kdrl_anneal",
    "embedded.teacher_steps": 3, "embedded.student_steps": 3,
    "data.num_train": 24, "data.num_heldout": 4, "data.max_digits": 2,
    "rollout.prompts_per_step": 3, "rollout.samples_per_prompt": 4, "rollout.max_new_tokens": 12,
    "optim.lr": 1e-3, "optim.micro_batch_size": 5,
}


@pytest.fixture(scope="session")
def tiny_run_overrides():
    """``tiny_run_overrides(tmp_path, **extra)``: the ``--set`` values (key → value) of a 3-step
    kdrl_anneal run on the embedded task that trains in seconds on a CPU, runs and cache under
    ``tmp_path``, then ``extra``. For a test that runs the CLI or a subprocess."""

    def tiny_run_overrides(tmp_path, **extra):
        return {**_TINY_RUN, "run.runs_dir": str(tmp_path / "runs"), "run.cache_dir": str(tmp_path / "cache"), **extra}

    return tiny_run_overrides


@pytest.fixture(scope="session")
def tiny_run_config(tiny_run_overrides):
    """``tiny_run_config(tmp_path, **extra)``: the RunConfig of ``tiny_run_overrides``."""
    from kdrl.config import load_config

    def tiny_run_config(tmp_path, **extra):
        return load_config(overrides=[f"{k}={v}" for k, v in tiny_run_overrides(tmp_path, **extra).items()])

    return tiny_run_config


_ROOT = Path(__file__).resolve().parents[1]
_HOLD = (
    "import sys; from kdrl.runlock import hold_run_lock\n"
    "with hold_run_lock(sys.argv[1]):\n"
    "    print('ready', flush=True); sys.stdin.read()\n"
)


@pytest.fixture(scope="session", autouse=True)
def _trackio_writes_under_tmp(tmp_path_factory):
    """trackio reads TRACKIO_DIR once, when it is first imported: set it before any test can, so no
    test writes into ~/.cache/huggingface/trackio (or reads what an earlier session left there)."""
    os.environ["TRACKIO_DIR"] = str(tmp_path_factory.mktemp("trackio"))


@pytest.fixture(scope="session")
def locked_by_subprocess():
    """``with locked_by_subprocess(run_dir) as proc``: a child process holds the lock of
    ``run_dir`` until the block ends (or it is killed)."""

    @contextmanager
    def locked_by_subprocess(run_dir: Path):
        proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], cwd=_ROOT, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert proc.stdout.readline().strip() == "ready"
            yield proc
        finally:
            proc.kill()
            proc.wait(timeout=10)

    return locked_by_subprocess


@pytest.fixture(scope="session")
def server_pids():
    """``server_pids(url)``: the PIDs of the local Prefect servers (flows.server) listening on
    ``url``'s port; [] once they are gone."""

    def server_pids(url: str) -> list[int]:
        port = url.split(":")[-1].split("/")[0]
        out = subprocess.run(["pgrep", "-f", f"prefect server start --host 127.0.0.1 --port {port}"],
                             capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]

    return server_pids
