"""RunConfig: presets, YAML + --set precedence, errors that name the bad key; every preset ×
estimator × mask either trains on something or is refused up front; the messages through `kdrl`."""

import re
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from flows.cli import main
from kdrl.config import (
    EVAL_DEFAULTS,
    PRESETS,
    RENAMED_EVAL_KEYS,
    EvalConfig,
    LossConfig,
    RunConfig,
    dump_config,
    load_config,
    merge_dicts,
    parse_override,
)
from kdrl.config_io import _keys


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
    with pytest.raises(ValueError, match=r"(?s)cfg\.yaml.*rollout\.sampels_per_prompt"):
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
    sections = [RunConfig, EvalConfig] + [f.annotation for c in (RunConfig, EvalConfig) for f in c.model_fields.values()
                                          if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)]
    missing = [f"{s.__name__}.{name}" for s in sections for name, f in s.model_fields.items() if not f.description]
    assert missing == []


def test_shipped_configs_validate():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "data" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)
    assert load_config(configs[0].with_name("default.yaml")) == load_config()


def test_run_config_hashes_are_unchanged_by_the_sections_eval_shares():
    """Decoding, Placement and EvalSampling were taken out of the run sections (issue 14), which
    inherit them: the keys, values and so the hash (sorted keys) of every run config must be what
    they were, or every existing run's files would carry another config's hash. The hashes were
    computed with the code before that change."""
    root = Path(__file__).resolve().parents[1] / "data" / "configs"
    hashes = {name: load_config(root / name).hash()
              for name in ("default.yaml", "hf_models.yaml", "paper_1p5b.yaml", "smollm2.yaml")}
    assert load_config().hash() == "6085dd8272f257da"
    assert hashes == {"default.yaml": "6085dd8272f257da", "hf_models.yaml": "e1ff4587cab1d948",
                      "paper_1p5b.yaml": "735ca84a6a6cf97f", "smollm2.yaml": "b91dfb09922a030c"}


def test_every_eval_setting_is_a_run_config_key():
    """One door per value: what `kdrl eval` decodes, places and samples with is set with the key a
    run config has for it; only what a run has no use for is eval's own."""
    run_keys = set(_keys(RunConfig))
    assert {k for k in _keys(EvalConfig) if k not in run_keys} == {"checkpoint", "limit"}
    for old, new in RENAMED_EVAL_KEYS.items():
        assert (old.split(".")[0] not in EvalConfig.model_fields
                and any(k == new or k.startswith(f"{new}.") for k in run_keys))
    # EVAL_DEFAULTS holds only what differs from the run's defaults (the rest is not declared twice)
    defaults = EvalConfig(checkpoint="x").model_dump()
    assert all(defaults[section][key] != value
               for section, keys in EVAL_DEFAULTS.items() for key, value in keys.items())


# --- every preset × estimator × mask (× G × β) -------------------------------------------------

ESTIMATORS = ("k1", "k2", "k3", "topk", "full")
MASKS = ("none", "response", "group")
BETAS = {"preset": (), "off": ("loss.beta_init=0", "loss.beta_min=0"), "on": ("loss.beta_init=0.02",)}
README_TERMS = {  # what each name promises: (reward term, KD term); README's table of presets
    "sft": (False, False), "grpo": (True, False), "kd_rkl": (False, True), "kdrl": (True, True),
    "kdrl_anneal": (True, True), "kdrl_mask_response": (True, True), "kdrl_mask_group": (True, True),
}


def _grid():
    for method in PRESETS:
        for estimator in ESTIMATORS:
            for top_k in ((0, 4) if estimator == "topk" else (0,)):
                for mask in MASKS:
                    for G in (1, 4):
                        for beta in BETAS:
                            yield method, [f"run.method={method}", f"loss.kl_estimator={estimator}",
                                           f"loss.kd_mask={mask}", f"rollout.samples_per_prompt={G}",
                                           f"teacher.top_k={top_k}", *BETAS[beta]]


def _terms(loss: dict, G: int, top_k: int) -> dict[str, bool]:
    """Which terms of L = pg_coef·PG + β·KD + nll_coef·NLL can have a nonzero gradient, read off the
    fields: Â_i = r_i − mean_G r is 0 for G = 1; k1 only enters through the PG term (as a reward);
    topk needs stored top-k ids."""
    kd_on = loss["beta_init"] > 0 or (loss["beta_schedule"] == "linear" and loss["beta_min"] > 0)
    estimator = loss["kl_estimator"]
    return {
        "reward": loss["pg_coef"] > 0 and G >= 2,
        "kd": kd_on and (estimator in ("k2", "k3") or (estimator == "topk" and top_k > 0)
                         or (estimator == "k1" and loss["pg_coef"] > 0)),
        "nll": loss["nll_coef"] > 0,
    }


def _expected_refusals(method: str, overrides: list[str]) -> set[str]:
    """The keys a refusal must name ({} = the config is meaningful and must be accepted)."""
    values = {"loss": LossConfig().model_dump(), "rollout": {"source": "student"}}
    for layer in [PRESETS[method], *map(parse_override, overrides)]:
        values = merge_dicts(values, layer)
    loss, source = values["loss"], values["rollout"]["source"]
    G, top_k = values["rollout"]["samples_per_prompt"], values["teacher"]["top_k"]
    if loss["kl_estimator"] not in ("k1", "k2", "k3", "topk"):
        return {"loss.kl_estimator"}  # "full" exists only as a pure function (no full logits in Parquet)
    kd_on = loss["beta_init"] > 0 or (loss["beta_schedule"] == "linear" and loss["beta_min"] > 0)
    pg_on = loss["pg_coef"] > 0
    terms = _terms(loss, G, top_k)
    keys = set()
    if pg_on and not terms["reward"]:
        keys.add("rollout.samples_per_prompt")  # a reward term that carries no reward
    if kd_on and not terms["kd"]:
        keys.add("loss.kl_estimator")  # KD that distils nothing (k1 without PG, topk without top_k)
    if not kd_on and loss["kd_mask"] != "none":
        keys.add("loss.kd_mask")  # a KD mask without KD
    if not kd_on and loss["kl_estimator"] != "k2":
        keys.add("loss.kl_estimator")  # a KD estimator without KD ("sft with a kd estimator")
    if source == "teacher" and (pg_on or kd_on):
        keys.add("rollout.source")  # PG and reverse KL need the student's own samples
    if method in README_TERMS and method != "sft" and (pg_on, kd_on) != README_TERMS[method]:
        keys.add("run.method")  # another method under this name
    if loss["beta_schedule"] == "linear" and loss["beta_min"] > loss["beta_init"]:
        keys.add("loss.beta_min")
    if not any(terms.values()):
        keys.add("loss.")
    return keys


@pytest.mark.parametrize("method", list(PRESETS))
def test_every_preset_estimator_mask_trains_on_something_or_is_refused(method):
    wrong = []
    for m, overrides in _grid():
        if m != method:
            continue
        expected = _expected_refusals(method, overrides)
        try:
            cfg = load_config(overrides=overrides)
        except ValueError as err:
            message = str(err)
            if not expected:
                wrong.append(f"refused a meaningful config {overrides}: {message}")
            elif not any(key in message for key in expected):
                wrong.append(f"{overrides}: the message names none of {sorted(expected)}: {message}")
            elif ": :" in message or "Value error" in message:
                wrong.append(f"{overrides}: unformatted message {message}")
            continue
        if expected:
            wrong.append(f"accepted {overrides}, expected a refusal naming {sorted(expected)}")
            continue
        terms = _terms(cfg.loss.model_dump(), cfg.rollout.samples_per_prompt, cfg.teacher.top_k)
        if not any(terms.values()):
            wrong.append(f"accepted {overrides} whose loss has no nonzero term")
    assert wrong == []


def test_the_grid_covers_both_outcomes_for_each_preset():
    # guards the sweep itself: it must see accepted and refused configs of every preset
    outcomes = {m: set() for m in PRESETS}
    for method, overrides in _grid():
        outcomes[method].add(bool(_expected_refusals(method, overrides)))
    assert all(o == {True, False} for o in outcomes.values()), outcomes


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["run.method=grpo", "rollout.samples_per_prompt=1"], "rollout.samples_per_prompt=1"),
        (["rollout.samples_per_prompt=1"], "rollout.samples_per_prompt=1"),  # kdrl_anneal: the reward half is dead
        (["loss.beta_init=-0.001"], "loss.beta_init"),
        (["run.method=kdrl", "loss.beta_init=-0.001"], "loss.beta_init"),
        (["run.steps=0"], "run.steps"),
        (["run.steps=-2"], "run.steps"),
        (["run.method=kd_rkl", "loss.kl_estimator=k1"], "loss.kl_estimator='k1'"),
        (["run.method=grpo", "loss.kd_mask=response"], "loss.kd_mask='response'"),
        (["run.method=sft", "loss.kl_estimator=k3"], "loss.kl_estimator='k3'"),
        (["run.method=sft", "loss.beta_init=0.01"], "rollout.source='teacher'"),
        (["run.method=grpo", "loss.beta_init=0.02"], "run.method='grpo'"),
        (["run.method=kdrl", "loss.pg_coef=0"], "run.method='kdrl'"),
        (["run.method=custom", "loss.pg_coef=0", "loss.beta_init=0", "loss.beta_min=0"], "no term of the loss"),
        (["loss.beta_init=0", "loss.beta_min=0.001"], "loss.beta_min=0.001 > loss.beta_init=0"),
        (["rollout.temperature=0"], "rollout.temperature"),
        (["loss.ppo_epochs=0"], "loss.ppo_epochs"),
        (["optim.micro_batch_size=0"], "optim.micro_batch_size"),
        # counts: before, -3 prompts passed, and the run failed at step 0 after the whole baseline evaluation
        (["data.num_train=0"], "data.num_train"),
        (["data.num_train=-3"], "data.num_train"),
        (["data.num_heldout=0"], "data.num_heldout"),  # an empty evaluation: a polars ShapeError in generate_rollouts
        (["data.num_heldout=-3"], "data.num_heldout"),
        (["data.num_train=8"], "rollout.prompts_per_step=16 > data.num_train=8"),
    ],
)
def test_meaningless_values_are_refused_up_front_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=re.escape(key)) as err:
        load_config(overrides=overrides)
    assert "\n  " in str(err.value) and ": :" not in str(err.value)


def test_a_step_may_draw_every_training_prompt():
    cfg = load_config(overrides=["data.num_train=16", "data.num_heldout=1"])  # P = 16 distinct of 16
    assert (cfg.rollout.prompts_per_step, cfg.data.num_train, cfg.data.num_heldout) == (16, 16, 1)


def test_g1_is_fine_without_the_reward_term():
    # pure distillation (k2) and SFT need no group: one sample per prompt trains
    assert load_config(overrides=["run.method=kd_rkl", "rollout.samples_per_prompt=1"]).rollout.samples_per_prompt == 1
    assert load_config(overrides=["run.method=sft", "rollout.samples_per_prompt=1"]).loss.nll_coef == 1.0


def test_objective_doc_table_matches_the_validation():
    """docs/objective.md's table of presets × estimators: which masks each cell accepts (G = 8,
    the preset's β, teacher.top_k = 16 for topk), as load_config decides today."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "objective.md").read_text()
    section = doc[doc.index("## Which combinations are accepted"):]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 1 + len(ESTIMATORS) and cells[0] in PRESETS:
            rows[cells[0]] = cells[1:]
    assert set(rows) == set(PRESETS)
    for method, cells in rows.items():
        for estimator, cell in zip(ESTIMATORS, cells):
            accepted = []
            for mask in MASKS:
                try:
                    load_config(overrides=[f"run.method={method}", f"loss.kl_estimator={estimator}",
                                           f"loss.kd_mask={mask}", "teacher.top_k=16"])
                    accepted.append(mask)
                except ValueError:
                    pass
            expected = {"all": list(MASKS), "none": ["none"], "—": []}[cell.split(" ")[0]]
            assert accepted == expected, (method, estimator, cell, accepted)


# --- YAML files -------------------------------------------------------------------------------


def test_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  method: kdrl\n\tsteps: 3\n")
    with pytest.raises(ValueError, match=r"bad\.yaml:3:1: invalid YAML") as err:
        load_config(path)
    assert "<unicode string>" not in str(err.value)


def test_a_section_that_is_not_a_mapping_is_named(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("run: [1, 2]\n")
    for overrides in ([], ["run.steps=3"]):  # before: AttributeError, resp. the list silently replaced
        with pytest.raises(ValueError, match=r"cfg\.yaml: `run` is a section"):
            load_config(path, overrides)
    path.write_text("teacher:\n  vllm: 3\n")
    with pytest.raises(ValueError, match=r"cfg\.yaml: `teacher\.vllm` is a section"):
        load_config(path, ["teacher.vllm.dtype=float16"])
    with pytest.raises(ValueError, match=r"`run` is a section"):
        load_config(overrides=["run=3"])


def test_non_utf8_empty_missing_and_duplicate_files(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("run:\n  runs_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.yaml: not UTF-8 text \(byte 0xe9 on line 2\)"):
        load_config(latin1)
    for text in ("", "# nothing yet\n", "run:\n"):  # an empty file or section means the defaults
        (tmp_path / "empty.yaml").write_text(text)
        assert load_config(tmp_path / "empty.yaml") == load_config()
    with pytest.raises(FileNotFoundError, match=r"config file .*missing\.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"cannot be read"):
        load_config(tmp_path)
    dup = tmp_path / "dup.yaml"
    # YAML would keep only the 2nd loss
    dup.write_text("loss:\n  beta_init: 0.1\nrun:\n  steps: 3\nloss:\n  pg_coef: 1\n")
    with pytest.raises(ValueError, match=r"dup\.yaml:5:1: .*'loss' appears twice .*first on line 1"):
        load_config(dup)


# --- messages: one `<key path>: <message>` line per problem, with suggestions ------------------------


def test_error_lines_have_a_key_path_or_name_their_keys(tmp_path):
    with pytest.raises(ValueError) as err:
        load_config(overrides=["loss.kl_estimator=topk", "loss.beta_int=1", "run.steps=0"])
    header, *lines = str(err.value).split("\n")
    assert header.startswith("invalid config (defaults, overrides [")
    assert lines == ["  loss.beta_int: unknown key; did you mean `loss.beta_init`?",
                     "  run.steps: Input should be greater than or equal to 1 (got 0)"]
    with pytest.raises(ValueError) as err:  # model-level: the message names the keys, no empty location
        load_config(overrides=["loss.kl_estimator=topk"])
    assert str(err.value).split("\n")[1] == ("  loss.kl_estimator='topk' needs teacher.top_k > 0 "
                                             "(the teacher's top-k log-probs are its input)")


def test_typos_get_a_did_you_mean(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("lose:\n  beta_init: 0.1\nrollout:\n  sampels_per_prompt: 4\n")
    message = str(pytest.raises(ValueError, load_config, path).value)
    assert "lose: unknown section; did you mean `loss`?" in message
    assert "rollout.sampels_per_prompt: unknown key; did you mean `rollout.samples_per_prompt`?" in message
    assert "did you mean `teacher.top_k`?" in str(pytest.raises(ValueError, load_config, None, ["loss.top_k=4"]).value)
    assert "did you mean `grpo`?" in str(pytest.raises(ValueError, load_config, None, ["run.method=grpoo"]).value)
    with pytest.raises(ValueError, match=r"override 'loss.beta_init=\[1': the value '\[1' is not valid YAML"):
        load_config(overrides=["loss.beta_init=[1"])


def test_eval_config_errors_are_formatted_the_same_way():
    from kdrl.evaluation import build_eval_config

    with pytest.raises(ValueError, match=r"run\.eval_sampels: unknown key; did you mean `run\.eval_samples`\?"):
        build_eval_config("embedded:student", overrides=["run.eval_sampels=3"])
    with pytest.raises(ValueError, match=r"\n  run\.eval_temperature=0 is greedy"):
        build_eval_config("embedded:student", overrides=["run.eval_temperature=0"])
    with pytest.raises(ValueError, match=r"\n  data\.num_heldout: Input should be greater than or equal to 1"):
        build_eval_config("embedded:student", "embedded", overrides=["data.num_heldout=0"])  # nothing to evaluate


def test_an_eval_key_from_before_names_its_new_key():
    from kdrl.evaluation import build_eval_config

    message = str(pytest.raises(ValueError, build_eval_config, "embedded:student",
                                overrides=["samples=8", "vllm.dtype=bfloat16", "dtype=bfloat16", "temperatur=1"]).value)
    assert message.splitlines()[1:] == [
        "  samples: renamed to `run.eval_samples`, the key a run config uses",
        "  vllm.dtype: renamed to `rollout.vllm.dtype`, the key a run config uses",
        "  dtype: renamed to `model.dtype`, the key a run config uses",
        "  temperatur: unknown key; did you mean `run.eval_temperature`?",  # a typo of an old key
    ]
    cfg = build_eval_config("embedded:student",
                            overrides=["run.eval_samples=8", "rollout.vllm.dtype=bfloat16", "model.dtype=bfloat16"])
    assert (cfg.run.eval_samples, cfg.rollout.vllm.dtype, cfg.model.dtype) == (8, "bfloat16", "bfloat16")
    assert (cfg.run.eval_temperature, cfg.rollout.max_new_tokens) == (0.6, 512)  # EVAL_DEFAULTS under the overrides


# --- through the real `kdrl` entry: exit code 2, the message, no traceback -------------------------


def _clean_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("kdrl: ") and "Traceback" not in err and ": :" not in err and "Value error" not in err
    return err


def test_cli_train_reports_config_errors_cleanly(tmp_path, capsys):
    # where a config were accepted (as before), the run would stop at once on these folders (a file)
    (tmp_path / "file").write_text("")
    nowhere = ["--no-prefect", "--set", f"run.runs_dir={tmp_path / 'file'}",
               "--set", f"run.cache_dir={tmp_path / 'file'}"]
    path = tmp_path / "cfg.yaml"
    path.write_text("run:\n  steps: [\n")
    assert main(["train", "--config", str(path)]) == 2
    assert re.search(r"cfg\.yaml:3:1: invalid YAML", _clean_error(capsys))
    path.write_text("run: [1, 2]\n")
    assert main(["train", "--config", str(path), "--set", "run.steps=2", *nowhere]) == 2
    assert "cfg.yaml: `run` is a section" in _clean_error(capsys)
    assert main(["train", "--set", "loss.beta_int=0.1"]) == 2
    assert "loss.beta_int: unknown key; did you mean `loss.beta_init`?" in _clean_error(capsys)
    assert main(["train", "--set", "run.method=kd_rkl", "--set", "loss.kl_estimator=k1", *nowhere]) == 2
    assert "loss.kl_estimator='k1'" in _clean_error(capsys)
    assert main(["train", "--set", "data.num_train=8", *nowhere]) == 2  # before: refused at step 0, after the baseline
    assert "rollout.prompts_per_step=16 > data.num_train=8" in _clean_error(capsys)


def test_compare_refuses_a_meaningless_arm_before_any_run(tmp_path):
    from kdrl.compare import plan_compare

    with pytest.raises(ValueError, match=r"rollout\.samples_per_prompt=1: every group-relative advantage"):
        plan_compare(None, ["rollout.samples_per_prompt=1", f"run.runs_dir={tmp_path}"], arms=("kd_rkl", "grpo"),
                     seeds=1)
    with pytest.raises(ValueError, match=r"run\.method='grpo' has no KD, but loss\.beta_init=0\.02"):
        plan_compare(None, ["loss.beta_init=0.02", f"run.runs_dir={tmp_path}"], arms=("kdrl", "grpo"), seeds=1)
    assert not any(tmp_path.iterdir())


def test_cli_compare_eval_replay_report_config_errors_cleanly(tmp_path, capsys):
    bad = tmp_path / "base.yaml"
    bad.write_text("loss:\n  beta_init: [0.1\n")
    assert main(["compare", "--no-prefect", "--seeds", "1", "--methods", "grpo", "--config", str(bad)]) == 2
    assert re.search(r"base\.yaml:\d+:\d+: invalid YAML", _clean_error(capsys))
    assert main(["compare", "--no-prefect", "--seeds", "1", "--methods", "grpo", "--set", "loss.beta_int=0.1"]) == 2
    assert "loss.beta_int: unknown key; did you mean `loss.beta_init`?" in _clean_error(capsys)
    assert main(["eval", "--checkpoint", "embedded:student", "--no-prefect", "--set", "run.eval_sampels=3"]) == 2
    assert "run.eval_sampels: unknown key; did you mean `run.eval_samples`?" in _clean_error(capsys)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config()))
    assert main(["replay", str(run), "--iter", "0", "--set", "loss.beta_int=0.1"]) == 2
    assert "loss.beta_int: unknown key; did you mean `loss.beta_init`?" in _clean_error(capsys)


# --- presets, schedule docs, where the YAML/error helpers live ------------------------------------


def test_preset_terms_are_read_off_the_presets():
    from kdrl.config import PRESET_TERMS, preset_terms

    assert PRESET_TERMS == {m: t for m, t in README_TERMS.items() if m != "sft"}  # sft: checked via rollout.source
    # derived, not a second table: a preset whose values change changes what its name promises
    changed = preset_terms({**PRESETS, "kdrl": {"loss": {"pg_coef": 0.0}},
                            "pg_nll": {"loss": {"beta_init": 0.0, "nll_coef": 1.0}}})
    assert (changed["kdrl"], changed["pg_nll"], "custom" in changed) == ((False, True), (True, False), False)


def test_schedule_docs_count_optimizer_steps_as_the_loop_does():
    from kdrl.config import OptimConfig

    # workers.Student builds the schedule with build_optimizer(..., cfg.run.steps * cfg.loss.ppo_epochs)
    for field in ("schedule", "warmup_steps"):
        doc = OptimConfig.model_fields[field].description
        assert "run.steps × loss.ppo_epochs" in doc, (field, doc)
    assert "over run.steps." not in OptimConfig.model_fields["schedule"].description


def test_config_io_reads_and_reports_for_any_model(tmp_path):
    """kdrl.config_io knows YAML and pydantic only: the same messages for a model it never saw."""
    from pydantic import BaseModel, ConfigDict

    from kdrl import config
    from kdrl.config_io import check_sections, read_yaml, validate_config

    class Inner(BaseModel):
        model_config = ConfigDict(extra="forbid")
        width: int = 1

    class Outer(BaseModel):
        model_config = ConfigDict(extra="forbid")
        inner: Inner = Inner()

    path = tmp_path / "toy.yaml"
    path.write_text("inner:\n  widht: 2\n")
    with pytest.raises(ValueError, match=r"invalid config \(toy\):\n  "
                                         r"inner\.widht: unknown key; did you mean `inner\.width`\?"):
        validate_config(Outer, check_sections(Outer, read_yaml(path), "toy"), source="toy")
    with pytest.raises(ValueError, match=r"toy: `inner` is a section"):
        check_sections(Outer, {"inner": 3}, "toy")
    assert config.read_yaml is read_yaml and config.validate_config is validate_config  # one copy, in config_io
    # what flows/, tasks/, scripts/ and tests/ import from kdrl.config is still there
    for name in ("load_config", "dump_config", "RunConfig", "EvalConfig", "PRESETS", "merge_dicts", "parse_override",
                 "validate_config", "DataConfig", "LossConfig", "OptimConfig", "RewardConfig", "VLLMConfig"):
        assert hasattr(config, name), name


# --- runs already made: read back whatever today's objective checks say of them ----------------


@pytest.fixture(scope="module")
def old_grpo_run(tmp_path_factory, tiny_run_config, embedded_cache):
    """(a valid finished tiny run, a copy whose config.yaml says run.method=grpo with
    loss.beta_init=0.02). The copy is what the old README's compare example (`--set
    loss.beta_init=0.02` over every arm) wrote for its grpo arm before such a config was refused:
    the same loss as run.method=custom with β = 0.02, which is how it is trained here."""
    import shutil

    from flows.train import train_without_prefect

    tmp = tmp_path_factory.mktemp("old_runs")
    beta = {"loss.beta_init": 0.02, "loss.beta_min": 0.0, "loss.beta_schedule": "constant"}
    valid = tmp / "runs" / "custom"
    cfg = tiny_run_config(tmp, **{"run.method": "custom", **beta, "run.cache_dir": embedded_cache})
    train_without_prefect(cfg, valid)
    old = tmp / "runs" / "old-grpo"
    shutil.copytree(valid, old)
    text = (old / "config.yaml").read_text()
    assert text.count("method: custom") == 1
    (old / "config.yaml").write_text(text.replace("method: custom", "method: grpo"))
    return valid, old


def test_a_run_made_before_the_objective_checks_is_read_back(old_grpo_run):
    valid, old = old_grpo_run
    with pytest.raises(ValueError, match=r"run\.method='grpo' has no KD, but loss\.beta_init=0\.02"):
        load_config(old / "config.yaml")  # it would not start today
    cfg = load_config(old / "config.yaml", check_objective=False)
    assert (cfg.run.method, cfg.loss.beta_init, cfg.loss.pg_coef) == ("grpo", 0.02, 1.0)
    assert cfg.model_dump(exclude={"run"}) == load_config(valid / "config.yaml").model_dump(exclude={"run"})
    # only the objective checks are skipped: keys, types, ranges and what a run needs still count
    for overrides, why in [(["loss.beta_int=1"], "did you mean `loss.beta_init`?"), (["run.steps=0"], "run.steps"),
                           (["data.num_heldout=0"], "data.num_heldout"),
                           (["loss.kl_estimator=topk"], "teacher.top_k > 0"),
                           (["rollout.prompts_per_step=25"], "rollout.prompts_per_step=25 > data.num_train=24")]:
        with pytest.raises(ValueError, match=re.escape(why)):
            load_config(old / "config.yaml", overrides, check_objective=False)


def test_kdrl_eval_of_a_run_made_before_the_objective_checks(old_grpo_run, tmp_path, capsys):
    from kdrl.evaluation import build_eval_config

    _, old = old_grpo_run
    checkpoint = old / "iter_00002" / "checkpoint"
    cfg = build_eval_config(str(checkpoint), "embedded")  # before: "invalid config (...): run.method='grpo' has no KD"
    run_cfg = load_config(old / "config.yaml", check_objective=False)
    assert ((cfg.data, cfg.rollout.max_new_tokens, cfg.reward)
            == (run_cfg.data, run_cfg.rollout.max_new_tokens, run_cfg.reward))
    argv = ["eval", "--checkpoint", str(checkpoint), "--no-prefect", "--samples", "1", "--temperature", "0",
            "--out", str(tmp_path / "ev")]
    assert main(argv) == 0, capsys.readouterr().err
    assert "num_prompts" in capsys.readouterr().out and (tmp_path / "ev" / "summary.parquet").exists()


def test_replay_of_a_run_made_before_the_objective_checks(old_grpo_run, tmp_path):
    import polars as pl

    from kdrl.replay import replay_update
    from kdrl.storage import RunPaths

    _, old = old_grpo_run
    timing = ["time_generate_s", "time_reward_s", "time_teacher_s", "time_update_s", "time_total_s", "tokens_per_s",
              "run_id"]  # and the file's run_id: another run
    same = replay_update(old, 2, [], dest_dir=tmp_path / "same", log=lambda _: None)
    assert pl.read_parquet(RunPaths(same).metrics(2)).drop(timing).equals(
        pl.read_parquet(RunPaths(old).metrics(2)).drop(timing))
    other = replay_update(old, 1, ["loss.beta_init=0.05"], dest_dir=tmp_path / "beta", log=lambda _: None)
    assert pl.read_parquet(RunPaths(other).metrics(1))["beta"].to_list() == [0.05]


def test_a_replay_may_not_make_a_meaningful_objective_meaningless(old_grpo_run, tmp_path):
    from kdrl.replay import replay_update

    valid, _ = old_grpo_run
    for overrides, why in [(["loss.pg_coef=0", "loss.kl_estimator=k1"], "loss.kl_estimator='k1' acts only as a reward"),
                           (["loss.pg_coef=0", "loss.beta_init=0"], "no term of the loss is on")]:
        with pytest.raises(ValueError, match=re.escape(why)):  # before: replayed (a step that trains nothing)
            replay_update(valid, 1, overrides, dest_dir=tmp_path / "x", log=lambda _: None)
        assert not (tmp_path / "x").exists()


def test_a_run_made_before_the_objective_checks_was_started_with_another_config(old_grpo_run):
    from kdrl.workers import load_run

    valid, old = old_grpo_run
    # before: "invalid config (...): ... has no KD"
    with pytest.raises(ValueError, match="was started with another config"):
        load_run(load_config(valid / "config.yaml"), old, log=lambda _: None)



def test_prompt_template_with_stray_braces_is_refused_at_load():
    """str.format reads "\\boxed{}" as a positional field: it would crash at data load."""
    with pytest.raises(ValueError,
                       match=r"data.prompt_template: .*field other than \{question\}.*write literal braces twice"):
        load_config(overrides=[r"data.prompt_template='{question} Put it in \boxed{}.'"])
    with pytest.raises(ValueError, match="KeyError: 'answer'"):
        load_config(overrides=["data.prompt_template='{question} {answer}'"])
    cfg = load_config(overrides=[r"data.prompt_template='{question} Put it in \boxed{{}}.'"])
    assert cfg.data.prompt_template.format(question="1+1?") == r"1+1? Put it in \boxed{}."


def test_memory_check_off_survives_yaml():
    assert load_config(overrides=["run.memory_check=off"]).run.memory_check == "off"


def test_placement_keys_are_not_part_of_the_run_hash():
    """Where a run's work runs (PLACEMENT_KEYS) is not what it computes: the same run id and file
    hashes locally and on Ray, so a run moves between them. Every other key still changes it."""
    base = load_config()
    placed = load_config(overrides=["cluster.backend=ray", "cluster.address=auto", "trainer.world_size=4",
                                    "trainer.resources.num_gpus=1", "rollout.replicas=2",
                                    "rollout.resources.num_cpus=4", "teacher.replicas=2",
                                    "teacher.resources.num_gpus=0.5", "run.report_to=[tensorboard, mlflow]",
                                    "run.tracker_project=x", "run.mlflow_tracking_uri=http://localhost:5000"])
    assert placed.run.report_to == ["tensorboard", "mlflow"]
    assert placed.hash() == base.hash() == "6085dd8272f257da"
    assert load_config(overrides=["rollout.batch_size=64"]).hash() != base.hash()  # decides the chunks: not placement


@pytest.mark.parametrize(("overrides", "message"), [
    (["rollout.replicas=2"], "rollout.replicas=2 needs cluster.backend='ray'"),
    (["trainer.world_size=2", "teacher.replicas=3"], "teacher.replicas=3, trainer.world_size=2 needs cluster.backend"),
    (["cluster.backend=ray", "trainer.world_size=32"], "trainer.world_size=32 > rollout.prompts_per_step=16"),
    (["cluster.backend=ray", "model.lora.r=8"], "model.lora with cluster.backend='ray' is not supported yet"),
    (["cluster.backend=yarn"], "cluster.backend"),
    (["trainer.resources.num_gpus=-1"], "trainer.resources.num_gpus"),
])
def test_placements_that_cannot_run_are_refused_when_the_config_loads(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(overrides=overrides)
