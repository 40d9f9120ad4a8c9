"""Parquet tables: schemas as named constants, validated atomic read/write, run-dir layout.

Files are the interface between stages: each stage writes a new file with a declared schema and
none rewrites one. Per-sample tables are keyed by ``KEY = (step, prompt_id, sample_idx)``, so a
polars join on ``KEY`` answers any per-sample question across stages.

Token alignment. Every per-token column (``sampler_logprobs``, ``teacher_logprobs``,
``student_logprobs``, ``kd_per_token``, and the outer list of ``topk_ids``/``topk_logprobs``) is a
list aligned to ``completion_token_ids``: for completion ids o_0..o_{T-1}, ``x[t]`` refers to
completion token t, i.e. log π(o_t | prompt, o_<t) for the model that column belongs to. Prompt
tokens never appear in per-token columns.

A run directory (see ``RunPaths``)::

    runs/<run_id>/
      config.yaml
      offline/prompts.parquet
      iter_00000/rollouts.parquet   rewards.parquet   teacher.parquet
      iter_00000/batch.parquet      metrics.parquet   eval.parquet
      iter_00000/checkpoint/

The learning curve of every run is ``pl.scan_parquet("runs/**/iter_*/metrics.parquet")``, and
``pl.scan_parquet("runs/**/rollouts.parquet")`` gathers every rollout of every run (compare arms
and replays included), each file's rows tagged by its ``run_id`` column (`RUN_ID_TABLES`). Temp
files from in-flight writes start with "." and end in ".tmp", so these globs never see them.

Every file carries Parquet key-value metadata: ``kdrl.table``, ``kdrl.schema_version``,
``kdrl.code_version`` and whatever the caller adds (e.g. ``kdrl.config_hash``).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

import kdrl

SCHEMA_VERSION = "1.4"
KEY = ("step", "prompt_id", "sample_idx")

_KEY_SCHEMA = {"step": pl.Int64, "prompt_id": pl.Int64, "sample_idx": pl.Int32}
_TOKENS = pl.List(pl.Int32)
_LOGPROBS = pl.List(pl.Float32)

# One row per prompt of the run: its split ("train"/"heldout") and reference final answer.
PROMPTS = pl.Schema(
    {
        "prompt_id": pl.Int64,
        "split": pl.String,
        "question": pl.String,
        "answer": pl.String,
        "prompt_text": pl.String,
        "prompt_token_ids": _TOKENS,
    }
)

# One row per sampled completion; finish_reason is "stop" or "length".
ROLLOUTS = pl.Schema(
    {
        **_KEY_SCHEMA,
        "prompt_token_ids": _TOKENS,
        "completion_token_ids": _TOKENS,
        "sampler_logprobs": _LOGPROBS,
        "finish_reason": pl.String,
        "completion_text": pl.String,
    }
)

# One row per completion: the extracted answer (null if none was found) and its reward.
REWARDS = pl.Schema(
    {
        **_KEY_SCHEMA,
        "extracted_answer": pl.String,
        "reward": pl.Float32,
        "truncated": pl.Boolean,
    }
)

# One row per scored completion: teacher log-probs of the sampled tokens, plus optional
# top-k ids/log-probs per position ([t][k]; null when top-k was not asked for).
TEACHER_LOGPROBS = pl.Schema(
    {
        **_KEY_SCHEMA,
        "teacher_logprobs": _LOGPROBS,
        "topk_ids": pl.List(_TOKENS),
        "topk_logprobs": pl.List(_LOGPROBS),
    }
)

# One row per completion in the update ("batch.parquet"): the advantage and KD targets as the
# optimizer step used them; student_logprobs are the trainer's log-probs before the update and
# kd_per_token the KL estimator's value at each completion token.
ADVANTAGES = pl.Schema(
    {
        **_KEY_SCHEMA,
        "reward": pl.Float32,
        "advantage": pl.Float32,
        "kd_mask": pl.Float32,
        "beta": pl.Float32,
        "num_tokens": pl.Int32,
        "student_logprobs": _LOGPROBS,
        "kd_per_token": _LOGPROBS,
    }
)

_METRIC_FLOATS = (
    "loss pg_loss kd_loss nll_loss beta lr grad_norm reward_mean kl_k1_mean response_len_mean"
    " clip_frac kd_token_frac"
).split()
# Response lengths of the step's rollouts (tokens) beyond the mean, the fraction cut at
# rollout.max_new_tokens (finish_reason "length": reward 0) and the fraction with no answer found
# (e.g. a think block that never closed). Added in schema 1.1: older files read them as null.
RESPONSE_STATS = "response_len_p50 response_len_p90 response_len_max truncated_frac no_answer_frac".split()
# How much learning signal the step had (schema 1.2; older files read them as null): the std of
# the rewards over all responses, the fraction of prompt groups whose responses all got the same
# reward (advantage 0: no GRPO signal from them), and the KD signal share ‖β·KD‖/‖GRPO‖ of the
# per-token gradient coefficients (`kdrl.losses.signal_norms_sq`; NaN for top-k KD).
SIGNAL_STATS = "reward_std zero_std_group_frac kd_signal_share".split()
# The policy's mean entropy (nats, at the sampling temperature) over the step's response positions,
# before the update; the update's model FLOPs (6·N per trained token, `kdrl.perf`) and its MFU
# against the device's dense bf16 peak (NaN where none is known: CPUs) (schema 1.3).
POLICY_STATS = ["entropy", "model_flops", "mfu"]
_STAGE_SECONDS = "time_generate_s time_reward_s time_teacher_s time_update_s time_sync_s time_total_s".split()
# Train/inference mismatch (NaN where not measured): rollout_* = |log π_trainer − log π_sampler| over
# the step's rollout tokens before the update (on-policy runs); sync_* = the same for a sample of
# them scored by the vLLM rollout engine right after the weight sync (rollout.sync_check_every).
LOGP_GAPS = "rollout_logp_gap_mean rollout_logp_gap_max sync_logp_gap_max sync_logp_gap_mean".split()

# One row per optimizer step: losses, KL, lengths, token counts, per-stage seconds (time_sync_s:
# pushing the weights into a vLLM rollout engine) and log-prob gaps.
STEP_METRICS = pl.Schema(
    {
        "step": pl.Int64,
        **{name: pl.Float64 for name in _METRIC_FLOATS},
        "num_tokens": pl.Int64,
        "teacher_tokens": pl.Int64,
        **{name: pl.Float64 for name in _STAGE_SECONDS},
        "tokens_per_s": pl.Float64,
        **{name: pl.Float64 for name in LOGP_GAPS},
        **{name: pl.Float64 for name in RESPONSE_STATS},
        **{name: pl.Float64 for name in SIGNAL_STATS},
        **{name: pl.Float64 for name in POLICY_STATS},
    }
)

# One row per evaluation sample: model ("student"/"teacher") at a temperature (0 = greedy);
# extracted_answer is null when none was found. split is the prompt's ("heldout", or "ood": a task
# family's out-of-domain problems) (schema 1.4; older files read it as null, meaning "heldout").
EVALUATIONS = pl.Schema(
    {
        **_KEY_SCHEMA,
        "split": pl.String,
        "model": pl.String,
        "temperature": pl.Float32,
        "completion_text": pl.String,
        "completion_len": pl.Int32,
        "finish_reason": pl.String,
        "extracted_answer": pl.String,
        "correct": pl.Boolean,
    }
)

# ``kdrl eval``: one row per decoding (the k samples at a temperature; greedy has temperature 0).
# step is the evaluated checkpoint's training step (-1 when not from a kdrl run).
EVAL_SUMMARY = pl.Schema(
    {
        "model": pl.String,
        "dataset": pl.String,
        "step": pl.Int64,
        "temperature": pl.Float32,
        "samples": pl.Int64,
        "num_prompts": pl.Int64,
        "pass_at_1": pl.Float64,
        "mean_len": pl.Float64,
        "p90_len": pl.Float64,
        "truncated_frac": pl.Float64,
    }
)

# ``kdrl compare``: one row per (method, seed) run, read from its directory. wall_s is the time
# the compare driver measured around the run (null when it was complete before this compare).
COMPARE_RUNS = pl.Schema(
    {
        "method": pl.String,
        "seed": pl.Int64,
        "run_id": pl.String,
        "steps_done": pl.Int64,
        "rollout_tokens": pl.Int64,
        "teacher_tokens": pl.Int64,
        "train_time_s": pl.Float64,
        "wall_s": pl.Float64,
        "kd_signal_share": pl.Float64,
    }
)

# ``kdrl compare``: held-out summary of every evaluation of every run. steps_trained = step + 1
# (0 is the baseline before training); temperature 0 rows are greedy; ood_* are the same over a task
# family's out-of-domain prompts (null without them).
COMPARE_CURVES = pl.Schema(
    {
        "method": pl.String,
        "seed": pl.Int64,
        "steps_trained": pl.Int64,
        "temperature": pl.Float32,
        "pass_at_1": pl.Float64,
        "mean_len": pl.Float64,
        "p90_len": pl.Float64,
        "ood_pass_at_1": pl.Float64,
        "ood_mean_len": pl.Float64,
    }
)

# ``kdrl compare``: one row per method at the end of training; *_ci95 are half-widths of a
# Student-t 95% interval over seeds (null with one seed). Per-run quantities are means over seeds.
COMPARISON = pl.Schema(
    {
        "method": pl.String,
        "seeds": pl.Int64,
        "steps": pl.Int64,
        "pass_at_1": pl.Float64,
        "pass_at_1_ci95": pl.Float64,
        "greedy": pl.Float64,
        "greedy_ci95": pl.Float64,
        "mean_len": pl.Float64,
        "mean_len_ci95": pl.Float64,
        "teacher_tokens": pl.Float64,
        "wall_s": pl.Float64,
        "ood_pass_at_1": pl.Float64,
        "ood_pass_at_1_ci95": pl.Float64,
        "kd_signal_share": pl.Float64,
    }
)

# ``kdrl compare``: each arm against a reference arm (GRPO, KD-RKL, KDRL), paired by seed (same prompts,
# same sampling seeds): the mean over seeds of (arm − reference) at the end of training, with the
# half-width of its Student-t 95% interval (null with one seed).
COMPARE_PAIRED = pl.Schema(
    {
        "method": pl.String,
        "reference": pl.String,
        "metric": pl.String,
        "seeds": pl.Int64,
        "diff": pl.Float64,
        "diff_ci95": pl.Float64,
    }
)

SCHEMAS: dict[str, pl.Schema] = {
    "prompts": PROMPTS,
    "rollouts": ROLLOUTS,
    "rewards": REWARDS,
    "teacher_logprobs": TEACHER_LOGPROBS,
    "advantages": ADVANTAGES,
    "step_metrics": STEP_METRICS,
    "evaluations": EVALUATIONS,
    "eval_summary": EVAL_SUMMARY,
    "compare_runs": COMPARE_RUNS,
    "compare_curves": COMPARE_CURVES,
    "comparison": COMPARISON,
    "compare_paired": COMPARE_PAIRED,
}

# Columns added to a table after its first release (minor schema versions): a file written
# before them is read with the column null, so runs made by an older kdrl stay readable.
ADDED_COLUMNS: dict[str, tuple[str, ...]] = {"step_metrics": (*RESPONSE_STATS, *SIGNAL_STATS, *POLICY_STATS),
                                             "evaluations": ("split",), "compare_runs": ("kd_signal_share",),
                                             "compare_curves": ("ood_pass_at_1", "ood_mean_len"),
                                             "comparison": ("ood_pass_at_1", "ood_pass_at_1_ci95", "kd_signal_share")}

# Tables whose files carry the run's id as their first column, `run_id` (the writer's
# ``kdrl.run_id`` metadata; null where none, e.g. `kdrl eval` outside a run), so one glob over many
# runs tells them apart. It is a column of the file, not of the schema: `write_table` adds it and
# `read_table` drops it, since the code that reads a table knows its run from the path. Files
# written before schema 1.3 lack it (``pl.scan_parquet(..., missing_columns="insert")`` reads
# both as null).
RUN_ID = "run_id"
RUN_ID_TABLES = ("rollouts", "rewards", "teacher_logprobs", "advantages", "step_metrics", "evaluations")

# Columns that must be non-null and unique together. Evaluations hold student and teacher
# samples (at several temperatures) for the same KEY, so those columns join the key there.
KEYS: dict[str, tuple[str, ...]] = {
    "prompts": ("prompt_id",),
    "rollouts": KEY,
    "rewards": KEY,
    "teacher_logprobs": KEY,
    "advantages": KEY,
    "step_metrics": ("step",),
    "evaluations": (*KEY, "model", "temperature"),
    "eval_summary": ("model", "dataset", "temperature"),
    "compare_runs": ("method", "seed"),
    "compare_curves": ("method", "seed", "steps_trained", "temperature"),
    "comparison": ("method",),
    "compare_paired": ("method", "reference", "metric"),
}

_RESERVED_METADATA = ("kdrl.table", "kdrl.schema_version", "kdrl.code_version")


class StorageError(ValueError):
    """A table does not match its declared schema, key or metadata, or is not readable Parquet."""


class StorageWriteError(OSError):
    """A file could not be written (a full disk, a quota, permissions). Its temp file is gone and
    whatever was at its path before is as it was; the message says where and how much is free."""


def describe_write_failure(path: Path, err: BaseException) -> str:
    """`<path> not written: no space left under <dir> (N MiB free): <cause>. ...what to do`."""
    import errno
    import shutil

    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < 64 * 2**20)
    where = f"no space left under {path.parent}" if full else f"could not write under {path.parent}"
    room = "" if free is None else f" ({free / 2**20:.1f} MiB free)"
    cause = str(err).splitlines()[0] if str(err) else ""
    return (f"{path} not written: {where}{room}: {type(err).__name__}: {cause}. Nothing partial was left and earlier "
            "files and checkpoints are intact; free some space (or point run.runs_dir elsewhere) and rerun the same "
            "command to resume after the last checkpoint.")


# What polars raises on a file that is not (all) Parquet; PanicException is a BaseException.
_UNREADABLE = (pl.exceptions.PolarsError, pl.exceptions.PanicException)


def _damaged(path: Path, err: BaseException) -> StorageError:
    """The error for a file polars cannot read: which file, what is wrong with it, what to do.

    Files are written atomically (a temp file renamed into place), so a damaged one was damaged
    afterwards: a copy or sync cut short, a full disk, a crash of the machine, an edit.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(size - 4, 0))
            tail = f.read(4)
    except OSError:
        size, head, tail = -1, b"", b""
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if size < 0:
        what = f"unreadable ({detail})"
    elif size == 0:
        what = "empty (0 bytes)"
    elif head != b"PAR1":
        what = f"not a Parquet file ({size} bytes, no PAR1 header)"
    elif tail != b"PAR1":
        what = f"truncated ({size} bytes, the Parquet footer is missing)"
    else:
        what = f"corrupt ({detail})"
    step_dir = next((p for p in path.parents if p.name.startswith("iter_")), None)
    if step_dir is not None:
        todo = (f"delete {step_dir}/ and rerun the same `kdrl train` to recompute it, if no later step has a "
                "checkpoint (a resumed run recomputes every step after its latest checkpoint); otherwise restore "
                "it from a copy")
    else:
        todo = ("delete it and rerun the command that wrote it (`kdrl train` rewrites a run's offline/ files, "
                "`kdrl eval` its output folder), or restore it from a copy")
    return StorageError(f"{path} is damaged: {what}; kdrl writes whole files only, so something cut or changed "
                        f"it afterwards (a partial copy, a full disk). To fix: {todo}")


def write_table(
    df: pl.DataFrame,
    path: str | os.PathLike,
    *,
    table: str,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Validate ``df`` against ``SCHEMAS[table]`` and write it atomically as zstd Parquet.

    Compatible dtypes are cast (List(Int64)→List(Int32) when values fit, Float64→Float32, an
    all-null column to anything); anything else raises ``StorageError``. On failure the temp file
    is removed and an existing file at ``path`` is left as it was.

    >>> import tempfile
    >>> df = pl.DataFrame({"step": [0, 0], "prompt_id": [7, 7], "sample_idx": [0, 1],
    ...                    "extracted_answer": ["42", None], "reward": [1.0, 0.0],
    ...                    "truncated": [False, True]})
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = write_table(df, Path(d) / "iter_00000/rewards.parquet", table="rewards",
    ...                     metadata={"kdrl.config_hash": "abc123"})
    ...     (p.name, read_metadata(p)["kdrl.table"], read_table(p, table="rewards")["reward"].dtype)
    ('rewards.parquet', 'rewards', Float32)
    """
    path = Path(path)
    df = _conform(df.drop(RUN_ID, strict=False) if table in RUN_ID_TABLES else df, _schema(table), path=path)
    _check_key(df, KEYS[table], path=path)
    if table in RUN_ID_TABLES:
        df = df.select(pl.lit((metadata or {}).get("kdrl.run_id"), pl.String).alias(RUN_ID), pl.all())
    arrow = df.to_arrow()
    meta = _file_metadata(table, metadata, path=path)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), **meta})
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are mode 0600, which os.replace would carry to `path`.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb") as f:
            pq.write_table(arrow, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a quota: say so, in one line
        tmp.unlink(missing_ok=True)
        raise StorageWriteError(describe_write_failure(path, err)) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_table(path: str | os.PathLike, *, table: str) -> pl.DataFrame:
    """Read a Parquet file and validate it against ``SCHEMAS[table]`` and its kdrl metadata.

    >>> import tempfile
    >>> df = pl.DataFrame({"step": [3], "prompt_id": [1], "sample_idx": [0],
    ...                    "extracted_answer": [None], "reward": [0.0], "truncated": [True]})
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = write_table(df, Path(d) / "rewards.parquet", table="rewards")
    ...     read_table(p, table="rewards").row(0)
    (3, 1, 0, None, 0.0, True)
    """
    path = Path(path)
    schema = _schema(table)
    meta = read_metadata(path)  # a damaged file is reported here, before any check of ours
    found_table = meta.get("kdrl.table")
    if found_table is not None and found_table != table:
        raise StorageError(f"{path}: holds table {found_table!r}, expected {table!r}")
    version = meta.get("kdrl.schema_version")
    if version is not None and version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise StorageError(
            f"{path}: schema version {version!r} is incompatible with {SCHEMA_VERSION!r}"
        )
    try:
        df = pl.read_parquet(path)
    except _UNREADABLE as err:  # a sound footer over damaged pages
        raise _damaged(path, err) from err
    if table in RUN_ID_TABLES:
        df = df.drop(RUN_ID, strict=False)
    added = [c for c in ADDED_COLUMNS.get(table, ()) if c not in df.columns]
    if added:  # a file from before these columns existed (same major version): they read as null
        df = df.with_columns(pl.lit(None, schema[c]).alias(c) for c in added)
    return _conform(df, schema, path=path)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Return a Parquet file's key-value metadata (without pyarrow's ``ARROW:schema`` blob).

    >>> import tempfile
    >>> df = pl.DataFrame({"step": [0], "prompt_id": [0], "sample_idx": [0],
    ...                    "extracted_answer": ["1"], "reward": [1.0], "truncated": [False]})
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = write_table(df, Path(d) / "r.parquet", table="rewards", metadata={"kdrl.seed": "1"})
    ...     m = read_metadata(p)
    >>> (m["kdrl.table"], m["kdrl.schema_version"], m["kdrl.seed"])
    ('rewards', '1.4', '1')
    """
    path = Path(path)
    try:
        meta = pl.read_parquet_metadata(path)
    except _UNREADABLE as err:
        raise _damaged(path, err) from err
    return {k: v for k, v in meta.items() if k != "ARROW:schema"}


def is_readable(path: str | os.PathLike) -> bool:
    """Whether ``path`` exists and its Parquet footer reads (what a truncation destroys; damage
    inside the pages is reported by `read_table`)."""
    try:
        read_metadata(path)
    except (FileNotFoundError, StorageError):
        return False
    return True


def content_hash(path: str | os.PathLike) -> str:
    """First 16 hex chars of the sha256 of a file's bytes; a cache key for stage inputs.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = Path(d) / "x.bin"
    ...     _ = p.write_bytes(b"abc")
    ...     content_hash(p)
    'ba7816bf8f01cfea'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class RunPaths:
    """Where each file of a run lives; ``root`` is ``runs/<run_id>``.

    >>> paths = RunPaths(Path("runs/demo"))
    >>> paths.prompts.as_posix(), paths.advantages(3).as_posix()
    ('runs/demo/offline/prompts.parquet', 'runs/demo/iter_00003/batch.parquet')
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def offline(self) -> Path:
        return self.root / "offline"

    @property
    def prompts(self) -> Path:
        return self.offline / "prompts.parquet"

    def iter_dir(self, step: int) -> Path:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.root / f"iter_{step:05d}"

    def rollouts(self, step: int) -> Path:
        return self.iter_dir(step) / "rollouts.parquet"

    def rewards(self, step: int) -> Path:
        return self.iter_dir(step) / "rewards.parquet"

    def teacher(self, step: int) -> Path:
        return self.iter_dir(step) / "teacher.parquet"

    def advantages(self, step: int) -> Path:
        return self.iter_dir(step) / "batch.parquet"

    def metrics(self, step: int) -> Path:
        return self.iter_dir(step) / "metrics.parquet"

    def evaluation(self, step: int) -> Path:
        return self.iter_dir(step) / "eval.parquet"

    def checkpoint(self, step: int) -> Path:
        return self.iter_dir(step) / "checkpoint"


def _schema(table: str) -> pl.Schema:
    if table not in SCHEMAS:
        raise StorageError(f"unknown table {table!r}; known: {sorted(SCHEMAS)}")
    return SCHEMAS[table]


def _conform(df: pl.DataFrame, schema: pl.Schema, *, path: Path) -> pl.DataFrame:
    """Check names and dtypes, cast compatible dtypes, and put columns in schema order."""
    missing = [c for c in schema if c not in df.columns]
    unexpected = [c for c in df.columns if c not in schema]
    if missing or unexpected:
        raise StorageError(
            f"{path}: columns do not match the schema; missing: {missing}, unexpected: {unexpected}"
        )
    for name, expected in schema.items():
        found = df.schema[name]
        if not _castable(found, expected):
            raise StorageError(f"{path}: column {name!r} expected {expected}, found {found}")
        if found != expected:
            try:
                df = df.with_columns(pl.col(name).cast(expected, strict=True))
            except pl.exceptions.PolarsError as e:
                raise StorageError(
                    f"{path}: column {name!r} expected {expected}, found {found} "
                    f"with values that do not fit"
                ) from e
    return df.select(list(schema))


def _castable(found: pl.DataType, expected: pl.DataType) -> bool:
    """Whether ``found`` may be cast to ``expected``: same numeric family, lists elementwise.

    Stricter than polars' strict cast, which would happily parse the string "1.5" as a float.
    """
    if found == expected or found == pl.Null:
        return True
    if isinstance(found, pl.List) and isinstance(expected, pl.List):
        return _castable(found.inner, expected.inner)
    if expected.is_integer():
        return found.is_integer()
    if expected.is_float():
        return found.is_float() or found.is_integer()
    return False


def _check_key(df: pl.DataFrame, key: tuple[str, ...], *, path: Path) -> None:
    for name in key:
        nulls = df[name].null_count()
        if nulls:
            raise StorageError(f"{path}: key column {name!r} has {nulls} null value(s)")
    duplicated = df.select(key).filter(df.select(key).is_duplicated())
    if duplicated.height:
        first = dict(zip(key, duplicated.row(0)))
        raise StorageError(
            f"{path}: key {key} is not unique; first duplicated key {first} "
            f"({duplicated.height} rows share a duplicated key)"
        )


def _file_metadata(table: str, metadata: dict[str, str] | None, *, path: Path) -> dict[str, str]:
    metadata = dict(metadata or {})
    clash = sorted(set(metadata) & set(_RESERVED_METADATA))
    if clash:
        raise StorageError(f"{path}: metadata keys {clash} are set by write_table itself")
    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise StorageError(f"{path}: metadata keys and values must be str; offending keys {bad}")
    return {
        "kdrl.table": table,
        "kdrl.schema_version": SCHEMA_VERSION,
        "kdrl.code_version": kdrl.__version__,
        **metadata,
    }
