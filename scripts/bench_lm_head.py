"""The update's LM head at once vs in checkpointed chunks, on the shapes where kdrl now picks "at once".

    python scripts/bench_lm_head.py [--shape 8192x256 32000x128 80x64] [--reps 10]

`kdrl.train.completion_logprobs_BT` runs the LM head over all completion positions at once where
their float32 logits are at most `kdrl.memory.UNCHUNKED_LOGITS_BYTES`, else in chunks of
`LOGPROB_CHUNK_TOKENS` rows under activation checkpointing (each chunk's head matmul runs again
in the backward). For each VOCABxHIDDEN shape (a 2-layer Llama from its config, random init, fp32,
1 thread) it times one forward + backward of the log-probs of a 32 × 48-token completion batch
(24-token prompts) both ways, alternated A B A B in this one process, and prints the ratio per
repetition's median with min–max, and which way kdrl picks for that shape. Not a test: compare
only numbers taken in one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdrl.memory import LOGPROB_CHUNK_TOKENS, logprob_chunk_tokens  # noqa: E402
from kdrl.train import completion_logprobs_BT  # noqa: E402

ROWS, PROMPT, COMPLETION = 32, 24, 48


def measure(vocab: int, hidden: int, reps: int) -> list[float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
    ids = torch.randint(0, vocab, (ROWS, PROMPT + COMPLETION))
    batch = SimpleNamespace(input_ids_BS=ids, attention_mask_BS=torch.ones_like(ids),
                            position_ids_BS=torch.arange(PROMPT + COMPLETION).expand(ROWS, -1),
                            completion_ids_BT=ids[:, PROMPT:])

    def once(chunk: int | None, checkpointed: bool) -> float:
        model.zero_grad()
        start = time.perf_counter()
        # chunk_tokens given: always checkpointed chunks; None: the shape rule (kdrl's default)
        logp, _ = completion_logprobs_BT(model, batch, chunk_tokens=chunk if checkpointed else None)
        logp.sum().backward()
        return time.perf_counter() - start

    once(None, False), once(LOGPROB_CHUNK_TOKENS, True)  # warm-up
    ratios = []
    for _ in range(reps):
        checkpointed = once(LOGPROB_CHUNK_TOKENS, True)
        at_once = once(None, False)
        ratios.append(at_once / checkpointed)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs="+", default=["8192x256", "80x64"], help="VOCABxHIDDEN")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| vocab × hidden | tokens | kdrl picks | at once / checkpointed chunks: median (min–max) |")
    print("|---|---|---|---|")
    for shape in args.shape:
        vocab, hidden = map(int, shape.split("x"))
        tokens = ROWS * COMPLETION
        picks = "chunks" if logprob_chunk_tokens(tokens, vocab) else "at once"
        ratios = measure(vocab, hidden, args.reps)
        note = "" if picks == "at once" else " (both chunked: the rule picks chunks here)"
        print(f"| {vocab} × {hidden} | {tokens} | {picks} | {statistics.median(ratios):.3f} "
              f"({min(ratios):.3f}–{max(ratios):.3f}){note} |", flush=True)


if __name__ == "__main__":
    main()
