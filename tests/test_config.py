"""RunConfig: presets, YAML + --set precedence, errors that name the bad key."""

import pytest
from pydantic import ValidationError

from kdrl.config import PRESETS, RunConfig, dump_config, load_config


def test_defaults_are_the_paper_kdrl_annealing():
    cfg = load_config()
    assert cfg.run.method == "kdrl_anneal"
    assert (cfg.loss.kl_estimator, cfg.loss.beta_schedule) == ("k2", "linear")
    assert (cfg.loss.beta_init, cfg.loss.beta_min, cfg.loss.beta_delta) == (5e-3, 1e-3, 5e-5)
    assert cfg.loss.ppo_epochs == 1 and cfg.rollout.temperature == 1.0 and cfg.rollout.top_p == 1.0


@pytest.mark.parametrize(
    "method, expected",
    [
        ("grpo", {"pg_coef": 1.0, "beta_init": 0.0}),
        ("kd_rkl", {"pg_coef": 0.0, "beta_init": 5e-3, "kl_estimator": "k2"}),
        ("kdrl", {"pg_coef": 1.0, "beta_schedule": "constant"}),
        ("kdrl_anneal", {"beta_schedule": "linear"}),
        ("kdrl_mask_response", {"kd_mask": "response"}),
        ("kdrl_mask_group", {"kd_mask": "group"}),
        ("sft", {"pg_coef": 0.0, "nll_coef": 1.0, "beta_init": 0.0}),
    ],
)
def test_presets_set_the_loss(method, expected):
    cfg = load_config(overrides=[f"run.method={method}"])
    assert {k: getattr(cfg.loss, k) for k in expected} == expected
    assert cfg.uses_teacher == (method not in ("grpo", "sft"))


def test_every_preset_validates():
    for method in PRESETS:
        load_config(overrides=[f"run.method={method}"])


def test_yaml_then_overrides_win_over_preset(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("run:\n  method: kdrl\n  steps: 7\nloss:\n  beta_init: 0.02\n")
    cfg = load_config(path, overrides=["loss.beta_init=0.01", "rollout.samples_per_prompt=4"])
    assert (cfg.run.steps, cfg.loss.beta_init, cfg.rollout.samples_per_prompt) == (7, 0.01, 4)
    assert cfg.loss.beta_schedule == "constant"  # from the kdrl preset


def test_typo_in_a_key_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"loss\.beta_int"):
        load_config(overrides=["loss.beta_int=0.01"])
    path = tmp_path / "cfg.yaml"
    path.write_text("rollout:\n  sampels_per_prompt: 4\n")
    with pytest.raises(ValueError, match=r"cfg\.yaml.*rollout\.sampels_per_prompt"):
        load_config(path)
    with pytest.raises(ValueError, match="run.method='grpoo'"):
        load_config(overrides=["run.method=grpoo"])
    with pytest.raises(ValueError, match="not of the form"):
        load_config(overrides=["loss.beta_init"])


def test_inconsistent_settings_are_refused():
    with pytest.raises(ValueError, match="teacher.top_k"):
        load_config(overrides=["loss.kl_estimator=topk"])
    assert load_config(overrides=["loss.kl_estimator=topk", "teacher.top_k=4"]).teacher.top_k == 4


def test_frozen_and_hash_tracks_content():
    cfg = load_config()
    with pytest.raises(ValidationError):
        cfg.loss.beta_init = 1.0  # type: ignore[misc]
    assert cfg.hash() == load_config().hash()
    assert cfg.hash() != load_config(overrides=["loss.beta_init=0.01"]).hash()


def test_dump_round_trips(tmp_path):
    cfg = load_config(overrides=["run.method=kdrl_mask_group", "optim.lr=3e-4"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_every_field_has_a_docstring():
    sections = [RunConfig] + [f.annotation for f in RunConfig.model_fields.values()]
    missing = [f"{s.__name__}.{name}" for s in sections for name, f in s.model_fields.items() if not f.description]
    assert missing == []


def test_shipped_configs_validate():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "data" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)
    assert load_config(configs[0].with_name("default.yaml")) == load_config()
