"""Engine choice per stage: hf / vllm as configured, auto by device and model size; the config
refuses engine settings that cannot work; parameter counts come from the config alone."""

from __future__ import annotations

import pytest

from kdrl.config import load_config
from kdrl.engines.select import VLLM_MIN_PARAMS_CPU, choose_engine, count_parameters


def _choose(requested, *, num_params=1_000_000, device="cpu", installed=True, must_release=False):
    return choose_engine(requested, field="rollout.engine", num_params=num_params, device=device,
                         vllm_installed=installed, must_release=must_release)


def test_configured_engines_are_taken_as_they_are():
    assert _choose("hf", device="cuda").engine == "hf"
    assert _choose("vllm", num_params=10).engine == "vllm"


def test_vllm_requested_but_missing_says_how_to_install_it():
    with pytest.raises(RuntimeError, match=r"rollout.engine=vllm but vllm is not installed.*kdrl\[vllm\].*--with-vllm"):
        _choose("vllm", installed=False)


@pytest.mark.parametrize(
    ("num_params", "device", "installed", "must_release", "expected"),
    [
        (VLLM_MIN_PARAMS_CPU, "cpu", True, False, "vllm"),       # the measured CPU crossover
        (VLLM_MIN_PARAMS_CPU - 1, "cpu", True, False, "hf"),
        (1_000, "cuda", True, False, "vllm"),                    # on a GPU, always vLLM
        (7_000_000_000, "cuda", False, False, "hf"),             # ... when it is installed
        (7_000_000_000, "cuda", True, True, "hf"),               # an offloaded teacher that cannot sleep
    ],
)
def test_auto_picks_by_device_and_size(num_params, device, installed, must_release, expected):
    choice = _choose("auto", num_params=num_params, device=device, installed=installed, must_release=must_release)
    assert choice.engine == expected and choice.reason.startswith("auto: ")


def test_auto_reason_names_the_size():
    assert _choose("auto", num_params=1_234_567).reason == "auto: 1.2M parameters < 30M on CPU (HF is faster there)"


def test_the_parameter_count_is_only_taken_when_the_choice_needs_it():
    def never() -> int:
        raise AssertionError("counted")

    assert _choose("auto", num_params=never, device="cuda").engine == "vllm"
    assert _choose("vllm", num_params=never).engine == "vllm"
    assert _choose("auto", num_params=lambda: VLLM_MIN_PARAMS_CPU).engine == "vllm"


def test_parameter_count_from_config_matches_the_loaded_model(tiny_model_dir, tiny_student, tiny_teacher):
    assert count_parameters(str(tiny_model_dir / "student")) == sum(p.numel() for p in tiny_student.parameters())
    assert count_parameters(str(tiny_model_dir / "teacher")) == sum(p.numel() for p in tiny_teacher.parameters())


def test_config_refuses_a_vllm_teacher_offload_without_sleep_mode():
    with pytest.raises(ValueError,
                       match="teacher.offload with teacher.engine='vllm' needs teacher.vllm.enable_sleep_mode"):
        load_config(overrides=["teacher.engine=vllm", "teacher.offload=true"])
    load_config(overrides=["teacher.engine=vllm", "teacher.offload=true", "teacher.vllm.enable_sleep_mode=true"])


def test_config_refuses_engines_that_would_fill_the_gpu():
    with pytest.raises(ValueError, match="gpu_memory_utilization = 1 > 0.9"):
        load_config(overrides=["rollout.engine=vllm", "teacher.engine=vllm", "rollout.vllm.gpu_memory_utilization=0.5",
                               "teacher.vllm.gpu_memory_utilization=0.5"])
    with pytest.raises(ValueError, match=r"rollout.vllm.gpu_memory_utilization: must be in \(0, 1\]"):
        load_config(overrides=["rollout.vllm.gpu_memory_utilization=1.5"])


def test_vllm_settings_follow_the_stage_dtype_unless_set():
    from kdrl.engines.vllm import VLLMSettings

    cfg = load_config(overrides=["model.dtype=bfloat16", "teacher.vllm.dtype=float16", "rollout.vllm.max_model_len=0"])
    assert VLLMSettings.from_config(cfg.rollout.vllm, model_dtype=cfg.model.dtype).dtype == "bfloat16"
    assert VLLMSettings.from_config(cfg.teacher.vllm, model_dtype=cfg.teacher.dtype).dtype == "float16"
    assert VLLMSettings.from_config(cfg.rollout.vllm, model_dtype="float32").max_model_len is None
