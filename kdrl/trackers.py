"""Experiment trackers (`run.report_to`): TensorBoard, MLflow, W&B and trackio, as a view of the
run's Parquet files.

The Parquet files stay the record. After each step the flow calls `Trackers.publish(step)`;
a background thread then sends every step's metrics row that a tracker has not received yet,
under the namespaced names verl and TRL users know (`ALIASES`), plus the held-out evaluation
where one was made. What each tracker has received is written to ``<run>/trackers.json``, so a
resumed run, or one whose tracker was down, catches up from the files; no step is sent twice.

A tracker that fails (a server down, a full disk) warns and is retried at the next step: it never
stops training and never costs a Parquet row. A tracker whose package is missing stops the run
before it starts (`open_trackers`): the user asked for curves.

Step numbers: a tracker's step is the number of optimizer updates done (kdrl step s → s + 1), so
the evaluation before training is at 0, as in verl and TRL.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import polars as pl

from kdrl.storage import RunPaths, read_table

Log = Callable[[str], None]

TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")
"""The values `run.report_to` accepts."""

EXTRAS = {"tensorboard": ("tensorboard", "torch.utils.tensorboard"), "mlflow": ("mlflow", "mlflow"),
          "wandb": ("wandb", "wandb"), "trackio": ("trackio", "trackio")}
"""tracker → (the pip extra `kdrl[...]` that installs it, the module it imports)."""

# Flat Parquet column → the name trackers get: verl's namespaces (actor/, critic/, response_length/,
# timing_s/, perf/) and TRL's names where verl has none. docs/observability.md has the table.
ALIASES = {
    "loss": "actor/loss",
    "pg_loss": "actor/pg_loss",
    "kd_loss": "actor/kd_loss",
    "nll_loss": "actor/nll_loss",
    "grad_norm": "actor/grad_norm",
    "lr": "actor/lr",
    "clip_frac": "actor/pg_clipfrac",
    "entropy": "actor/entropy",
    "beta": "kd/beta",
    "kl_k1_mean": "kd/reverse_kl_k1",
    "kd_token_frac": "kd/token_frac",
    "kd_signal_share": "kd/signal_share",
    "teacher_tokens": "kd/teacher_tokens",
    "reward_mean": "critic/rewards/mean",
    "reward_std": "critic/rewards/std",
    "zero_std_group_frac": "critic/frac_reward_zero_std",
    "response_len_mean": "response_length/mean",
    "response_len_p50": "response_length/p50",
    "response_len_p90": "response_length/p90",
    "response_len_max": "response_length/max",
    "truncated_frac": "response_length/clip_ratio",
    "no_answer_frac": "response/no_answer_frac",
    "num_tokens": "perf/total_num_tokens",
    "tokens_per_s": "perf/tokens_per_s",
    "model_flops": "perf/total_model_flops",
    "mfu": "perf/mfu",
    "time_generate_s": "timing_s/gen",
    "time_reward_s": "timing_s/reward",
    "time_teacher_s": "timing_s/teacher",
    "time_update_s": "timing_s/update_actor",
    "time_sync_s": "timing_s/sync_weights",
    "time_total_s": "timing_s/step",
    "rollout_logp_gap_mean": "rollout/logp_gap_mean",
    "rollout_logp_gap_max": "rollout/logp_gap_max",
    "sync_logp_gap_mean": "rollout/sync_logp_gap_mean",
    "sync_logp_gap_max": "rollout/sync_logp_gap_max",
}

WARN_EVERY = 20
"""A tracker failing step after step warns at its first failure and then every this many."""


def tracker_metrics(row: dict[str, Any], *, devices: int = 1) -> dict[str, float]:
    """A STEP_METRICS row under the trackers' names, with `perf/throughput` (response tokens per
    second per device: verl's definition, which also counts prompt tokens). NaN values (a gap
    not measured) are left out.

    >>> m = tracker_metrics({"step": 3, "pg_loss": 0.5, "num_tokens": 100, "time_total_s": 2.0,
    ...                      "rollout_logp_gap_max": float("nan")}, devices=2)
    >>> m["actor/pg_loss"], m["perf/throughput"], "rollout/logp_gap_max" in m
    (0.5, 25.0, False)
    """
    out = {ALIASES[k]: float(v) for k, v in row.items()
           if k in ALIASES and v is not None and not math.isnan(float(v))}
    if row.get("time_total_s"):
        out["perf/throughput"] = row["num_tokens"] / (row["time_total_s"] * devices)
    return out


def heldout_metrics(evaluations: pl.DataFrame) -> dict[str, float]:
    """`val/pass_at_1` and `val/mean_len` of the student (lowest temperature evaluated), and
    `val/teacher_pass_at_1` where the file evaluated the teacher too (the baseline does); the
    same as `val/ood_*` over a task family's out-of-domain prompts, where it has them."""
    from kdrl.runs import summarize_evaluation

    out: dict[str, float] = {}
    for split, infix in (("heldout", ""), ("ood", "ood_")):
        summary = summarize_evaluation(evaluations, split=split).sort("temperature")
        for model, prefix in (("student", "val/"), ("teacher", "val/teacher_")):
            rows = summary.filter(pl.col("model") == model)
            if len(rows):
                out[prefix + infix + "pass_at_1"] = float(rows["pass_at_1"][0])
                out[prefix + infix + "mean_len"] = float(rows["mean_len"][0])
    return out


def flat_config(cfg: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"optim.lr": "1e-06", ...}``: a nested config as the flat string parameters trackers show.

    >>> flat_config({"optim": {"lr": 1e-6, "betas": [0.9, 0.99]}, "run": {"report_to": []}})
    {'optim.lr': '1e-06', 'optim.betas': '[0.9, 0.99]', 'run.report_to': '[]'}
    """
    out: dict[str, str] = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, type(None), bool)) else str(value)
    return out


class Tracker(Protocol):
    """What `Trackers` asks of one tracker. `start` opens (or resumes, from `state`, which it may
    update and which is saved in trackers.json) the tracker's run; every other call logs into it;
    any may raise (the caller warns and retries)."""

    name: str

    def start(self, state: dict[str, Any]) -> None: ...
    def log(self, values: dict[str, float], step: int) -> None: ...
    def log_text(self, name: str, markdown: str, step: int) -> None: ...
    def log_figure(self, name: str, figure: Any, step: int) -> None: ...
    def log_png(self, name: str, png: Path, step: int) -> None: ...
    def flush(self) -> None: ...
    def close(self, complete: bool) -> None: ...


class TensorBoardTracker:
    """Event files in ``<run>/tensorboard`` (`tensorboard --logdir runs` shows every run)."""

    name = "tensorboard"

    def __init__(self, paths: RunPaths, config_yaml: str, config: dict[str, Any]) -> None:
        self.logdir, self.config_yaml = paths.root / "tensorboard", config_yaml
        self.writer = None

    def start(self, state: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.logdir))
        if not state.get("config_sent"):
            self.writer.add_text("config", "```yaml\n" + self.config_yaml + "\n```", global_step=0)
            state["config_sent"] = True

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_text(self, name: str, markdown: str, step: int) -> None:
        self.writer.add_text(name, markdown, global_step=step)

    def log_figure(self, name: str, figure, step: int) -> None:
        self.writer.add_figure(name, figure, global_step=step, close=False)

    def log_png(self, name: str, png: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        self.writer.add_image(name, np.asarray(Image.open(png).convert("RGB")), global_step=step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self, complete: bool) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflowTracker:
    """One MLflow run per kdrl run (named after it, tagged with its folder) in experiment
    `run.tracker_project`, at `run.mlflow_tracking_uri`, else $MLFLOW_TRACKING_URI, else
    ``sqlite:///<runs_dir>/mlflow.db``. A resumed kdrl run continues the same MLflow run."""

    name = "mlflow"

    def __init__(self, paths: RunPaths, config_yaml: str, config: dict[str, Any], *, uri: str, experiment: str) -> None:
        self.paths, self.config_yaml, self.config = paths, config_yaml, config
        self.uri, self.experiment = uri, experiment
        self.client = None
        self.run_id: str | None = None

    def start(self, state: dict[str, Any]) -> None:
        # MLflow retries an unreachable server for minutes by default; a step's worth of waiting is enough
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunStatus

        self.client = client = MlflowClient(tracking_uri=self.uri)
        if state.get("run_id") and state.get("uri") == self.uri:
            self.run_id = state["run_id"]
            client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return
        found = client.get_experiment_by_name(self.experiment)
        # the experiment kind makes MLflow 3's UI open its runs as model training, not GenAI evaluations
        experiment_id = found.experiment_id if found else client.create_experiment(
            self.experiment, artifact_location=local_artifact_location(self.uri),
            tags={"mlflow.experimentKind": "custom_model_development"})
        name = self.paths.root.name
        run = client.create_run(experiment_id, run_name=name,
                                tags={"kdrl.run_dir": str(self.paths.root.resolve()), "kdrl.run_id": name})
        self.run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in flat_config(self.config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(self.run_id, params=params[i:i + 100])
        client.log_text(self.run_id, self.config_yaml, "config.yaml")
        state.update(run_id=self.run_id, uri=self.uri, experiment=self.experiment)

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_text(self, name: str, markdown: str, step: int) -> None:
        self.client.log_text(self.run_id, markdown, f"{name}.md")

    def log_figure(self, name: str, figure, step: int) -> None:
        self.client.log_figure(self.run_id, figure, f"{name}.png")

    def log_png(self, name: str, png: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(png))

    def flush(self) -> None:
        pass

    def close(self, complete: bool) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, status="FINISHED" if complete else "KILLED")


class WandbTracker:
    """One W&B run per kdrl run (named after it; its id kept in trackers.json, so a resumed kdrl
    run resumes it) in project `run.tracker_project`, its files under ``<run>/wandb``. W&B's own
    settings apply: `WANDB_MODE=offline` writes there only (`wandb sync <run>/wandb/offline-run-*`
    uploads later), `WANDB_API_KEY` / `wandb login` for online."""

    name = "wandb"

    def __init__(self, paths: RunPaths, config_yaml: str, config: dict[str, Any], *, project: str) -> None:
        self.paths, self.config, self.project = paths, config, project
        self.run = None

    def start(self, state: dict[str, Any]) -> None:
        import wandb

        run_id = state.get("run_id") or uuid.uuid4().hex[:12]  # W&B ids: lowercase letters and digits
        self.run = wandb.init(project=self.project, name=self.paths.root.name, id=run_id, resume="allow",
                              dir=str(self.paths.root), config=self.config, reinit="create_new",
                              settings=wandb.Settings(console="off", save_code=False, x_disable_stats=True))
        state.update(run_id=run_id, project=self.project)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_text(self, name: str, markdown: str, step: int) -> None:
        self.run.summary[name] = markdown

    def log_figure(self, name: str, figure, step: int) -> None:
        import wandb

        self.run.log({name: wandb.Image(figure)}, step=step)

    def log_png(self, name: str, png: Path, step: int) -> None:
        import wandb

        self.run.log({name: wandb.Image(str(png))}, step=step)

    def flush(self) -> None:
        pass

    def close(self, complete: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if complete else 1)


class TrackioTracker:
    """One trackio run per kdrl run (named after it; a resumed kdrl run resumes it) in project
    `run.tracker_project`, in trackio's local store ($TRACKIO_DIR, else its cache folder:
    `trackio show` opens the dashboard), or a Space where trackio is configured for one."""

    name = "trackio"

    def __init__(self, paths: RunPaths, config_yaml: str, config: dict[str, Any], *, project: str) -> None:
        self.paths, self.config, self.project = paths, config, project
        self.run = None

    def start(self, state: dict[str, Any]) -> None:
        import trackio

        self.run = trackio.init(project=self.project, name=self.paths.root.name, config=self.config,
                                resume="allow", auto_log_cpu=False, auto_log_gpu=False)
        state.update(project=self.project, name=self.paths.root.name)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_text(self, name: str, markdown: str, step: int) -> None:
        import trackio

        self.run.log({name: trackio.Markdown(markdown)}, step=step)

    def log_figure(self, name: str, figure, step: int) -> None:
        import io

        import trackio
        from PIL import Image

        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=80)
        buffer.seek(0)
        self.run.log({name: trackio.Image(Image.open(buffer))}, step=step)

    def log_png(self, name: str, png: Path, step: int) -> None:
        import trackio

        self.run.log({name: trackio.Image(str(png))}, step=step)

    def flush(self) -> None:
        pass

    def close(self, complete: bool) -> None:
        if self.run is not None:
            self.run.finish()


def local_artifact_location(uri: str) -> str | None:
    """Where a local SQLite store's experiment keeps its artifacts: `mlflow-artifacts/` beside the
    database (MLflow's default, ./mlruns, is relative to the process's working directory: a
    checkout). None for a server, which decides itself.

    >>> local_artifact_location("sqlite:////data/runs/mlflow.db"), local_artifact_location("http://h:5000")
    ('file:///data/runs/mlflow-artifacts', None)
    """
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlflow-artifacts").absolute().as_uri()


def mlflow_uri(cfg) -> str:
    """Where MLflow runs go: `run.mlflow_tracking_uri`, $MLFLOW_TRACKING_URI, or a SQLite store
    beside the runs (MLflow 3's file store refuses new runs)."""
    return (cfg.run.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{(Path(cfg.run.runs_dir) / 'mlflow.db').resolve()}")


def build_trackers(cfg, paths: RunPaths, config_yaml: str, config: dict[str, Any]) -> list[Tracker]:
    """The tracker objects of `cfg.run.report_to` for the folder `paths` (not started)."""
    project = cfg.run.tracker_project
    made = {"tensorboard": lambda: TensorBoardTracker(paths, config_yaml, config),
            "mlflow": lambda: MLflowTracker(paths, config_yaml, config, uri=mlflow_uri(cfg), experiment=project),
            "wandb": lambda: WandbTracker(paths, config_yaml, config, project=project),
            "trackio": lambda: TrackioTracker(paths, config_yaml, config, project=project)}
    return [made[name]() for name in cfg.run.report_to]


def report_comparison(cfg, root: str | Path, *, log: Log = print) -> None:
    """`kdrl compare`'s table (comparison.md) and plot (comparison.png) as one tracker run named
    after the comparison folder, beside its arms' runs; `cfg` is an arm's config (where to report).
    Sent again only when the table changed (`<folder>/trackers.json`); a failure warns."""
    import hashlib

    import yaml

    root = Path(root)
    if not cfg.run.report_to:
        return
    markdown = (root / "comparison.md").read_text()
    png = root / "comparison.png"
    digest = hashlib.sha256(markdown.encode() + (png.read_bytes() if png.exists() else b"")).hexdigest()[:16]
    state_file = root / "trackers.json"
    states: dict[str, dict[str, Any]] = json.loads(state_file.read_text()) if state_file.exists() else {}
    plan_yaml = (root / "compare.yaml").read_text() if (root / "compare.yaml").exists() else ""
    for tracker in build_trackers(cfg, RunPaths(root), plan_yaml, yaml.safe_load(plan_yaml) or {}):
        state = states.setdefault(tracker.name, {})
        if state.get("sent") == digest:
            continue
        try:
            tracker.start(state)
            tracker.log_text("comparison", markdown, 0)
            if png.exists():
                tracker.log_png("comparison", png, 0)
            tracker.close(True)
            state["sent"] = digest
        except Exception as err:  # noqa: BLE001 (a tracker must not fail the comparison)
            log(f"[kdrl] tracker {tracker.name}: the comparison was not sent ({type(err).__name__}: "
                f"{str(err)[:300]}); comparison.md and comparison.png are in {root}")
    state_file.write_text(json.dumps(states, indent=2, sort_keys=True) + "\n")


def check_installed(report_to: list[str]) -> None:
    """Refuse a run whose trackers cannot be imported, naming the extra that installs them."""
    import importlib

    for name in report_to:
        extra, module = EXTRAS[name]
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise RuntimeError(f"run.report_to includes {name!r}, but {module} cannot be imported ({err}): "
                               f"pip install 'kdrl[{extra}]' (or drop it from run.report_to)") from None


class Trackers:
    """The run's trackers, fed from its Parquet files by one background thread."""

    def __init__(self, cfg, run_dir: str | Path, *, log: Log = print) -> None:
        from kdrl.config import dump_config

        self.paths = RunPaths(Path(run_dir))
        self.steps, self.log = cfg.run.steps, log
        self.devices = cfg.trainer.world_size if cfg.cluster.backend == "ray" else 1
        self.trackers = build_trackers(cfg, self.paths, dump_config(cfg), cfg.model_dump(mode="json"))
        self.state_file = self.paths.root / "trackers.json"
        self.state: dict[str, dict[str, Any]] = (json.loads(self.state_file.read_text())
                                                 if self.state_file.exists() else {})
        self.started: set[str] = set()
        self.failures: dict[str, int] = {}
        self.queue: queue.Queue[int | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="kdrl-trackers", daemon=True)
        self.thread.start()

    def publish(self, step: int) -> None:
        """Step `step` is written (metrics and any evaluation): send what is not sent yet. Returns
        at once; the sending happens on the trackers' thread."""
        self.queue.put(step)

    def close(self, timeout: float = 60.0) -> bool:
        """Send what is left, end the trackers' runs (finished if every step was sent) and stop
        the thread; False if it did not finish within `timeout` seconds (what is unsent is sent
        when the run is next opened)."""
        self.queue.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.log(f"[kdrl] trackers: still sending after {timeout:.0f} s; left behind (the next run of this "
                     "folder sends what is missing)")
            return False
        return True

    # -- the thread --------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            step = self.queue.get()
            if step is None:
                break
            self._sync(step)
        final = [t for t in self.trackers if t.name in self.started and self._sent(t) >= self.steps
                 and not self.state[t.name].get("final_sent")]
        summary = self._summary() if final else ""
        figure = self._figure() if final else None
        for tracker in self.trackers:
            if tracker.name in self.started:
                state = self.state[tracker.name]
                complete = self._sent(tracker) >= self.steps
                if complete and not state.get("final_sent"):  # once: the held-out table and the plot
                    sent = ((not summary or self._guard(tracker, lambda t: t.log_text("heldout_summary", summary,
                                                                                       self.steps)))
                            and (figure is None or self._guard(tracker, lambda t: t.log_figure(
                                "learning_curve", figure, self.steps))))
                    state["final_sent"] = bool(sent)
                self._guard(tracker, lambda t: t.close(complete))
        self._save()
        if figure is not None:
            import matplotlib.pyplot as plt

            plt.close(figure)

    def _figure(self):
        """The run's learning-curve figure (`kdrl.runs.run_curve_figure`), or None if it cannot be drawn."""
        from kdrl.runs import run_curve_figure, run_metrics

        try:
            return run_curve_figure(run_metrics(self.paths.root), title=self.paths.root.name)
        except Exception as err:  # noqa: BLE001 (a plot must not fail the end of a run)
            self.log(f"[kdrl] trackers: no learning-curve plot ({type(err).__name__}: {err})")
            return None

    def _summary(self) -> str:
        """The held-out evaluations as a markdown table (before training and at each evaluation)."""
        from kdrl.runs import summarize_evaluation

        files = [(-1, self.paths.offline / "eval_baseline.parquet")]
        files += [(s, self.paths.evaluation(s)) for s in range(self.steps)]
        lines = ["| after step | model | temperature | pass@1 | mean length | prompts |", "|---|---|---|---|---|---|"]
        for step, path in files:
            if path.exists():
                for r in summarize_evaluation(read_table(path, table="evaluations")).iter_rows(named=True):
                    lines.append(f"| {'before' if step < 0 else step} | {r['model']} | {r['temperature']:g} "
                                 f"| {r['pass_at_1']:.3f} | {r['mean_len']:.1f} | {r['num_prompts']} |")
        return "\n".join(lines) if len(lines) > 2 else ""

    def _sent(self, tracker) -> int:
        """Steps sent to `tracker` so far (tracker steps: kdrl step + 1; 0 = only the baseline)."""
        return self.state.get(tracker.name, {}).get("sent", -1)

    def _sync(self, upto: int) -> None:
        for tracker in self.trackers:
            state = self.state.setdefault(tracker.name, {})
            first = self._sent(tracker) + 1
            if first > upto + 1:  # nothing new (a rerun of a finished run): the tracker's run stays as it is
                continue
            if tracker.name not in self.started:
                if not self._guard(tracker, lambda t: t.start(state)):
                    continue  # retried at the next step
                self.started.add(tracker.name)
            for tracker_step in range(first, upto + 2):
                values = self._values(tracker_step)
                if values is None:  # a file not there (a replayed step): stop here, retried later
                    break
                if values and not self._guard(tracker, lambda t: t.log(values, tracker_step)):
                    break
                state["sent"] = tracker_step
            self._guard(tracker, lambda t: t.flush())
        self._save()

    def _values(self, tracker_step: int) -> dict[str, float] | None:
        """What tracker step `tracker_step` logs: the baseline evaluation at 0, else kdrl step
        `tracker_step - 1`'s metrics row and its evaluation if one was made."""
        paths, step = self.paths, tracker_step - 1
        if step < 0:
            baseline = paths.offline / "eval_baseline.parquet"
            return heldout_metrics(read_table(baseline, table="evaluations")) if baseline.exists() else {}
        if not paths.metrics(step).exists():
            return None
        values = tracker_metrics(read_table(paths.metrics(step), table="step_metrics").row(0, named=True),
                                 devices=self.devices)
        if paths.evaluation(step).exists():
            values.update(heldout_metrics(read_table(paths.evaluation(step), table="evaluations")))
        return values

    def _guard(self, tracker, call: Callable[[Any], None]) -> bool:
        """Run one tracker call; on failure warn (the first time, then every WARN_EVERY-th) and
        return False. Never raises: a tracker must not stop training."""
        try:
            call(tracker)
        except Exception as err:  # noqa: BLE001 (any failure of a third-party client)
            n = self.failures[tracker.name] = self.failures.get(tracker.name, 0) + 1
            if n == 1 or n % WARN_EVERY == 0:
                self.log(f"[kdrl] tracker {tracker.name} failed ({type(err).__name__}: {str(err)[:300]}); training "
                         f"goes on, the Parquet files keep every row, and it is retried at the next step"
                         f"{'' if n == 1 else f' ({n} failures so far)'}")
            return False
        self.failures[tracker.name] = 0
        return True

    def _save(self) -> None:
        tmp = self.state_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.state, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.state_file)


def open_trackers(cfg, run_dir: str | Path, *, log: Log = print) -> Trackers | None:
    """The run's trackers (None if `run.report_to` is empty); refuses a tracker whose package is
    missing. Sends the baseline and any steps already written but not sent (a resumed run)."""
    if not cfg.run.report_to:
        return None
    check_installed(cfg.run.report_to)
    return Trackers(cfg, run_dir, log=log)

