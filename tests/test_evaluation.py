"""`kdrl eval`: what a checkpoint argument resolves to, what a run passes on to its evaluation,
local datasets with other column names, the output folder as a record, the CLI and the flow."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from flows.cli import main
from kdrl.config import EvalConfig
from kdrl.data import worked_answer
from kdrl.evaluation import (
    ResolvedModel,
    build_eval_config,
    eval_prompts,
    resolve_checkpoint,
    run_eval,
)
from kdrl.storage import read_table


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_run_config):
    """A finished 2-step tiny run (checkpoints after steps 0 and 1)."""
    from flows.train import train_without_prefect

    tmp = tmp_path_factory.mktemp("eval_run")
    cfg = tiny_run_config(tmp, **{"run.steps": 2, "rollout.max_new_tokens": 11})
    run_dir = tmp / "runs" / "tiny"
    train_without_prefect(cfg, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    """A local jsonl with other column names and a worked answer: {"problem", "solution"}."""
    path = tmp_path_factory.mktemp("qa") / "sums.jsonl"
    rows = [{"problem": f"{a}+{b}=", "solution": worked_answer(a, b), "id": i}
            for i, (a, b) in enumerate([(3, 4), (12, 9), (40, 2), (7, 7), (5, 55)])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_checkpoint_argument_resolves_to_the_weights(trained_run, tiny_model_dir):
    latest = trained_run / "iter_00001" / "checkpoint"
    assert resolve_checkpoint(str(trained_run)) == ResolvedModel(str(latest / "model"), 1, trained_run)
    first = trained_run / "iter_00000" / "checkpoint"
    assert resolve_checkpoint(str(first)) == ResolvedModel(str(first / "model"), 0, trained_run)
    assert resolve_checkpoint(str(first / "model")) == ResolvedModel(str(first / "model"), 0, trained_run)
    assert resolve_checkpoint(str(tiny_model_dir / "student")) == ResolvedModel(str(tiny_model_dir / "student"))
    assert resolve_checkpoint("org/model-name") == ResolvedModel("org/model-name")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        resolve_checkpoint(str(tiny_model_dir / "nope"))
    with pytest.raises(FileNotFoundError, match="not a kdrl run directory"):
        resolve_checkpoint(str(tiny_model_dir))


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-0.5B", "gpt2", "meta-llama/Llama-3.2-1B", "runs/grpo-1"])
def test_a_name_that_can_be_a_hub_id_goes_to_the_hub(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder Qwen/, meta-llama/ or runs/ here
    (tmp_path / "models").mkdir()
    assert resolve_checkpoint(name) == ResolvedModel(name)  # nothing of that name here: the hub's to answer


def test_a_mistyped_run_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    """runs/<typo> matches owner/name, but runs/ is a folder here: a local path that is missing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "kdrl_anneal-1a2b3c4d").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape(
            "checkpoint 'runs/kdrl_anneal-typo': no such file or folder "
            f"(looked for {tmp_path / 'runs' / 'kdrl_anneal-typo'}; "
            "did you mean 'runs/kdrl_anneal-1a2b3c4d'?); runs/ is a local folder, so this is not a hub model name")):
        resolve_checkpoint("runs/kdrl_anneal-typo")
    with pytest.raises(FileNotFoundError,
                       match=r"no such file or folder \(looked for [^;]*\); runs/ is a local folder"):
        resolve_checkpoint("runs/zzz")  # nothing close: no suggestion
    assert resolve_checkpoint("Qwen/Qwen2.5-0.5B") == ResolvedModel("Qwen/Qwen2.5-0.5B")  # no Qwen/ here
    (tmp_path / "Qwen").mkdir()
    with pytest.raises(FileNotFoundError, match="Qwen/ is a local folder"):
        resolve_checkpoint("Qwen/Qwen2.5-0.5B")


@pytest.mark.parametrize("name", ["/missing/local/path", "./ckpt", "../ckpt", "~/no-such-ckpt",
                                  "runs/x/iter_00003/checkpoint", "model.safetensors", "out/pytorch_model.bin",
                                  "org/name/", "my model", "C:\\models\\x"])
def test_a_missing_path_is_not_found_here_without_asking_the_hub(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"checkpoint {re.escape(repr(name))}: no such file or folder"):
        resolve_checkpoint(name)


@pytest.mark.parametrize("argv", [["/missing/local/path"], ["weights.safetensors", "--no-prefect"],
                                  ["runs/kdrl_anneal-typo", "--no-prefect"]])
def test_cli_a_missing_path_fails_before_prefect_and_the_hub(argv, tmp_path):
    """The hub, made unreachable, would answer with its own error after minutes of retries; the
    flow path would first start a local Prefect server."""
    (tmp_path / "runs").mkdir()  # as in the README's working folder
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PREFECT_API_URL")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there
    done = subprocess.run([sys.executable, "-m", "flows.cli", "eval", "--checkpoint", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"kdrl: checkpoint {argv[0]!r}: no such file or folder")
    assert "127.0.0.1" not in done.stderr + done.stdout and "Prefect server" not in done.stdout


def test_a_run_without_checkpoints_is_named(tmp_path):
    (tmp_path / "config.yaml").write_text("run: {steps: 2}\n")
    with pytest.raises(FileNotFoundError, match="has no checkpoint yet"):
        resolve_checkpoint(str(tmp_path))


def test_a_checkpoint_of_a_run_inherits_its_data_and_lengths_unless_given(trained_run):
    from kdrl.config import load_config

    run_cfg = load_config(trained_run / "config.yaml")
    cfg = build_eval_config(str(trained_run), "embedded")
    assert cfg.data == run_cfg.data and cfg.rollout.max_new_tokens == 11 and cfg.reward == run_cfg.reward
    cfg = build_eval_config(str(trained_run), "embedded",
                            ["rollout.max_new_tokens=20", "data.num_heldout=3", "run.eval_samples=2"])
    assert ((cfg.rollout.max_new_tokens, cfg.data.num_heldout, cfg.data.num_train, cfg.run.eval_samples)
            == (20, 3, 24, 2))
    other = build_eval_config(str(trained_run), "some/dataset")
    assert other.data.source == "some/dataset" and other.data.num_train == EvalConfig(checkpoint="x").data.num_train
    assert build_eval_config("org/model", "embedded").rollout.max_new_tokens == 512
    with pytest.raises(ValueError, match="eval_sampels"):
        build_eval_config("org/model", "embedded", ["run.eval_sampels=3"])
    with pytest.raises(ValueError, match="eval_temperature=0 is greedy"):
        build_eval_config("org/model", "embedded", ["run.eval_temperature=0", "run.eval_samples=4"])


def test_embedded_evaluation_uses_exactly_the_runs_heldout_prompts(trained_run, tiny_tokenizer):
    from kdrl.storage import RunPaths

    cfg = build_eval_config(str(trained_run), "embedded")
    run_prompts = read_table(RunPaths(trained_run).prompts, table="prompts").filter(pl.col("split") == "heldout")
    assert eval_prompts(cfg, tiny_tokenizer).equals(run_prompts)


def test_local_file_with_mapped_columns(qa_file, tiny_tokenizer, tiny_model_dir, tmp_path):
    cfg = build_eval_config(str(tiny_model_dir / "student"), str(qa_file),
                            ["data.question_field=problem", "data.answer_field=solution", "limit=4",
                             "run.eval_samples=3", "rollout.max_new_tokens=6", "data.prompt_template='Q: {question}'"])
    prompts = eval_prompts(cfg, tiny_tokenizer)
    source = {json.loads(line)["problem"]: json.loads(line)["solution"] for line in qa_file.read_text().splitlines()}
    assert prompts.height == 4 and prompts["split"].unique().to_list() == ["heldout"]
    for q, a, text in prompts.select("question", "answer", "prompt_text").iter_rows():
        assert a == source[q].rsplit("#### ", 1)[1] and text == f"Q: {q}"

    out = run_eval(cfg, tmp_path / "ev", log=lambda _: None)
    samples = read_table(out.samples, table="evaluations")
    assert samples.height == 4 * 3 + 4  # k=3 at T=0.6, plus one greedy decode each
    assert sorted(samples["temperature"].unique().to_list()) == pytest.approx([0.0, 0.6])
    assert samples["completion_len"].max() <= 6
    summary = read_table(out.summary, table="eval_summary")
    assert summary["temperature"].to_list() == pytest.approx([0.6, 0.0]) and summary["samples"].to_list() == [3, 1]
    # pass@1 recomputed by hand from the rows: mean over prompts of the mean over samples
    sampled = samples.filter(pl.col("temperature") > 0)
    by_prompt = sampled.group_by("prompt_id").agg(pl.col("correct").cast(pl.Float64).mean())["correct"]
    assert summary["pass_at_1"][0] == pytest.approx(by_prompt.mean())
    truncated = (sampled["finish_reason"] == "length").mean()
    assert summary["truncated_frac"][0] == pytest.approx(truncated)
    assert summary["num_prompts"].to_list() == [4, 4] and summary["dataset"][0] == str(qa_file)


def test_the_output_folder_is_a_record(qa_file, tiny_model_dir, tmp_path):
    overrides = ["data.question_field=problem", "data.answer_field=solution", "run.eval_samples=1",
                 "run.eval_temperature=0", "rollout.max_new_tokens=4"]
    cfg = build_eval_config(str(tiny_model_dir / "student"), str(qa_file), overrides)
    out = run_eval(cfg, tmp_path / "ev", log=lambda _: None)
    stamp = Path(out.summary).stat().st_mtime_ns
    messages = []
    assert run_eval(cfg, tmp_path / "ev", log=messages.append) == out
    assert Path(out.summary).stat().st_mtime_ns == stamp and "already holds this evaluation" in messages[0]
    changed = build_eval_config(str(tiny_model_dir / "student"), str(qa_file), [*overrides, "rollout.max_new_tokens=5"])
    with pytest.raises(FileExistsError, match="holds another evaluation"):
        run_eval(changed, tmp_path / "ev", log=lambda _: None)
    assert Path(out.summary).stat().st_mtime_ns == stamp


def test_bad_columns_and_rows_are_named(qa_file, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"no column 'question'.*\['problem', 'solution', 'id'\]"):
        run_eval(build_eval_config(str(tiny_model_dir / "student"), str(qa_file)), tmp_path / "a", log=lambda _: None)
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\n1+1=,#### 2\n2+2=,\n")
    with pytest.raises(ValueError, match=r"bad.csv: row 1: no reference answer in 'answer'"):
        run_eval(build_eval_config(str(tiny_model_dir / "student"), str(bad)), tmp_path / "b", log=lambda _: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_without_prefect(qa_file, tiny_model_dir, tmp_path, capsys):
    argv = ["eval", "--checkpoint", str(tiny_model_dir / "student"), "--dataset", str(qa_file),
            "--question-field", "problem", "--answer-field", "solution", "-k", "2", "--max-new-tokens", "5",
            "--prompt-template", "Q: {question} A:",
            "--out", str(tmp_path / "ev"), "--no-prefect"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "pass_at_1" in out and "truncated_frac" in out and str(tmp_path / "ev" / "samples.parquet") in out
    assert read_table(tmp_path / "ev" / "summary.parquet", table="eval_summary")["num_prompts"].to_list() == [5, 5]
    assert main(["eval", "--checkpoint", str(tmp_path / "missing"), "--no-prefect"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_the_eval_flow_writes_the_summary_and_an_artifact(trained_run, tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client

    from flows.evaluate import kdrl_eval

    summary = kdrl_eval(str(trained_run), "embedded", ["run.eval_samples=2"], str(tmp_path / "flow-ev"))
    table = read_table(summary, table="eval_summary")
    assert table["num_prompts"].to_list() == [4, 4] and table["step"].to_list() == [1, 1]

    async def artifacts():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    from tasks.report import artifact_key

    # keyed by the output folder (two evals of folders named `checkpoint` elsewhere keep their own)
    [artifact] = [a for a in asyncio.run(artifacts()) if a.key == artifact_key(tmp_path / "flow-ev", "eval")]
    assert "| 0.6 | 2 | 4 |" in artifact.data
    # the deployment's way: no out_dir, a folder per evaluation under evals_dir (outside the checkout)
    elsewhere = Path(kdrl_eval(str(trained_run), "embedded", ["run.eval_samples=2"], evals_dir=str(tmp_path / "evs")))
    assert elsewhere.parent.parent == tmp_path / "evs" and "--embedded-" in elsewhere.parent.name


def test_an_embedded_evaluation_with_few_train_rows_is_not_checked_as_a_run(tiny_model_dir, tmp_path):
    # data.num_train only shapes the embedded split here: a run's rollout.prompts_per_step (16) does not apply
    argv = ["eval", "--checkpoint", str(tiny_model_dir / "student"), "-k", "1", "--max-new-tokens", "4", "--no-prefect",
            "--set", "data.num_train=6", "--set", "data.num_heldout=3", "--out", str(tmp_path / "ev")]
    assert main(argv) == 0
    assert read_table(tmp_path / "ev" / "summary.parquet", table="eval_summary")["num_prompts"].to_list()[0] == 3


def test_a_chat_run_on_a_dataset_is_evaluated_on_its_heldout_prompts_as_it_was_prompted(qa_file, tmp_path,
                                                                                         tiny_tokenizer):
    """A run trained with chat prompts on a local dataset: `kdrl eval RUN` renders prompts with the
    run's chat settings and takes exactly its held-out prompts; another dataset keeps the chat
    settings (the model was tuned on them) with that dataset's own columns."""
    import copy

    from kdrl.config import dump_config, load_config
    from kdrl.data import build_prompts

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    run_dir = tmp_path / "runs" / "chat"
    run_dir.mkdir(parents=True)
    run_cfg = load_config(overrides=[f"data.source={qa_file}", "data.question_field=problem",
                                     "data.answer_field=solution", "data.prompt_format=chat", "data.system_prompt=sum",
                                     "data.prompt_template='add {question}'", "data.num_train=2", "data.num_heldout=3",
                                     "rollout.prompts_per_step=2"])
    (run_dir / "config.yaml").write_text(dump_config(run_cfg))
    cfg = build_eval_config(str(run_dir))
    assert ((cfg.data.source, cfg.limit, cfg.data.prompt_format, cfg.data.system_prompt)
            == (str(qa_file), 3, "chat", "sum"))
    heldout = build_prompts(run_cfg.data, tok).filter(pl.col("split") == "heldout")
    assert eval_prompts(cfg, tok)["prompt_token_ids"].to_list() == heldout["prompt_token_ids"].to_list()
    assert heldout["prompt_text"][0].startswith("system: sum\nuser: add ")
    other = build_eval_config(str(run_dir), "some/dataset")
    assert ((other.data.source, other.data.prompt_format, other.data.prompt_template)
            == ("some/dataset", "chat", "add {question}"))
    assert other.data.question_field == "question" and other.limit == 0
