"""Parquet storage: every table round-trips, validation names what is wrong, writes are atomic."""

import re
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

import kdrl
from kdrl import storage
from kdrl.storage import (
    KEY,
    KEYS,
    SCHEMA_VERSION,
    SCHEMAS,
    RunPaths,
    StorageError,
    content_hash,
    read_metadata,
    read_table,
    write_table,
)


def _keys(step: int = 0) -> dict:
    return {"step": [step, step], "prompt_id": [10, 10], "sample_idx": [0, 1]}


def _frames(step: int = 0) -> dict[str, pl.DataFrame]:
    """A tiny valid frame per table, built with polars' default dtypes (Int64, Float64) so that
    write_table's casting is exercised on every table."""
    metrics = {name: [0.5] for name, dtype in storage.STEP_METRICS.items() if dtype == pl.Float64}
    return {
        "prompts": pl.DataFrame(
            {
                "prompt_id": [10, 11],
                "split": ["train", "heldout"],
                "question": ["1+1?", "2+2?"],
                "answer": ["2", "4"],
                "prompt_text": ["Q: 1+1?", "Q: 2+2?"],
                "prompt_token_ids": [[1, 2], [1, 3]],
            }
        ),
        "rollouts": pl.DataFrame(
            {
                **_keys(step),
                "prompt_token_ids": [[1, 2], [1, 2]],
                "completion_token_ids": [[5, 6, 7], [8]],
                "sampler_logprobs": [[-0.1, -0.2, -0.3], [-1.5]],
                "finish_reason": ["stop", "length"],
                "completion_text": ["a b c", "d"],
            }
        ),
        "rewards": pl.DataFrame(
            {
                **_keys(step),
                "extracted_answer": ["2", None],
                "reward": [1.0, 0.0],
                "truncated": [False, True],
            }
        ),
        "teacher_logprobs": pl.DataFrame(
            {
                **_keys(step),
                "teacher_logprobs": [[-0.05, -0.5, -0.25], [-2.0]],
                "topk_ids": [[[5, 9], [6, 1], [7, 2]], None],
                "topk_logprobs": [[[-0.05, -3.0], [-0.5, -1.0], [-0.25, -2.0]], None],
            }
        ),
        "advantages": pl.DataFrame(
            {
                **_keys(step),
                "reward": [1.0, 0.0],
                "advantage": [1.0, -1.0],
                "kd_mask": [0.0, 1.0],
                "beta": [0.1, 0.1],
                "num_tokens": [3, 1],
                "student_logprobs": [[-0.1, -0.2, -0.3], [-1.5]],
                "kd_per_token": [[0.0, 0.1, 0.0], [0.2]],
            }
        ),
        "step_metrics": pl.DataFrame(
            {"step": [step], "num_tokens": [4], "teacher_tokens": [4], **metrics}
        ),
        "evaluations": pl.DataFrame(
            {
                **_keys(step),
                "split": ["heldout", "ood"],
                "model": ["student", "teacher"],
                "temperature": [0.0, 0.0],
                "completion_text": ["2", "x"],
                "completion_len": [1, 1],
                "finish_reason": ["stop", "stop"],
                "extracted_answer": ["2", None],
                "correct": [True, False],
            }
        ),
        "eval_summary": pl.DataFrame(
            {"model": ["m", "m"], "dataset": ["d", "d"], "step": [-1, -1], "temperature": [0.6, 0.0], "samples": [4, 1],
             "num_prompts": [10, 10], "pass_at_1": [0.5, 0.6], "mean_len": [12.5, 11.0], "p90_len": [20.0, 18.0],
             "truncated_frac": [0.0, 0.1]}
        ),
        "compare_runs": pl.DataFrame(
            {"method": ["grpo", "kdrl"], "seed": [0, 0], "run_id": ["grpo-s0", "kdrl-s0"], "steps_done": [2, 1],
             "rollout_tokens": [100, 50], "teacher_tokens": [0, 50], "train_time_s": [1.5, 1.0], "wall_s": [3.0, None],
             "kd_signal_share": [None, 0.1]}
        ),
        "compare_curves": pl.DataFrame(
            {"method": ["grpo", "grpo"], "seed": [0, 0], "steps_trained": [0, 2], "temperature": [0.6, 0.6],
             "pass_at_1": [0.2, 0.4], "mean_len": [20.0, 18.5], "p90_len": [25.0, 24.0], "ood_pass_at_1": [0.1, None],
             "ood_mean_len": [30.0, None]}
        ),
        "comparison": pl.DataFrame(
            {"method": ["teacher", "grpo"], "seeds": [None, 3], "steps": [0, 60], "pass_at_1": [0.9, 0.5],
             "pass_at_1_ci95": [None, 0.05], "greedy": [0.95, 0.55], "greedy_ci95": [None, 0.04],
             "mean_len": [25.0, 26.0], "mean_len_ci95": [None, 1.0], "teacher_tokens": [None, 0.0],
             "wall_s": [None, 80.0], "ood_pass_at_1": [0.5, 0.2], "ood_pass_at_1_ci95": [None, 0.03],
             "kd_signal_share": [None, 0.0]}
        ),
        "compare_paired": pl.DataFrame(
            {"method": ["kdrl", "kdrl"], "reference": ["grpo", "grpo"], "metric": ["pass_at_1", "mean_len"],
             "seeds": [5, 5], "diff": [0.02, -1.5], "diff_ci95": [0.01, 0.5]}
        ),
    }


def test_every_table_has_a_frame_and_a_key():
    assert set(_frames()) == set(SCHEMAS) == set(KEYS)
    for table, schema in SCHEMAS.items():
        assert set(KEYS[table]) <= set(schema), table
    for table in ("rollouts", "rewards", "teacher_logprobs", "advantages", "evaluations"):
        assert [SCHEMAS[table][k] for k in KEY] == [pl.Int64, pl.Int64, pl.Int32]


@pytest.mark.parametrize("table", sorted(SCHEMAS))
def test_round_trip_every_table(tmp_path, table):
    df = _frames()[table]
    path = write_table(df, tmp_path / f"{table}.parquet", table=table)
    back = read_table(path, table=table)
    assert back.schema == SCHEMAS[table]
    # Exact equality once cast: Float64 → Float32 rounds the same way on both sides.
    assert_frame_equal(back, df.select(list(SCHEMAS[table])).cast(dict(SCHEMAS[table])))


def test_round_trip_keeps_nested_lists_and_null_topk(tmp_path):
    table = "teacher_logprobs"
    path = write_table(_frames()[table], tmp_path / "t.parquet", table=table)
    back = read_table(path, table=table)
    assert back["topk_ids"].to_list() == [[[5, 9], [6, 1], [7, 2]], None]
    assert back["topk_logprobs"].null_count() == 1
    # The whole top-k column may be null (no top-k asked for): an all-null column casts.
    no_topk = _frames()[table].with_columns(
        topk_ids=pl.lit(None), topk_logprobs=pl.lit(None)
    )
    back = read_table(write_table(no_topk, path, table=table), table=table)
    assert back["topk_ids"].dtype == pl.List(pl.List(pl.Int32))
    assert back["topk_ids"].null_count() == 2


def test_columns_written_in_schema_order(tmp_path):
    df = _frames()["rewards"]
    shuffled = df.select(list(reversed(df.columns)))
    path = write_table(shuffled, tmp_path / "r.parquet", table="rewards")
    assert pq.read_schema(path).names == ["run_id", *storage.REWARDS]


@pytest.mark.parametrize("table", storage.RUN_ID_TABLES)
def test_run_tables_carry_the_run_id_on_disk_and_read_without_it(tmp_path, table):
    """The file has `run_id` first (from the kdrl.run_id metadata; null without); read_table gives
    the schema's columns, as before; a frame that already has the column is written the same."""
    df = _frames()[table]
    path = write_table(df, tmp_path / "a.parquet", table=table, metadata={"kdrl.run_id": "grpo-s0"})
    on_disk = pl.read_parquet(path)
    assert on_disk.columns[0] == "run_id" and on_disk.schema["run_id"] == pl.String
    assert on_disk["run_id"].to_list() == ["grpo-s0"] * df.height
    assert_frame_equal(read_table(path, table=table), read_table(write_table(df, tmp_path / "b.parquet", table=table),
                                                                 table=table))
    assert pl.read_parquet(tmp_path / "b.parquet")["run_id"].null_count() == df.height
    again = write_table(on_disk, tmp_path / "c.parquet", table=table, metadata={"kdrl.run_id": "grpo-s0"})
    assert pl.read_parquet(again).equals(on_disk)


def test_metadata_is_preserved_and_readable(tmp_path):
    path = write_table(
        _frames()["rewards"], tmp_path / "r.parquet", table="rewards",
        metadata={"kdrl.config_hash": "deadbeef"},
    )
    expected = {
        "kdrl.table": "rewards",
        "kdrl.schema_version": SCHEMA_VERSION,
        "kdrl.code_version": kdrl.__version__,
        "kdrl.config_hash": "deadbeef",
    }
    assert read_metadata(path) == expected
    polars_meta = pl.read_parquet_metadata(path)
    assert {k: polars_meta[k] for k in expected} == expected
    arrow_meta = pq.read_schema(path).metadata
    assert arrow_meta[b"kdrl.config_hash"] == b"deadbeef"
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"


def test_reserved_metadata_cannot_be_overridden(tmp_path):
    with pytest.raises(StorageError, match="kdrl.table"):
        write_table(
            _frames()["rewards"], tmp_path / "r.parquet", table="rewards",
            metadata={"kdrl.table": "rollouts"},
        )


def test_int64_lists_cast_to_int32(tmp_path):
    df = _frames()["rollouts"]
    assert df.schema["completion_token_ids"] == pl.List(pl.Int64)
    back = read_table(write_table(df, tmp_path / "r.parquet", table="rollouts"), table="rollouts")
    assert back["completion_token_ids"].dtype == pl.List(pl.Int32)
    assert back["completion_token_ids"].to_list() == [[5, 6, 7], [8]]


def test_int_that_does_not_fit_int32_raises(tmp_path):
    df = _frames()["rollouts"].with_columns(completion_token_ids=pl.lit([2**40]))
    with pytest.raises(StorageError, match="completion_token_ids.*do not fit"):
        write_table(df, tmp_path / "r.parquet", table="rollouts")


def test_string_in_reward_raises_naming_file_column_and_dtypes(tmp_path):
    # "1.0" would parse under polars' strict cast; the schema check must refuse it anyway.
    df = _frames()["rewards"].with_columns(reward=pl.lit("1.0"))
    path = tmp_path / "bad.parquet"
    with pytest.raises(StorageError) as err:
        write_table(df, path, table="rewards")
    msg = str(err.value)
    assert str(path) in msg and "'reward'" in msg and "Float32" in msg and "String" in msg
    assert not path.exists()


def test_missing_and_extra_columns_are_named(tmp_path):
    df = _frames()["rewards"].drop("truncated").with_columns(oops=pl.lit(1))
    with pytest.raises(StorageError, match=r"missing: \['truncated'\], unexpected: \['oops'\]"):
        write_table(df, tmp_path / "r.parquet", table="rewards")


def test_duplicate_key_raises_naming_it(tmp_path):
    df = _frames()["rewards"].with_columns(sample_idx=pl.lit(1, dtype=pl.Int32))
    with pytest.raises(StorageError, match=r"'step': 0, 'prompt_id': 10, 'sample_idx': 1"):
        write_table(df, tmp_path / "r.parquet", table="rewards")


def test_null_key_raises(tmp_path):
    df = _frames()["rewards"].with_columns(prompt_id=pl.Series([10, None]))
    with pytest.raises(StorageError, match="'prompt_id' has 1 null"):
        write_table(df, tmp_path / "r.parquet", table="rewards")


def test_evaluations_key_includes_model_and_temperature(tmp_path):
    # Student and teacher samples share (step, prompt_id, sample_idx); that is not a duplicate.
    df = _frames()["evaluations"].with_columns(sample_idx=pl.lit(0, dtype=pl.Int32))
    write_table(df, tmp_path / "e.parquet", table="evaluations")


def _existing(tmp_path: Path) -> tuple[Path, bytes]:
    path = write_table(_frames()["rewards"], tmp_path / "r.parquet", table="rewards")
    return path, path.read_bytes()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "r.parquet")


def test_invalid_frame_leaves_existing_file_untouched(tmp_path):
    path, before = _existing(tmp_path)
    with pytest.raises(StorageError):
        write_table(_frames()["rewards"].drop("reward"), path, table="rewards")
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_writer_failing_midway_leaves_existing_file_untouched(tmp_path, monkeypatch):
    path, before = _existing(tmp_path)

    def half_write(table, where, **kwargs):
        where.write(b"PAR1 partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(storage.pq, "write_table", half_write)
    with pytest.raises(OSError, match="disk full"):
        write_table(_frames()["rewards"].with_columns(reward=pl.lit(0.0)), path, table="rewards")
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_write_creates_parent_dirs(tmp_path):
    path = write_table(_frames()["rewards"], tmp_path / "a" / "b" / "r.parquet", table="rewards")
    assert path.exists()


def test_read_of_wrong_column_names_file_and_column(tmp_path):
    path = tmp_path / "r.parquet"
    _frames()["rewards"].with_columns(reward=pl.lit("high")).write_parquet(path)
    with pytest.raises(StorageError) as err:
        read_table(path, table="rewards")
    assert str(path) in str(err.value) and "'reward'" in str(err.value)
    assert "expected Float32, found String" in str(err.value)


def test_read_checks_table_and_schema_version(tmp_path):
    path = write_table(_frames()["rewards"], tmp_path / "r.parquet", table="rewards")
    with pytest.raises(StorageError, match="holds table 'rewards', expected 'rollouts'"):
        read_table(path, table="rollouts")
    table = pq.read_table(path)
    meta = {**table.schema.metadata, b"kdrl.schema_version": b"2"}
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(StorageError, match="schema version '2'"):
        read_table(path, table="rewards")


def test_unknown_table_raises(tmp_path):
    with pytest.raises(StorageError, match="unknown table 'nope'"):
        write_table(_frames()["rewards"], tmp_path / "r.parquet", table="nope")


def test_scan_across_runs_with_recursive_glob(tmp_path):
    runs = tmp_path / "runs"
    for run, steps in (("a", [0, 1]), ("b", [0])):
        paths = RunPaths(runs / run)
        for step in steps:
            write_table(_frames(step)["rollouts"], paths.rollouts(step), table="rollouts")
            write_table(_frames(step)["step_metrics"], paths.metrics(step), table="step_metrics")
    rollouts = pl.scan_parquet(str(runs / "*" / "**" / "rollouts.parquet")).collect()
    assert rollouts.height == 3 * 2
    curve = pl.scan_parquet(str(runs / "*" / "iter_*" / "metrics.parquet")).collect()
    assert sorted(curve["step"].to_list()) == [0, 0, 1]


def test_one_glob_tells_runs_apart_by_run_id_and_reads_files_from_before_it(tmp_path):
    """The README's query: every run's curve under one glob (plain runs and compare arms, nested),
    one row per (run_id, step); a file written before schema 1.3 has no run_id column and reads
    as null with missing_columns="insert"."""
    runs = tmp_path / "runs"
    for run_dir, steps in (("kdrl-1", [0, 1]), ("compare-x/grpo-s0", [0, 1, 2])):
        paths = RunPaths(runs / run_dir)
        for step in steps:
            metrics = _frames(step)["step_metrics"].with_columns(reward_mean=pl.lit(0.1 * step))
            write_table(metrics, paths.metrics(step), table="step_metrics",
                        metadata={"kdrl.run_id": Path(run_dir).name})
    curves = (pl.scan_parquet(str(runs / "**" / "iter_*" / "metrics.parquet"))
              .select("run_id", "step", "reward_mean").collect().pivot("run_id", index="step", values="reward_mean")
              .sort("step"))
    assert curves.columns == ["step", "kdrl-1", "grpo-s0"] or curves.columns == ["step", "grpo-s0", "kdrl-1"]
    assert curves["kdrl-1"].to_list()[:2] == pytest.approx([0.0, 0.1]) and curves["kdrl-1"][2] is None
    old = RunPaths(runs / "old")
    old.iter_dir(0).mkdir(parents=True)
    pq.write_table(_frames(0)["step_metrics"].to_arrow(), old.metrics(0))  # as schema 1.2 wrote it
    mixed = pl.scan_parquet(str(runs / "**" / "iter_*" / "metrics.parquet"), missing_columns="insert").collect()
    assert mixed.height == 6 and mixed["run_id"].null_count() == 1
    prompts = write_table(_frames()["prompts"], tmp_path / "p.parquet", table="prompts")
    assert "run_id" not in pl.read_parquet(prompts).columns  # one per run folder, not a per-sample table


def test_run_paths_layout():
    paths = RunPaths("runs/x")
    root = Path("runs/x")
    assert paths.root == root
    assert paths.config == root / "config.yaml"
    assert paths.offline == root / "offline"
    assert paths.prompts == root / "offline" / "prompts.parquet"
    it = root / "iter_00012"
    assert paths.iter_dir(12) == it
    assert paths.rollouts(12) == it / "rollouts.parquet"
    assert paths.rewards(12) == it / "rewards.parquet"
    assert paths.teacher(12) == it / "teacher.parquet"
    assert paths.advantages(12) == it / "batch.parquet"
    assert paths.metrics(12) == it / "metrics.parquet"
    assert paths.evaluation(12) == it / "eval.parquet"
    assert paths.checkpoint(12) == it / "checkpoint"
    with pytest.raises(ValueError):
        paths.iter_dir(-1)


def test_content_hash_tracks_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"abc")
    b.write_bytes(b"abd")
    # sha256("abc") = ba7816bf8f01cfea414140de5dae2223...
    assert content_hash(a) == "ba7816bf8f01cfea"
    assert content_hash(b) != content_hash(a) and len(content_hash(b)) == 16


def test_written_file_respects_umask_like_a_plain_write(tmp_path):
    path = write_table(_frames()["rewards"], tmp_path / "r.parquet", table="rewards")
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def _damage(path: Path, how: str) -> None:
    """Damage a real table file as a partial copy, a stray file or a bad disk would."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"this is not a parquet file\n" * 20)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "corrupt":  # header and footer intact, the first column's pages scrambled
        path.write_bytes(data[:4] + bytes(b ^ 0x5A for b in data[4:40]) + data[40:])


@pytest.mark.parametrize(("how", "what"), [
    ("truncated", "truncated"), ("garbage", "not a Parquet file"), ("empty", "empty (0 bytes)"), ("corrupt", "corrupt"),
])
def test_a_damaged_file_is_a_storage_error_naming_it_and_the_remedy(tmp_path, how, what):
    path = write_table(_frames(3)["rewards"], RunPaths(tmp_path / "run").rewards(3), table="rewards")
    _damage(path, how)
    with pytest.raises(StorageError) as err:  # a ValueError: the CLI prints it without a traceback
        read_table(path, table="rewards")
    message = str(err.value)
    assert message.startswith(f"{path} is damaged: {what}")
    assert f"delete {path.parent}/ and rerun the same `kdrl train`" in message
    if how != "corrupt":  # a sound footer: the metadata is still readable
        with pytest.raises(StorageError, match=re.escape(f"is damaged: {what}")):
            read_metadata(path)


def test_a_damaged_file_outside_a_step_says_to_rerun_what_wrote_it(tmp_path):
    path = write_table(_frames()["prompts"], RunPaths(tmp_path / "run").prompts, table="prompts")
    _damage(path, "truncated")
    with pytest.raises(StorageError,
                       match=r"prompts\.parquet is damaged: truncated .* rerun the command that wrote it"):
        read_table(path, table="prompts")


def test_a_damaged_file_hashes_and_a_missing_one_is_not_found(tmp_path):
    path = tmp_path / "r.parquet"
    path.write_bytes(b"garbage")
    assert content_hash(path) == content_hash(path)  # inputs' cache keys never need to parse the file
    with pytest.raises(FileNotFoundError):
        read_table(tmp_path / "missing.parquet", table="rewards")


def test_is_readable_tells_a_whole_file_from_a_missing_or_truncated_one(tmp_path):
    from kdrl.storage import is_readable

    df = pl.DataFrame({"step": [0], "prompt_id": [0], "sample_idx": [0], "extracted_answer": ["1"], "reward": [1.0],
                       "truncated": [False]})
    path = write_table(df, tmp_path / "rewards.parquet", table="rewards")
    assert is_readable(path) and not is_readable(tmp_path / "missing.parquet")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert not is_readable(path)


@pytest.mark.parametrize("version", ["1", "1.1", "1.2"])
def test_step_metrics_from_before_the_added_columns_read_as_null(version, tmp_path):
    """A run made by an older kdrl stays readable: schema 1 had no response stats
    (response_len_p50 ... no_answer_frac), 1.1 no signal stats (reward_std ... kd_signal_share),
    1.2 no entropy; the missing columns are null there, every other value as written."""
    missing = [*storage.POLICY_STATS, *(storage.SIGNAL_STATS if version in ("1", "1.1") else []),
               *(storage.RESPONSE_STATS if version == "1" else [])]
    old = _frames()["step_metrics"].drop(missing)
    table = old.to_arrow().replace_schema_metadata({"kdrl.table": "step_metrics", "kdrl.schema_version": version})
    pq.write_table(table, tmp_path / "metrics.parquet")
    read = read_table(tmp_path / "metrics.parquet", table="step_metrics")
    assert read.columns == list(storage.STEP_METRICS)
    assert read.select(missing).null_count().row(0) == (1,) * len(missing)
    kept = read.drop(missing)
    assert kept.to_dicts() == old.select(kept.columns).to_dicts()
    # a column no version ever had is still refused
    pq.write_table(old.drop("loss").to_arrow().replace_schema_metadata({"kdrl.table": "step_metrics"}),
                   tmp_path / "bad.parquet")
    with pytest.raises(StorageError, match=r"missing: \['loss'\]"):
        read_table(tmp_path / "bad.parquet", table="step_metrics")
