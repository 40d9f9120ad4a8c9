"""transformers implementations of the two seams: HF ``generate`` rollouts and a no-grad teacher scorer.

Rollouts (:class:`HFRolloutEngine`):
- Pure ancestral sampling by default: ``top_k=0`` (transformers' own default would be 50) and the
  model's ``generation_config`` is set aside during the call, so checkpoint defaults such as a
  repetition penalty cannot bend the distribution the policy gradient assumes.
- ``sampler_logprobs[t] = log_softmax(logits_t / temperature)[o_t]`` in float32, recorded step by step
  by a logits processor (keeps one step of [B, V] instead of generate's whole ``output_logits``).
  ``top_p`` truncation is *not* reflected (like vLLM's raw logprobs): the value is the tempered,
  untruncated policy. Temperature 0 means greedy decoding and logprobs of the raw logits.
- A response that emits EOS keeps the EOS token as its last completion token (finish "stop"): the
  policy must be trained to stop. Anything generated after EOS (padding) is dropped.

Teacher scoring (:class:`HFTeacherScorer`): sequences are sorted by length, packed into batches of
at most ``max_tokens_per_batch`` padded tokens, left-padded so every completion ends at the same
column, and only the last ``T_max + 1`` positions go through the LM head (``logits_to_keep``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from kdrl.engines.base import check_generate_args, check_score_args
from kdrl.models import tokenizers_match
from kdrl.perf import pass_token_budget
from kdrl.progress import Progress
from kdrl.types import FinishReason, Rollouts, TeacherScores


def check_same_tokenizer(student_tokenizer: Tokenizer, teacher_tokenizer: Tokenizer) -> None:
    """Raise ValueError unless both tokenizers give every token the same id (KD compares
    distributions over one vocabulary).

    >>> from kdrl.models import build_char_tokenizer
    >>> check_same_tokenizer(build_char_tokenizer(), build_char_tokenizer())
    >>> check_same_tokenizer(build_char_tokenizer(), build_char_tokenizer("0123"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: teacher tokenizer differs from the student's (vocab size 80 vs 8); ...
    """
    difference = tokenizers_match(student_tokenizer, teacher_tokenizer)
    if difference is not None:
        raise ValueError(
            f"teacher tokenizer differs from the student's ({difference}); token-level KD needs "
            "one shared vocabulary — pick a teacher from the student's model family"
        )


def _left_pad(
    rows: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into ``ids_BS`` and ``mask_BS`` (1 = real token)."""
    width = max(len(r) for r in rows)
    ids_BS = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask_BS = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        if row:
            ids_BS[b, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask_BS[b, width - len(row) :] = 1
    return ids_BS.to(device), mask_BS.to(device)


def _eos_ids(model: PreTrainedModel, tokenizer: Tokenizer) -> list[int]:
    """EOS ids of the tokenizer and of the model's generation config (chat models list several)."""
    found = getattr(model.generation_config, "eos_token_id", None)
    ids = list(found) if isinstance(found, (list, tuple)) else [found]
    ids.append(tokenizer.eos_token_id)
    return sorted({int(i) for i in ids if i is not None})


@contextmanager
def _plain_generation_config(
    model: PreTrainedModel, eos_ids: list[int], pad_id: int
) -> Iterator[None]:
    """Hide checkpoint sampling defaults (top_k, repetition_penalty, min_length...): generate fills
    every option we leave unset from ``model.generation_config``."""
    saved = model.generation_config
    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=pad_id, bos_token_id=saved.bos_token_id
    )
    try:
        yield
    finally:
        model.generation_config = saved


CHUNK_SEED_STRIDE = 1_000_000_007
"""Seeds of consecutive generation chunks are this far apart (step seeds are 1 apart)."""


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of generation chunk `chunk` of a call seeded `seed`; chunk 0 keeps `seed`, and
    ``chunk_seed(chunk_seed(s, a), b) == chunk_seed(s, a + b)``.

    >>> chunk_seed(7, 0), chunk_seed(chunk_seed(7, 2), 3) == chunk_seed(7, 5)
    (7, True)
    """
    return (seed + chunk * CHUNK_SEED_STRIDE) % 2**63


@contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the generator sampling uses on ``device``; restore the caller's RNG state after."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class _SampledLogprobRecorder(LogitsProcessor):
    """Records log_softmax(logits / T) at each sampled token. Runs before the temperature warper
    and sees step t's sampled token only at step t+1, so it keeps one step of log-probs."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.logp_per_step: list[torch.Tensor] = []
        self.last_logp_BV: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.last_logp_BV is not None:
            self.logp_per_step.append(self.last_logp_BV.gather(1, input_ids[:, -1:]).squeeze(1))
        self.last_logp_BV = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, generated_BT: torch.Tensor) -> torch.Tensor:
        """``logp_BT`` for the generated tokens (generate may have run and undone one extra step)."""
        steps = self.logp_per_step[: generated_BT.shape[1]]
        if len(steps) < generated_BT.shape[1]:
            steps.append(self.last_logp_BV.gather(1, generated_BT[:, -1:]).squeeze(1))
        return torch.stack(steps, dim=1)


class _ProgressTicker(LogitsProcessor):
    """Counts decode steps and generated tokens for `kdrl.progress` without a device sync per
    step: at step t the last column of input_ids is the token sampled at t − 1, which was a real
    token for the rows not finished before it. The count is read only when a line is due."""

    def __init__(self, progress: Progress, eos_ids: list[int], rows: int, device: torch.device, base: int) -> None:
        self.progress, self.base = progress, base
        self.eos = torch.tensor(eos_ids, device=device)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.steps:
            self.tokens += (~self.finished).sum()
            self.finished |= torch.isin(input_ids[:, -1], self.eos)
            if self.progress.due():
                self.progress.set_tokens(self.base + int(self.tokens))
            self.progress.update(1)
        self.steps += 1
        return scores


class HFRolloutEngine:
    """Samples with ``model.generate`` (KV cache) on the trainer's own module.

    ``sync_weights`` is a no-op: the engine holds the very module the trainer updates.
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer: Tokenizer, *, batch_size: int = 256
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer needs a pad token (kdrl.models.load_tokenizer sets one)")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_ids = _eos_ids(model, tokenizer)

    def sync_weights(self) -> None:
        """Nothing to do: generation runs on the trainer's module itself."""

    def sleep(self) -> None:
        """Nothing to free: the module is the trainer's."""

    def wake(self) -> None:
        """Nothing to take back (see `sleep`)."""

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
        """``n`` samples per prompt, rows prompt-major; the caller's RNG state is left untouched.

        Rows are generated in chunks of ``batch_size``, chunk j seeded with ``chunk_seed(seed, j)``:
        a call on the rows from chunk k on, seeded ``chunk_seed(seed, k)``, samples exactly what
        this call samples there (how rollout replicas split a step, `kdrl.cluster`)."""
        check_generate_args(prompt_token_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature)
        rows = [(p, g) for p in range(len(prompt_token_ids)) for g in range(n)]
        completions: list[list[int]] = []
        logprobs: list[list[float]] = []
        reasons: list[FinishReason] = []
        chunks = range(0, len(rows), self.batch_size)
        progress = Progress("generate", total=len(chunks) * max_new_tokens, unit="decode steps")
        with _eval_mode(self.model):
            for chunk, start in enumerate(chunks):
                prompts = [prompt_token_ids[p] for p, _ in rows[start : start + self.batch_size]]
                ticker = _ProgressTicker(progress, self.eos_ids, len(prompts), self.model.device,
                                         base=sum(map(len, completions)))
                with _seeded(self.model.device, chunk_seed(seed, chunk)):
                    generated_BT, logp_BT = self._generate_chunk(prompts, max_new_tokens, temperature, top_p, ticker)
                for tokens, logps in zip(generated_BT.tolist(), logp_BT.tolist()):
                    keep, reason = self._cut_at_eos(tokens)
                    completions.append(tokens[:keep])
                    logprobs.append(logps[:keep])
                    reasons.append(reason)
                progress.set_tokens(sum(map(len, completions)))
                progress.update((chunk + 1) * max_new_tokens - progress.done)  # this chunk is done, early stop or not
        progress.close()
        return Rollouts(
            prompt_index=[p for p, _ in rows],
            sample_index=[g for _, g in rows],
            prompt_token_ids=[list(prompt_token_ids[p]) for p, _ in rows],
            completion_token_ids=completions,
            sampler_logprobs=logprobs,
            finish_reason=reasons,
            completion_text=self.tokenizer.batch_decode(completions, skip_special_tokens=True),
        )

    def _cut_at_eos(self, tokens: list[int]) -> tuple[int, FinishReason]:
        """Length to keep (through the first EOS) and why the response ended."""
        for t, token in enumerate(tokens):
            if token in self.eos_ids:
                return t + 1, "stop"
        return len(tokens), "length"

    @torch.no_grad()
    def _generate_chunk(
        self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
        ticker: _ProgressTicker | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generated ids ``[B, T]`` (padding after EOS included) and their float32 log-probs."""
        ids_BS, mask_BS = _left_pad(prompts, self.tokenizer.pad_token_id, self.model.device)
        greedy = temperature == 0
        recorder = _SampledLogprobRecorder(1.0 if greedy else temperature)
        sampling = {} if greedy else dict(temperature=temperature, top_p=top_p, top_k=0)
        with _plain_generation_config(self.model, self.eos_ids, self.tokenizer.pad_token_id):
            sequences_BS = self.model.generate(
                input_ids=ids_BS,
                attention_mask=mask_BS,
                do_sample=not greedy,
                max_new_tokens=max_new_tokens,
                logits_processor=LogitsProcessorList([recorder] + ([ticker] if ticker else [])),
                **sampling,
            )
        generated_BT = sequences_BS[:, ids_BS.shape[1] :]
        return generated_BT.cpu(), recorder.finish(generated_BT).cpu()


LOGSOFTMAX_CHUNK_ELEMENTS = 1 << 26
"""Most float32 log-prob values the teacher scorer holds at once (256 MiB): rows are taken in
chunks of this many ``T × V``."""


class HFTeacherScorer:
    """Teacher log-probs of given completions under no_grad, length-sorted and token-packed."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Tokenizer,
        *,
        max_tokens_per_batch: int = 16384,
        student_tokenizer: Tokenizer | None = None,
    ) -> None:
        if student_tokenizer is not None:
            check_same_tokenizer(student_tokenizer, tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.max_tokens_per_batch = pass_token_budget(max_tokens_per_batch, model.device)  # smaller on a CPU
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def score(
        self,
        prompt_token_ids: list[list[int]],
        completion_token_ids: list[list[int]],
        *,
        top_k: int = 0,
    ) -> TeacherScores:
        """log π_T(o_t | prompt, o_<t) per completion token; top-k ids/log-probs when top_k > 0."""
        check_score_args(prompt_token_ids, completion_token_ids)
        n_rows = len(prompt_token_ids)
        logprobs: list[list[float]] = [[] for _ in range(n_rows)]
        topk_ids: list[list[list[int]]] = [[] for _ in range(n_rows)]
        topk_logprobs: list[list[list[float]]] = [[] for _ in range(n_rows)]
        batches = self._packed_batches(prompt_token_ids, completion_token_ids)
        progress = Progress("teacher scoring", total=len(batches), unit="batches")
        with _eval_mode(self.model), torch.no_grad():
            for batch in batches:
                seqs = [prompt_token_ids[r] + completion_token_ids[r] for r in batch]
                lengths = [len(completion_token_ids[r]) for r in batch]
                for r, (lp, ids, tlp) in zip(batch, self._score_batch(seqs, lengths, top_k)):
                    logprobs[r], topk_ids[r], topk_logprobs[r] = lp, ids, tlp
                progress.update(1, tokens=sum(map(len, seqs)))
        progress.close()
        if top_k <= 0:
            return TeacherScores(logprobs=logprobs)
        return TeacherScores(logprobs=logprobs, topk_ids=topk_ids, topk_logprobs=topk_logprobs)

    def _packed_batches(
        self, prompts: list[list[int]], completions: list[list[int]]
    ) -> list[list[int]]:
        """Row indices, longest first, grouped so that rows × longest ≤ max_tokens_per_batch
        (a row longer than the budget goes alone). Empty completions are skipped."""
        length = {r: len(p) + len(c) for r, (p, c) in enumerate(zip(prompts, completions)) if c}
        batches: list[list[int]] = []
        for r in sorted(length, key=length.__getitem__, reverse=True):
            padded = (len(batches[-1]) + 1) * length[batches[-1][0]] if batches else None
            if padded is not None and padded <= self.max_tokens_per_batch:
                batches[-1].append(r)
            else:
                batches.append([r])
        return batches

    def _score_batch(
        self, seqs: list[list[int]], lengths: list[int], top_k: int
    ) -> list[tuple[list[float], list[list[int]], list[list[float]]]]:
        """Per row: completion log-probs and (when top_k > 0) top-k ids and log-probs."""
        ids_BS, mask_BS = _left_pad(seqs, self.pad_id, self.model.device)
        position_ids_BS = (mask_BS.cumsum(-1) - 1).clamp(min=0)
        t_max = max(lengths)
        extra = {"logits_to_keep": t_max + 1} if self.keeps_logits else {}
        logits_BSV = self.model(
            input_ids=ids_BS, attention_mask=mask_BS, position_ids=position_ids_BS, **extra
        ).logits  # S = t_max + 1 kept positions when the model supports logits_to_keep
        # Left padding ends every sequence in the last column, so a row's T completion tokens are
        # its last T ids and are predicted by the T positions just before the last one.
        window_BTV = logits_BSV[:, -(t_max + 1) : -1]
        targets_BT = ids_BS[:, -t_max:]
        out = []
        # One log_softmax + gather (+ topk) per chunk of rows, not per row: a row's values are the
        # same either way (the softmax runs along V within each position), and a chunk holds at
        # most LOGSOFTMAX_CHUNK_ELEMENTS float32 values (or one row, if a row alone holds more).
        rows = max(1, LOGSOFTMAX_CHUNK_ELEMENTS // (t_max * window_BTV.shape[-1]))
        for lo in range(0, len(lengths), rows):
            logp_BTV = torch.log_softmax(window_BTV[lo : lo + rows].float(), dim=-1)
            token_logp = logp_BTV.gather(2, targets_BT[lo : lo + rows, :, None]).squeeze(2).tolist()
            if top_k > 0:
                top_logp_BTK, top_ids_BTK = logp_BTV.topk(min(top_k, logp_BTV.shape[-1]), dim=-1)
                top_logp, top_ids = top_logp_BTK.tolist(), top_ids_BTK.tolist()
            for b, length in enumerate(lengths[lo : lo + rows]):
                first = t_max - length  # left padding: the row's completion is its last `length` columns
                if top_k > 0:
                    out.append((token_logp[b][first:], top_ids[b][first:], top_logp[b][first:]))
                else:
                    out.append((token_logp[b][first:], [], []))
        return out
