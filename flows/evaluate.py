"""The `kdrl-eval` flow: evaluate one model on one dataset (a deployment or `kdrl eval`)."""

from __future__ import annotations

from prefect import flow

from kdrl.evaluation import build_eval_config
from tasks import evaluate as e


@flow(name="kdrl-eval")
def kdrl_eval(checkpoint: str, dataset: str = "embedded", overrides: list[str] | None = None,
              out_dir: str | None = None, evals_dir: str = "evals") -> str:
    """pass@1 over k samples, greedy accuracy and response lengths of `checkpoint` on `dataset`,
    written to `out_dir` (default: a folder per evaluation under `evals_dir`; `~` is the home);
    returns the summary Parquet path."""
    cfg = build_eval_config(checkpoint, dataset, overrides or [])
    out = e.evaluate_model(cfg.model_dump(mode="json"), out_dir, evals_dir)
    e.publish_eval(out)
    return out.summary
