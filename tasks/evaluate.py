"""Prefect tasks of `kdrl eval`: evaluate a model, publish its summary.

Not cached by Prefect: the output folder is the record (`kdrl.evaluation.run_eval` returns an
existing evaluation with the same config as it is and refuses to overwrite another one).
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from kdrl.config import EvalConfig
from kdrl.evaluation import EvalOutput, read_summary, run_eval
from tasks.report import artifact_key


@task(cache_policy=NO_CACHE)
def evaluate_model(config: dict, out_dir: str | None = None, evals_dir: str = "evals") -> EvalOutput:
    """Evaluate the model of `config` (an EvalConfig as a dict) → samples and summary Parquet."""
    return run_eval(EvalConfig.model_validate(config), out_dir, evals_dir=evals_dir, log=get_run_logger().info)


@task(cache_policy=NO_CACHE)
def publish_eval(out: EvalOutput) -> str:
    """A markdown artifact with the summary table."""
    summary = read_summary(out)
    lines = ["| model | dataset | T | k | prompts | pass@1 | mean len | p90 len | truncated |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in summary.iter_rows(named=True):
        lines.append(f"| {r['model']} | {r['dataset']} | {r['temperature']:g} | {r['samples']} | {r['num_prompts']} | "
                     f"{r['pass_at_1']:.3f} | {r['mean_len']:.1f} | {r['p90_len']:.0f} | {r['truncated_frac']:.3f} |")
    markdown = "\n".join(lines)
    create_markdown_artifact(markdown, key=artifact_key(Path(out.summary).parent, "eval"),
                             description=f"kdrl eval → {out.summary}")
    return markdown
