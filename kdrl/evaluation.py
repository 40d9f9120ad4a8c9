"""`kdrl eval`: any model on any question/answer dataset → per-sample and summary Parquet.

What is evaluated can be a kdrl run directory (its latest checkpoint), one checkpoint folder
(``iter_*/checkpoint``), a Hugging Face model folder or hub name, or ``embedded:student`` /
``embedded:teacher``. A LoRA checkpoint is its merged/ folder when it has one, else its base
model with the adapter merged in (`kdrl.lora`). The dataset is "embedded" (the held-out split
of a data section) or any `datasets` source with a question and an answer column
(``data.question_field`` / ``data.answer_field``; the answer may be a worked answer ending in
``#### N``).

    cfg = build_eval_config("runs/kdrl_anneal-1a2b3c4d", "embedded", ["run.eval_samples=8"])
    out = run_eval(cfg)          # evals/<name>/samples.parquet, summary.parquet, eval.yaml

The decoding, placement and sampling keys are a run config's (``rollout.max_new_tokens``,
``model.dtype``, ``run.eval_samples``, ...). A checkpoint inside a run inherits that run's reward
rules and rollout.max_new_tokens, and, for the "embedded" dataset, its data section (so its
held-out prompts are the run's); options given explicitly win. Reported: pass@1 averaged over k
samples at a temperature, greedy accuracy (temperature 0 rows), mean and p90 response length, share
of truncated responses.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import yaml

from kdrl.config import (
    EVAL_DEFAULTS,
    RENAMED_EVAL_KEYS,
    DataConfig,
    EvalConfig,
    RunConfig,
    load_config,
    merge_dicts,
    parse_override,
    validate_config,
)
from kdrl.data import PromptLimit
from kdrl.families import is_embedded
from kdrl.runs import summarize_evaluation
from kdrl.storage import EVAL_SUMMARY, RunPaths, read_metadata, read_table, write_table


@dataclass(frozen=True)
class ResolvedModel:
    """A model folder (or hub name) to load, and where it came from."""

    path: str
    step: int = -1
    """Training step of the checkpoint (-1: not a kdrl checkpoint)."""
    run_dir: Path | None = None
    """The kdrl run it belongs to, if any."""
    adapter: str | None = None
    """A LoRA adapter folder to merge into `path` (then its base model), for a LoRA checkpoint
    without a merged/ folder."""


def _iter_step(path: Path) -> int:
    match = re.fullmatch(r"iter_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def _owning_run(path: Path) -> Path | None:
    """The run directory holding `path` (itself or an ancestor with a config.yaml)."""
    for candidate in (path, *path.parents):
        if RunPaths(candidate).config.is_file():
            return candidate
    return None


def resolve_checkpoint(checkpoint: str, *, run_cfg: RunConfig | None = None,
                       log: Callable[[str], None] = print) -> ResolvedModel:
    """Where the weights of `checkpoint` are. Local paths are recognised by what they hold; a
    missing one fails at once, without asking the hub. Only a name that can be a hub model id
    ("name" or "owner/name", not a file name like "model.safetensors") and whose "owner/" is not
    a local folder (`runs/typo`: a mistyped run, not a hub model) is passed on as a hub name
    (loading reports it if it does not exist).

    >>> resolve_checkpoint("Qwen/Qwen2.5-0.5B-Instruct")  # with no folder ./Qwen here
    ResolvedModel(path='Qwen/Qwen2.5-0.5B-Instruct', step=-1, run_dir=None, adapter=None)
    >>> resolve_checkpoint("runs/grpo-1/iter_00003/checkpoint")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    FileNotFoundError: checkpoint 'runs/grpo-1/iter_00003/checkpoint': no such file or folder ...
    """
    if checkpoint.startswith("embedded:"):
        from kdrl.embedded import resolve_model_path

        return ResolvedModel(resolve_model_path(checkpoint, run_cfg or RunConfig(), log=log))
    path = Path(checkpoint).expanduser()
    if not path.exists():
        file_suffixes = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".json", ".yaml", ".yml", ".parquet")
        hub_id = re.fullmatch(r"(\w[\w.-]{0,95}/)?\w[\w.-]{0,95}", checkpoint) and ".." not in checkpoint
        if checkpoint.startswith((".", "/", "~")) or not hub_id or checkpoint.lower().endswith(file_suffixes):
            raise FileNotFoundError(f"checkpoint {checkpoint!r}: no such file or folder "
                                    f"(looked for {path.absolute()}); a hub model is named like owner/name")
        if "/" in checkpoint and path.parent.is_dir():  # runs/<typo>: the hub would answer only after its retries
            close = difflib.get_close_matches(path.name, [p.name for p in path.parent.iterdir()], n=1)
            hint = f"; did you mean {str(path.parent / close[0])!r}?" if close else ""
            raise FileNotFoundError(f"checkpoint {checkpoint!r}: no such file or folder "
                                    f"(looked for {path.absolute()}{hint}); "
                                    f"{path.parent.as_posix()}/ is a local folder, so this is not a hub model name")
        return ResolvedModel(checkpoint)
    if RunPaths(path).config.is_file():  # a run directory: its latest checkpoint
        from kdrl.runs import require_checkpoint

        step = require_checkpoint(RunPaths(path))
        return _checkpoint_model(RunPaths(path).checkpoint(step), step, path)
    # iter_*/checkpoint
    if (path / "model" / "config.json").is_file() or (path / "adapter" / "adapter_config.json").is_file():
        return _checkpoint_model(path, _iter_step(path.parent), _owning_run(path))
    if (path / "adapter_config.json").is_file():  # a LoRA adapter folder (possibly iter_*/checkpoint/adapter)
        from kdrl.lora import adapter_base_model

        step = _iter_step(path.parent.parent) if path.parent.name == "checkpoint" else -1
        return ResolvedModel(adapter_base_model(path), step, _owning_run(path) if step >= 0 else None,
                             adapter=str(path))
    if (path / "config.json").is_file():  # an HF model folder (possibly iter_*/checkpoint/model)
        step = _iter_step(path.parent.parent) if path.parent.name == "checkpoint" else -1
        return ResolvedModel(str(path), step, _owning_run(path) if step >= 0 else None)
    raise FileNotFoundError(
        f"checkpoint {checkpoint!r}: not a kdrl run directory (config.yaml), a checkpoint folder "
        "(model/config.json, or adapter/ of a LoRA run), a Hugging Face model folder (config.json) "
        "or a LoRA adapter folder"
    )


def _checkpoint_model(checkpoint: Path, step: int, run_dir: Path | None) -> ResolvedModel:
    """The weights of a checkpoint folder: model/ (full weights), else a LoRA checkpoint's merged/
    folder, else its adapter on the base model the adapter names."""
    from kdrl.lora import ADAPTER_DIR, MERGED_DIR, adapter_base_model

    if not (checkpoint / ADAPTER_DIR).is_dir():
        return ResolvedModel(str(checkpoint / "model"), step, run_dir)
    if (checkpoint / MERGED_DIR / "config.json").is_file():
        return ResolvedModel(str(checkpoint / MERGED_DIR), step, run_dir)
    return ResolvedModel(adapter_base_model(checkpoint / ADAPTER_DIR), step, run_dir,
                         adapter=str(checkpoint / ADAPTER_DIR))


PROMPT_KEYS = ("prompt_format", "prompt_template", "system_prompt", "chat_template_kwargs")
"""The data keys that say how a question becomes a prompt: a run's checkpoint is evaluated with its run's."""


def build_eval_config(checkpoint: str, dataset: str = "embedded",
                      overrides: list[str] | tuple[str, ...] = ()) -> EvalConfig:
    """The EvalConfig of `checkpoint` on `dataset`: defaults (`EVAL_DEFAULTS` over EvalConfig's) ←
    what the owning run fixes (reward rules, rollout.max_new_tokens, how prompts are rendered
    (`PROMPT_KEYS`), and for "embedded" the run's whole data section: its held-out prompts, also
    when the run trained on another source) ← `overrides` ("run.eval_samples=8",
    "data.answer_field=solution", ...). A key EvalConfig had before it took a run config's keys
    is refused with its new name (`RENAMED_EVAL_KEYS`)."""
    values: dict = EVAL_DEFAULTS
    owner = None
    if not checkpoint.startswith("embedded:") and Path(checkpoint).expanduser().exists():
        owner = _owning_run(Path(checkpoint).expanduser())
    if owner is not None:
        run_cfg = load_config(RunPaths(owner).config, check_objective=False)  # a run already made
        fixed = {"rollout": {"max_new_tokens": run_cfg.rollout.max_new_tokens},
                 "reward": run_cfg.reward.model_dump(mode="json"),
                 "data": {key: getattr(run_cfg.data, key) for key in PROMPT_KEYS}}  # prompted as it was trained
        values = merge_dicts(values, fixed)
        if dataset == "embedded":  # the run's own held-out prompts
            values["data"] = run_cfg.data.model_dump(mode="json")
            if not is_embedded(run_cfg.data.source):  # they come first in the seeded order (see build_prompts)
                values["limit"] = run_cfg.data.num_heldout
                dataset = run_cfg.data.source
    values = merge_dicts(values, {"checkpoint": checkpoint, "data": {"source": dataset}})
    for text in overrides:
        values = merge_dicts(values, parse_override(text))
    return validate_config(EvalConfig, values, source=f"kdrl eval {checkpoint} on {dataset}", overrides=overrides,
                           renamed=RENAMED_EVAL_KEYS)


def eval_prompts(cfg: EvalConfig, tokenizer, *, max_prompt_tokens: int | PromptLimit | None = None) -> pl.DataFrame:
    """The PROMPTS rows to evaluate: the held-out split for "embedded", else the dataset's rows.
    limit = 0: all of them, less duplicates and prompts longer than `max_prompt_tokens` (fewer
    prompts than rows). limit > 0: the first `limit` usable rows of the seeded shuffle (a
    duplicate or over-long row is replaced by the next one; see `build_prompts`)."""
    from kdrl.data import build_prompts, load_source

    if is_embedded(cfg.data.source):
        return build_prompts(cfg.data, tokenizer, max_prompt_tokens=max_prompt_tokens).filter(
            pl.col("split") == "heldout")
    ds = load_source(cfg.data)
    n = len(ds) if cfg.limit <= 0 else min(cfg.limit, len(ds))
    if n == 0:
        raise ValueError(f"{cfg.data.source} (split {cfg.data.split!r}) has no rows")
    data: DataConfig = cfg.data.model_copy(update={"num_train": 0, "num_heldout": n})
    return build_prompts(data, tokenizer, ds=ds, max_prompt_tokens=max_prompt_tokens, fewer_ok=True)


def summarize_samples(samples: pl.DataFrame, *, dataset: str) -> pl.DataFrame:
    """EVAL_SUMMARY: one row per (model, temperature) of an EVALUATIONS table.

    >>> ev = pl.DataFrame({"step": [3] * 3, "prompt_id": [0, 0, 1], "sample_idx": [0, 1, 0],
    ...                    "model": ["m"] * 3, "temperature": [0.6] * 3, "correct": [True, False, True],
    ...                    "completion_len": [4, 6, 5], "finish_reason": ["stop", "length", "stop"]})
    >>> summarize_samples(ev, dataset="d").select("samples", "pass_at_1", "truncated_frac").row(0)
    (2, 0.75, 0.3333333333333333)
    """
    extra = samples.group_by("model", "temperature").agg(
        (pl.col("sample_idx").max() + 1).cast(pl.Int64).alias("samples"),
        (pl.col("finish_reason") == "length").mean().alias("truncated_frac"),
    )
    return (
        summarize_evaluation(samples)
        .join(extra, on=["model", "temperature"], how="left")
        .with_columns(pl.lit(dataset).alias("dataset"))
        .sort("model", "temperature", descending=[False, True])
        .select(list(EVAL_SUMMARY))
        .cast(EVAL_SUMMARY)
    )


def default_out_dir(cfg: EvalConfig, root: str | Path = "evals") -> Path:
    """<root>/<model>--<dataset>-<config hash>: one folder per distinct evaluation (`~` in root
    is the user's home: a deployment's evaluations outside its checkout).

    >>> default_out_dir(EvalConfig(checkpoint="runs/grpo-1/iter_00009/checkpoint")).name[:28]
    'grpo-1-iter_00009--embedded-'
    """
    def slug(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:60] or "model"

    path = Path(cfg.checkpoint)
    parts = [p for p in path.parts if p not in ("checkpoint", "model", "runs", ".", "/")][-2:]
    dataset = Path(cfg.data.source).stem if cfg.data.source != "embedded" else "embedded"
    return Path(root).expanduser() / f"{slug('-'.join(parts))}--{slug(dataset)}-{cfg.hash()[:8]}"


@dataclass(frozen=True)
class EvalOutput:
    samples: str
    summary: str


def run_eval(cfg: EvalConfig, out_dir: str | Path | None = None, *, evals_dir: str | Path = "evals",
             log: Callable[[str], None] = print) -> EvalOutput:
    """Evaluate and write ``samples.parquet`` (EVALUATIONS), ``summary.parquet`` (EVAL_SUMMARY)
    and ``eval.yaml`` under `out_dir` (default: `default_out_dir` under `evals_dir`). A folder
    already holding this evaluation (same config
    hash) is returned as it is; one holding another evaluation is refused, never overwritten."""
    from kdrl.data import prompt_token_limit
    from kdrl.engines.factory import EngineSpec, build_engine
    from kdrl.engines.select import choose_engine, count_parameters
    from kdrl.engines.vllm import vllm_available
    from kdrl.models import load_causal_lm, load_tokenizer, resolve_device
    from kdrl.prompts import warn_if_chat_model
    from kdrl.stages import evaluate_passes

    out = Path(out_dir).expanduser() if out_dir is not None else default_out_dir(cfg, evals_dir)
    result = EvalOutput(str(out / "samples.parquet"), str(out / "summary.parquet"))
    if Path(result.summary).exists():
        found = read_metadata(result.summary).get("kdrl.config_hash")
        if found != cfg.hash():
            raise FileExistsError(f"{out} holds another evaluation (config hash {found}, this one {cfg.hash()}); "
                                  "choose another --out")
        log(f"[kdrl] {out} already holds this evaluation")
        return result
    # Only carries the data settings that key the embedded models' cache: not a run, so not
    # validated as one (e.g. rollout.prompts_per_step against this evaluation's data.num_train).
    run_cfg = RunConfig.model_construct(data=cfg.data) if is_embedded(cfg.data.source) else None
    model = resolve_checkpoint(cfg.checkpoint, run_cfg=run_cfg, log=log)
    tokenizer = load_tokenizer(model.adapter or model.path)
    warn_if_chat_model(cfg.data, tokenizer, model.path)
    # As in training: vllm.max_model_len binds whenever the engine may be vLLM, so the prompts
    # (and the evaluation's config hash) mean the same on every machine.
    decoding, placement, sampling = cfg.rollout, cfg.model, cfg.run
    contexts = {"the model": model.path} | ({"rollout.vllm.max_model_len": decoding.vllm.max_model_len}
                                             if decoding.engine != "hf" else {})
    limit = prompt_token_limit(contexts, tokenizer, max_new_tokens=decoding.max_new_tokens,
                               field="rollout.max_new_tokens")
    prompts = eval_prompts(cfg, tokenizer, max_prompt_tokens=limit)
    log(f"[kdrl] evaluating {cfg.checkpoint} on {len(prompts)} prompts of {cfg.data.source}: "
        f"{sampling.eval_samples} sample(s) at T={sampling.eval_temperature}"
        + (" + greedy" if sampling.eval_greedy and sampling.eval_temperature > 0 else ""))
    choice = choose_engine(decoding.engine, field="rollout.engine", num_params=lambda: count_parameters(model.path),
                           device=resolve_device(placement.device).type, vllm_installed=vllm_available())
    log(f"[kdrl] engine: {choice.engine} ({choice.reason})")
    merged = None
    if model.adapter:  # a LoRA checkpoint: its base with the adapter merged in (pushed into vLLM, like a training sync)
        from kdrl.lora import load_merged_model

        merged = load_merged_model(model.adapter, dtype=placement.dtype,
                                   device="cpu" if choice.engine == "vllm" else placement.device)
    spec = EngineSpec(choice.engine, model.path, placement.dtype, decoding.vllm, decoding.batch_size, sampling.seed)
    if choice.engine == "vllm":  # a LoRA checkpoint's merged weights are pushed in, like a training sync
        engine = build_engine(spec, tokenizer, module=merged, log=log, name="evaluation")
        if merged is not None:
            engine.sync_weights()
    else:
        engine = build_engine(spec, tokenizer, module=merged if merged is not None else
                              load_causal_lm(model.path, dtype=placement.dtype, device=placement.device))
    from kdrl.progress import reporting

    with reporting(log, f"eval {Path(cfg.checkpoint).name or cfg.checkpoint}"):  # a line every 30 s: evals run minutes
        samples = evaluate_passes(engine, prompts, step=model.step, model_name=cfg.checkpoint,
                                  k=sampling.eval_samples, temperature=sampling.eval_temperature,
                                  greedy=sampling.eval_greedy, max_new_tokens=decoding.max_new_tokens,
                                  reward_cfg=cfg.reward, seed=sampling.seed, top_p=decoding.top_p)
    metadata = {"kdrl.config_hash": cfg.hash(), "kdrl.model_path": model.path, "kdrl.engine": choice.engine,
                **({"kdrl.adapter": model.adapter} if model.adapter else {})}
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    write_table(samples, result.samples, table="evaluations", metadata=metadata)
    write_table(summarize_samples(samples, dataset=cfg.data.source), result.summary, table="eval_summary",
                metadata=metadata)
    return result


def read_summary(out: EvalOutput | str | Path) -> pl.DataFrame:
    """The summary table of a finished evaluation (an EvalOutput or its folder)."""
    path = out.summary if isinstance(out, EvalOutput) else Path(out) / "summary.parquet"
    return read_table(path, table="eval_summary")
