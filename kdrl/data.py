"""Prompt sets: a built-in task family (`kdrl.families`), or any `datasets` source with
question/answer columns.

The default embedded task is column addition with a worked answer that ends in ``#### N`` —
reasoning a tiny model can learn, with responses whose length grows with the number of digits:

    question  "47+85="
    answer    "7+5=12;4+8+1=13;#### 132"

Each step adds one column (right to left) plus the carry; the final line reads the answer off the
column sums. A student that skips or botches a step gets the answer wrong, so the reward is
sparse for a weak student and dense for a trained teacher (the regime KDRL is for).
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import json
import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdrl.config import DataConfig
from kdrl.families import embedded_arithmetic, family, is_embedded, worked_answer  # noqa: F401  (re-exported)
from kdrl.prompts import render_prompts
from kdrl.sources import is_generated, load_generated

if TYPE_CHECKING:
    import datasets
    import polars as pl

    from kdrl.config import RunConfig

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message names the file and, where known, the
    line, row or field, and what to do."""


_KINDS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _json_problem(text: str) -> str | None:
    """Where a json/jsonl text stops being JSON: the first bad line of JSON lines, else the
    position in the one document. None when every line (or the document) parses."""
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    try:
        one_object_per_line = isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        one_object_per_line = False
    if one_object_per_line:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {lineno} is not valid JSON ({err.msg} at column {err.colno}): {line[:80]!r}"
            if not isinstance(record, dict):
                return f"line {lineno} is not a JSON object ({{\"question\": ..., \"answer\": ...}}): {line[:80]!r}"
        return None
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        return f"line {err.lineno} is not valid JSON ({err.msg} at column {err.colno})"
    return None


def _csv_problem(text: str) -> str | None:
    """The first CSV record whose field count differs from the header's (blank lines skipped),
    or a header without rows."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, [])
    rows = 0
    for record in reader:
        if not record:
            continue
        rows += 1
        if len(record) != len(header):
            return (f"line {reader.line_num} has {len(record)} fields but the header has {len(header)} "
                    f"({', '.join(header)}): {','.join(record)[:80]!r}; quote fields that contain commas")
    return None if rows else f"no rows under the header ({', '.join(header)})"


def _utf8_problem(path: Path) -> str | None:
    """Where a text file stops being UTF-8 (line and byte), or None. Checked before loading:
    pyarrow reads such bytes without complaint and they fail later, on first access to the row."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
        return None
    except UnicodeDecodeError:
        data = path.read_bytes()  # only now, to find the line
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return f"line {line} (byte {err.start}: 0x{data[err.start]:02x}) is not UTF-8 text; save the file as UTF-8"
    return None


def _file_problem(path: Path) -> str | None:
    """What made a local data file fail to load, in words: empty, bad JSON (line), ragged CSV
    (line). None when none of these is found. Its bytes are UTF-8 already (checked first)."""
    data = path.read_bytes()
    if not data.strip():
        return "the file is empty"
    kind = _KINDS.get(path.suffix)
    if kind not in ("json", "csv"):
        return None
    text = data.decode("utf-8-sig", errors="replace")
    return _csv_problem(text) if kind == "csv" else _json_problem(text)


def _load_local(path: Path, split: str) -> datasets.Dataset:
    """`datasets.load_dataset` on a local file or folder (its `split`). Text files are checked to be
    UTF-8 first; what loading fails on is re-raised as a DatasetError naming the file and line
    (found by re-reading the file, only on failure)."""
    import datasets

    if path.is_file():
        kind = _KINDS.get(path.suffix)
        if kind is None:
            raise DatasetError(f"{path}: unsupported file type {path.suffix!r} (json, jsonl, csv, parquet)")
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix in _KINDS and p.is_file())
    for file in files:
        problem = _utf8_problem(file) if _KINDS[file.suffix] != "parquet" else None
        if problem is not None:
            raise DatasetError(f"{file}: {problem}")
    try:
        if path.is_file():
            return datasets.load_dataset(kind, data_files=str(path), split="train")
        return datasets.load_dataset(str(path), split=split)
    except Exception as err:  # datasets wraps parser errors in several types, or none (StopIteration)
        for file in files:
            problem = _file_problem(file)
            if problem is not None:
                raise DatasetError(f"{file}: {problem}") from err
        cause = err.__cause__ or err
        raise DatasetError(f"{path}: cannot be read as a dataset: {type(cause).__name__}: {cause}") from err


def load_source(cfg: DataConfig) -> datasets.Dataset:
    """The raw dataset: the embedded generator, local files (json/jsonl/csv/parquet, a file or a
    folder of them), or a Hugging Face hub name. Checks the configured columns exist."""
    import datasets

    if is_embedded(cfg.source):  # a built-in family (kdrl/families.py)
        return family(cfg.source).problems(cfg.num_train + cfg.num_heldout, cfg)
    path = Path(cfg.source)
    if is_generated(cfg.source):  # "reasoning-gym:<task>" (kdrl/sources.py)
        ds = load_generated(cfg)
    elif path.exists():
        ds = _load_local(path, cfg.split)
    else:  # a hub name
        ds = datasets.load_dataset(cfg.source, split=cfg.split)
    for key, field in (("question_field", cfg.question_field), ("answer_field", cfg.answer_field)):
        if field not in ds.column_names:
            close = difflib.get_close_matches(field, ds.column_names, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DatasetError(f"{cfg.source}: no column {field!r} (data.{key}){hint}; columns are {ds.column_names}")
    return ds


def normalised_question(question: str) -> str:
    """The key rows are de-duplicated by: whitespace runs collapsed to one space, ends stripped,
    case-folded (so "What is 2+2?" and " what is  2+2? " are one question).

    >>> normalised_question("  What is\\t2+2?\\n") == normalised_question("what is 2+2?")
    True
    """
    return " ".join(question.split()).casefold()


def unique_rows(questions: list) -> tuple[list[int], dict[int, int]]:
    """(indices of the first row of each distinct normalised question, in row order;
    {duplicate row: the first row it repeats}). Non-text questions are kept as they are (they
    are refused by row later, if drawn).

    >>> unique_rows(["1+1=", "2+2=", " 1+1= ", None, None])
    ([0, 1, 3, 4], {2: 0})
    """
    first: dict[str, int] = {}
    keep, duplicates = [], {}
    for index, question in enumerate(questions):
        if isinstance(question, str):
            key = normalised_question(question)
            if key in first:
                duplicates[index] = first[key]
                continue
            first[key] = index
        keep.append(index)
    return keep, duplicates


def _row_indices(rows: list[int], *, shown: int = 5) -> str:
    more = f", … ({len(rows) - shown} more)" if len(rows) > shown else ""
    return ", ".join(map(str, rows[:shown])) + more


def _read_row(ds: datasets.Dataset, row_index: int, cfg: DataConfig) -> tuple[str, str]:
    """(question, gold answer) of one row; an empty question or no reference answer is refused."""
    from kdrl.rewards import reference_answer

    row = ds[row_index]
    question, answer = row[cfg.question_field], row[cfg.answer_field]
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{cfg.source}: row {row_index}: empty or non-text {cfg.question_field!r}")
    gold = reference_answer(str(answer)) if answer is not None else ""
    if not gold:
        raise DatasetError(f"{cfg.source}: row {row_index}: no reference answer in {cfg.answer_field!r}")
    return question, gold


def _take_rows(cfg: DataConfig, ds: datasets.Dataset, tokenizer, order: list[int], need: int,
               max_prompt_tokens: int | None) -> tuple[list[tuple[int, str, str, str, list[int]]], list[int]]:
    """The first `need` rows of `order` whose prompt fits in `max_prompt_tokens`, as (row,
    question, gold, prompt text, token ids); and the rows skipped for being too long. Rows are
    tokenized in batches of what is still missing, so a long dataset is read only as far as needed."""
    taken, too_long, position = [], [], 0
    while len(taken) < need and position < len(order):
        batch = order[position : position + need - len(taken)]
        position += len(batch)
        rows = [_read_row(ds, row_index, cfg) for row_index in batch]
        texts, ids = render_prompts(cfg, tokenizer, [question for question, _ in rows])
        for row_index, (question, gold), text, token_ids in zip(batch, rows, texts, ids):
            if max_prompt_tokens is not None and len(token_ids) > max_prompt_tokens:
                too_long.append(row_index)
            else:
                taken.append((row_index, question, gold, text, token_ids))
    return taken, too_long


def build_prompts(cfg: DataConfig, tokenizer, *, ds: datasets.Dataset | None = None,
                  max_prompt_tokens: int | PromptLimit | None = None, fewer_ok: bool = False) -> pl.DataFrame:
    """The PROMPTS table: a seeded, disjoint train/held-out split, rendered (plain template or the
    tokenizer's chat template: `kdrl.prompts`) and tokenized. A built-in family with an
    out-of-domain split (`kdrl.families`) adds num_heldout rows of it, split "ood", after the
    others: never trained on, evaluated beside "heldout".

    Rows are de-duplicated first, by `normalised_question` (whitespace collapsed, case-folded;
    the first row of each question is kept, a WARNING gives the count), so no question can be
    both trained on and held out. Held-out rows come first in the shuffled order so that growing
    num_train never moves a held-out prompt into training. A prompt longer than
    `max_prompt_tokens` (the context minus max_new_tokens: see `prompt_token_limit`, whose
    `PromptLimit` also says in the messages what bounds it) is skipped with a WARNING and the
    next row taken instead. Rows whose question or answer is empty
    are refused by row; gold answers that are not numbers get one WARNING with their count.

    `ds` is `load_source(cfg)` when already loaded. `fewer_ok` (kdrl eval) takes up to
    num_train + num_heldout rows instead of refusing a source with fewer usable ones.
    """
    import polars as pl

    from kdrl.rewards import is_numeric_answer

    ds = load_source(cfg) if ds is None else ds
    if isinstance(max_prompt_tokens, int):
        max_prompt_tokens = PromptLimit(max_prompt_tokens, "the limit given", "raise the limit")
    need = cfg.num_train + cfg.num_heldout
    order, duplicates = unique_rows(ds[cfg.question_field])
    if duplicates:
        examples = "; ".join(f"row {row} repeats row {first}" for row, first in list(duplicates.items())[:3])
        logger.warning("%s: %d duplicate row(s) dropped (same question once whitespace is collapsed and case "
                       "folded: %s); %d distinct questions remain", cfg.source, len(duplicates), examples, len(order))
    if not is_embedded(cfg.source) and not is_generated(cfg.source):
        # Not the generator's rows: they are seeded-random already and a larger num_train only
        # appends to them, whereas shuffling a longer list would move every held-out prompt.
        random.Random(cfg.seed).shuffle(order)
    limit = max_prompt_tokens
    taken, too_long = _take_rows(cfg, ds, tokenizer, order, need, limit and limit.tokens)
    if too_long:
        logger.warning("%s: %d prompt(s) longer than %d tokens (%s) dropped: rows %s",
                       cfg.source, len(too_long), limit.tokens, limit.why, _row_indices(too_long))
    if not taken and too_long:
        raise DatasetError(f"{cfg.source}: every prompt is longer than {limit.tokens} tokens ({limit.why}); "
                           f"shorten the questions or data.prompt_template, or {limit.fix}")
    if len(taken) < need and not (fewer_ok and taken):
        dropped = ([f"{len(duplicates)} duplicate(s)"] * bool(duplicates)
                   + [f"{len(too_long)} too long"] * bool(too_long))
        detail = f" ({', '.join(dropped)}: {len(taken)} usable)" if dropped else ""
        raise DatasetError(f"{cfg.source}: {len(ds)} rows{detail}, but num_train + num_heldout = {need}")
    not_numeric = [row_index for row_index, _, gold, _, _ in taken if not is_numeric_answer(gold)]
    if not_numeric:
        first = ds[not_numeric[0]][cfg.answer_field]
        logger.warning("%s: %d of %d gold answers are not numbers (rows %s; row %d: %r); the reward compares answers "
                       "as numbers or LaTeX maths, so check data.answer_field", cfg.source, len(not_numeric),
                       len(taken), _row_indices(not_numeric), not_numeric[0], str(first)[:80])
    splits = ["heldout" if rank < cfg.num_heldout else "train" for rank in range(len(taken))]
    if is_embedded(cfg.source) and family(cfg.source).has_ood and not fewer_ok:
        # The family's out-of-domain problems, as many as held out, after every other row: their
        # prompt ids follow, so the in-domain rows are numbered as without them.
        ood = family(cfg.source).problems(cfg.num_heldout, cfg, ood=True)
        ood_rows, _ = _take_rows(cfg, ood, tokenizer, list(range(len(ood))), len(ood), limit and limit.tokens)
        taken += ood_rows
        splits += ["ood"] * len(ood_rows)
    return pl.DataFrame(
        {
            "prompt_id": list(range(len(taken))),
            "split": splits,
            "question": [question for _, question, _, _, _ in taken],
            "answer": [gold for _, _, gold, _, _ in taken],
            "prompt_text": [text for _, _, _, text, _ in taken],
            "prompt_token_ids": [ids for _, _, _, _, ids in taken],
        },
        schema_overrides={"prompt_token_ids": pl.List(pl.Int32)},
    )


_UNSET_MAX_LENGTH = 10**7
"""transformers writes int(1e30) as model_max_length when a tokenizer does not know its limit."""


def context_length(model_config, tokenizer=None) -> int | None:
    """The most tokens (prompt + completion) a model takes: its config's max_position_embeddings
    (or n_positions / max_sequence_length / seq_length), else the tokenizer's model_max_length
    when that is a real limit; None when neither says."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < _UNSET_MAX_LENGTH else None


@dataclass(frozen=True)
class PromptLimit:
    """The longest prompt that leaves room for the response, and what bounds it (for messages)."""

    tokens: int
    why: str
    """E.g. "rollout.vllm.max_model_len 5120 minus rollout.max_new_tokens 4096"."""
    fix: str
    """What raises it, e.g. "lower rollout.max_new_tokens or raise rollout.vllm.max_model_len"."""


def prompt_token_limit(contexts: Mapping[str, Any], tokenizer, *, max_new_tokens: int,
                       field: str) -> PromptLimit | None:
    """The longest prompt that leaves `max_new_tokens` for the response in every context the
    sequence must fit (`max_prompt_tokens` of `build_prompts`): the smallest of `contexts`, each
    named as messages should name it ("the student", "rollout.vllm.max_model_len") and given as a
    transformers config, a model name/path (its config.json is read, cheap) or an engine's
    token limit (an int; 0 = not set, ignored). None when none of them says. When max_new_tokens
    alone fills the context, a WARNING names `field` and only prompts longer than the context
    itself are dropped.

    >>> from transformers import LlamaConfig
    >>> prompt_token_limit({"the model": LlamaConfig(max_position_embeddings=256), "vllm.max_model_len": 200},
    ...                    None, max_new_tokens=48, field="max_new_tokens")  # doctest: +NORMALIZE_WHITESPACE
    PromptLimit(tokens=152, why='vllm.max_model_len 200 minus max_new_tokens 48',
                fix='lower max_new_tokens or raise vllm.max_model_len')
    """
    bounds = []
    for name, value in contexts.items():
        if isinstance(value, (str, os.PathLike)):
            from transformers import AutoConfig

            value = AutoConfig.from_pretrained(str(value))
        context = (value or None) if isinstance(value, int) else context_length(value, tokenizer)
        if context is not None:
            bounds.append((context, name))
    if not bounds:
        return None
    context, name = min(bounds, key=lambda bound: bound[0])  # the first named wins a tie
    engine_limit = isinstance(contexts[name], int)
    what = f"{name} {context}" if engine_limit else f"{name}'s context of {context} tokens"
    fix = f"lower {field}" + (f" or raise {name}" if engine_limit else "")
    if max_new_tokens >= context:
        logger.warning("%s=%d fills all of %s: responses may run past it; "
                       "only prompts longer than the context are dropped", field, max_new_tokens, what)
        return PromptLimit(context - 1, f"{what}, all of it taken by {field} {max_new_tokens}", fix)
    return PromptLimit(context - max_new_tokens, f"{what} minus {field} {max_new_tokens}", fix)


def run_prompt_limit(cfg: RunConfig, student_config, tokenizer, *, teacher: Any) -> PromptLimit | None:
    """What a training run's prompts must fit, with rollout.max_new_tokens: the student's context;
    rollout.vllm.max_model_len when set and the rollout engine may be vLLM (not "hf": the
    prompts are written once and a resume elsewhere may resolve "auto" to vLLM); and when the
    run loads a teacher (to score, or for SFT to sample), the teacher's context (`teacher`: its
    resolved path, or its transformers config; None = not known, left out) and
    teacher.vllm.max_model_len on the same terms. The memory estimate (`kdrl.memory.row_tokens`)
    uses it too, before the prompts exist."""
    contexts: dict[str, Any] = {"the student": student_config}
    if cfg.rollout.engine != "hf":
        contexts["rollout.vllm.max_model_len"] = cfg.rollout.vllm.max_model_len
    if cfg.loads_teacher:
        if teacher is not None:
            contexts["the teacher"] = teacher
        if cfg.teacher.engine != "hf":
            contexts["teacher.vllm.max_model_len"] = cfg.teacher.vllm.max_model_len
    return prompt_token_limit(contexts, tokenizer, max_new_tokens=cfg.rollout.max_new_tokens,
                              field="rollout.max_new_tokens")


def sample_prompt_ids(train_ids: list[int], *, step: int, count: int, seed: int) -> list[int]:
    """The `count` distinct prompts of optimizer step `step`: epochs of seeded shuffles, cut into
    steps with the remainder of each epoch dropped (so a step never straddles two epochs and never
    repeats a prompt). A pure function of (seed, step): any iteration can be replayed alone.

    >>> first = sample_prompt_ids([10, 11, 12, 13], step=0, count=2, seed=0)
    >>> second = sample_prompt_ids([10, 11, 12, 13], step=1, count=2, seed=0)
    >>> first != second
    True
    >>> sorted(first + second)
    [10, 11, 12, 13]
    """
    n = len(train_ids)
    if not 0 < count <= n:
        raise ValueError(f"prompts_per_step={count} must be in 1..{n} (the number of training prompts)")
    steps_per_epoch = n // count
    epoch, index = divmod(step, steps_per_epoch)
    order = list(train_ids)
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return order[index * count : (index + 1) * count]
