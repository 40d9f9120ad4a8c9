"""Shared tiny fixtures: the char-level tokenizer and random-init Llama student/teacher.

Session-scoped, so built once per test run. The models are shared: a test that changes weights
(an optimizer step, a patched head) must work on ``copy.deepcopy(tiny_student)``.
"""

from __future__ import annotations

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
