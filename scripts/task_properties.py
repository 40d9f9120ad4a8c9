"""Measure what an embedded task gives the methods to work with, before comparing them.

    python scripts/task_properties.py --config data/configs/chain.yaml [--set KEY=VALUE ...]

For the warm-started student and teacher of the config (trained and cached on first use, as a run
would), on the in-domain held-out split and, where the family has one, the out-of-domain split:
greedy accuracy; pass@1 over 4 samples at T=0.6 (the comparison's protocol); accuracy at the
rollout temperature with G = rollout.samples_per_prompt samples per prompt and the share of those
groups whose rewards are all 0 or all equal (no GRPO signal); mean response length, the length of
the same answers' worked answers without re-checks (the shortest right answer), and re-checks per
response. Prints one markdown table (docs/experiments.md quotes it).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="data/configs/chain.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import polars as pl
    import torch
    from transformers import AutoModelForCausalLM

    from kdrl.config import load_config
    from kdrl.data import build_prompts
    from kdrl.embedded import resolve_model_path
    from kdrl.engines.hf import HFRolloutEngine
    from kdrl.families import column_sum
    from kdrl.models import build_char_tokenizer
    from kdrl.rewards import score_batch

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    tokenizer = build_char_tokenizer()
    prompts = build_prompts(cfg.data, tokenizer)
    group = cfg.rollout.samples_per_prompt
    print(f"config {args.config} {args.overrides}: {dict(prompts.group_by('split').len().iter_rows())} prompts",
          flush=True)

    def rechecks(text: str) -> int:
        steps = text.split(";")
        return sum(1 for a, b in zip(steps, steps[1:])
                   if "=" in a and "=" in b and a.split("=")[1] == b.split("=")[1]
                   and a.split("=")[0].split("+")[::-1] == b.split("=")[0].split("+"))

    rows = []
    for role in ("student", "teacher"):
        path = resolve_model_path(f"embedded:{role}", cfg)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        engine = HFRolloutEngine(model, tokenizer)
        for split in ("heldout", "ood"):
            chosen = prompts.filter(pl.col("split") == split)
            if chosen.height == 0:
                continue
            ids, golds = chosen["prompt_token_ids"].to_list(), chosen["answer"].to_list()
            shortest = [len(column_sum([int(x) for x in re.findall(r"\d+", q)])) + 1 for q in chosen["question"]]
            row = {"model": role, "split": split, "prompts": chosen.height}
            started = time.perf_counter()
            for label, temperature, n in (("greedy", 0.0, 1), ("pass@1 T=0.6", 0.6, 4),
                                          (f"T={cfg.rollout.temperature:g}", cfg.rollout.temperature, group)):
                torch.manual_seed(0)
                out = engine.generate(ids, n=n, max_new_tokens=cfg.rollout.max_new_tokens, temperature=temperature)
                scores = [r for _, r in score_batch(out.completion_text, [g for g in golds for _ in range(n)],
                                                    list(out.finish_reason), mode="auto")]
                row[label] = sum(scores) / len(scores)
                if n == group:
                    groups = [scores[i * n:(i + 1) * n] for i in range(len(golds))]
                    row["all-zero groups"] = sum(max(g) == 0 for g in groups) / len(groups)
                    row["equal-reward groups"] = sum(len(set(g)) == 1 for g in groups) / len(groups)
                    lengths = [len(ids) for ids in out.completion_token_ids]
                    row["mean length"] = sum(lengths) / len(lengths)
                    row["shortest right answer"] = sum(shortest) / len(shortest)
                    row["re-checks per response"] = sum(map(rechecks, out.completion_text)) / len(lengths)
                    row["truncated"] = sum(f == "length" for f in out.finish_reason) / len(lengths)
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
            print(row, flush=True)
    columns = list(rows[0])
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) and k != "seconds" else
                                 f"{v:.0f}" if isinstance(v, float) else str(v) for k, v in row.items()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
