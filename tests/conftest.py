"""Shared tiny fixtures: the char-level tokenizer and random-init Llama student/teacher, a
cache folder for the embedded warm-started models, and one Prefect test harness per session.

Session-scoped, so built once per test run. The models are shared: a test that changes weights
(an optimizer step, a patched head) must work on ``copy.deepcopy(tiny_student)``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile


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
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: storage}), prefect_test_harness(server_startup_timeout=None):
        yield PREFECT_API_URL.value()
