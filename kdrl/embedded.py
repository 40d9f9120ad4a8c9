"""The embedded default's models: a tiny Llama teacher and student, warm-started by SFT.

Both share one char-level tokenizer. The teacher (~6M) is trained on the worked answers of the
training prompts until it is strong; the student (~1M) gets a short warm start so it is right
only sometimes — the regime where RL alone explores poorly and KDRL helps. Results are cached
under ``run.cache_dir/embedded-<hash>/{teacher,student}``, keyed on everything that shapes them,
so only the first run pays. Held-out prompts are never trained on.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kdrl.config import RunConfig
from kdrl.data import build_prompts
from kdrl.engines.hf import HFRolloutEngine
from kdrl.families import family, is_embedded
from kdrl.models import (
    TINY_STUDENT,
    TINY_TEACHER,
    build_char_tokenizer,
    build_tiny_llama,
    save_model,
)
from kdrl.rewards import reference_answer, score_batch
from kdrl.runlock import hold_run_lock

ROLES = {"teacher": TINY_TEACHER, "student": TINY_STUDENT}
TRAIN_WAIT_S = 3 * 3600.0
"""How long a process waits for another one that is warm-starting the same embedded model."""
_RECIPE_VERSION = "4"  # bump when the warm-start recipe changes, to invalidate caches


# What shapes the embedded models, hence their cache key. Any other setting (the method, the loss,
# run.steps, sampling, ...) reuses the cached models; embedded.log_every_s only changes the log.
CACHE_KEY_FIELDS = {
    "data": ("seed", "num_train", "num_heldout", "min_digits", "max_digits", "prompt_template"),
    "embedded": ("teacher_steps", "teacher_target", "student_steps", "batch_size", "lr", "lr_schedule", "eval_every",
                 "num_validation", "seed"),
    "rollout": ("max_new_tokens",),  # the teacher's validation decodes this many tokens
}


def cache_key(cfg: RunConfig) -> str:
    """Hash of what determines the embedded models: `CACHE_KEY_FIELDS`, the task family (when
    not the default, whose keys stay as they were), the architectures and the warm-start
    recipe's version."""
    fields = {f"{section}.{name}": getattr(getattr(cfg, section), name)
              for section, names in CACHE_KEY_FIELDS.items() for name in names}
    if family(cfg.data.source).name != "addition":
        fields["data.source"] = cfg.data.source
    blob = json.dumps({"fields": fields, "roles": ROLES, "recipe": _RECIPE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def embedded_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run.cache_dir) / f"embedded-{cache_key(cfg)}"


def resolve_model_path(name_or_path: str, cfg: RunConfig, *, log=print,
                       progress: Callable[[int, int], None] | None = None) -> str:
    """"embedded:teacher"/"embedded:student" → the cached warm-started folder (trained on first
    use); anything else is returned unchanged (a hub name or a local path)."""
    if not name_or_path.startswith("embedded:"):
        return name_or_path
    role = name_or_path.split(":", 1)[1]
    if role not in ROLES:
        raise ValueError(f"unknown embedded model {name_or_path!r}; use embedded:teacher or embedded:student")
    if not is_embedded(cfg.data.source):
        raise ValueError(f"{name_or_path!r} is trained on an embedded task; data.source is {cfg.data.source!r} "
                         f"(use embedded or embedded:<family>)")
    path = embedded_dir(cfg) / role
    if not (path / "config.json").exists():
        # One process trains it; another that needs it meanwhile (a second `kdrl compare`, a Ray
        # worker) waits for the lock and then finds it made.
        with hold_run_lock(path.with_name(f".{role}-lock"), wait_s=TRAIN_WAIT_S):
            if not (path / "config.json").exists():
                train_embedded_model(role, cfg, path, log=log, progress=progress)
    return str(path)


def _training_pairs(cfg: RunConfig, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, worked answer ids + EOS) of the training prompts: the family's worked answers."""
    prompts = build_prompts(cfg.data, tokenizer)
    train = prompts.filter(prompts["split"] == "train")
    task = family(cfg.data.source)
    pairs = []
    for question, prompt_ids in zip(train["question"].to_list(), train["prompt_token_ids"].to_list()):
        completion = tokenizer(task.worked(question, cfg.data), add_special_tokens=False)["input_ids"]
        pairs.append((prompt_ids, completion + [tokenizer.eos_token_id]))
    return pairs


def validation_problems(cfg: RunConfig, tokenizer) -> tuple[list[list[int]], list[str]]:
    """(prompt token ids, reference answers) of `embedded.num_validation` problems drawn after the
    train and held-out ones by the same generator, hence disjoint from both."""
    need = cfg.data.num_train + cfg.data.num_heldout
    ds = family(cfg.data.source).problems(need + cfg.embedded.num_validation, cfg.data)
    rows = ds.select(range(need, len(ds)))
    texts = [cfg.data.prompt_template.format(question=q) for q in rows["question"]]
    return tokenizer(texts, add_special_tokens=True)["input_ids"], [reference_answer(a) for a in rows["answer"]]


def greedy_accuracy(model, tokenizer, prompt_ids: list[list[int]], golds: list[str], *, max_new_tokens: int) -> float:
    """Share of problems answered right by greedy decoding (truncated responses count as wrong)."""
    out = HFRolloutEngine(model, tokenizer).generate(prompt_ids, n=1, max_new_tokens=max_new_tokens, temperature=0.0)
    scores = score_batch(out.completion_text, golds, list(out.finish_reason), mode="auto")
    return sum(reward for _, reward in scores) / max(len(golds), 1)


@dataclass
class WarmStart:
    """What one SFT warm start did: the last training loss, the evaluations `(step, accuracy)`,
    and the step whose weights were kept (the best evaluation; the last step without any)."""

    loss: float
    evaluations: list[tuple[int, float]] = field(default_factory=list)
    kept_step: int = 0
    stopped_early: bool = False

    @property
    def best_accuracy(self) -> float | None:
        return max((acc for _, acc in self.evaluations), default=None)


def _lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up over `warmup` steps, then constant or cosine decay towards 0 at `total`
    (the last step still learns a little).

    >>> [round(_lr_factor(s, warmup=2, total=6, schedule="cosine"), 3) for s in range(6)]
    [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
    >>> _lr_factor(5, warmup=2, total=6, schedule="constant")
    1.0
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# The rows of a warm-start batch, sorted by length, run as this many micro-batches, each padded
# to its own longest row; the loss is summed over the batch's completion tokens and divided by
# their count, so the gradient is the one-batch gradient up to float rounding. The embedded
# task's rows are 18-44 tokens: one batch padded to ~44 is a fifth padding, and this cuts the
# CPU warm start by ~15-20% (scripts/bench_warm_start.py).
LENGTH_GROUPS = 4


def length_groups(batch: list[tuple[list[int], list[int]]], groups: int) -> list[list[tuple[list[int], list[int]]]]:
    """`batch`'s (prompt, completion) pairs sorted by total length, in `groups` consecutive
    slices of near-equal size (the first ones one row longer when it does not divide).

    >>> [[len(p) + len(c) for p, c in g] for g in length_groups([([1] * n, [2]) for n in (5, 1, 3, 2, 4)], 2)]
    [[2, 3, 4], [5, 6]]
    """
    ordered = sorted(batch, key=lambda pair: len(pair[0]) + len(pair[1]))
    size, extra = divmod(len(ordered), groups)
    out, start = [], 0
    for i in range(min(groups, len(ordered))):
        end = start + size + (1 if i < extra else 0)
        out.append(ordered[start:end])
        start = end
    return out


def _padded(batch, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (completion tokens only; -100 elsewhere)."""
    width = max(len(p) + len(c) for p, c in batch)
    ids_BS = torch.full((len(batch), width), pad_token_id)
    labels_BS = torch.full((len(batch), width), -100)
    mask_BS = torch.zeros(len(batch), width, dtype=torch.long)
    for i, (p, c) in enumerate(batch):
        ids_BS[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels_BS[i, len(p) : len(p) + len(c)] = torch.tensor(c)
        mask_BS[i, : len(p) + len(c)] = 1
    return ids_BS, mask_BS, labels_BS


def sft_warm_start(model, pairs, *, steps: int, batch_size: int, lr: float, seed: int, pad_token_id: int,
                   schedule: str = "constant", evaluate: Callable[[], float] | None = None, eval_every: int = 100,
                   target: float = 0.0, log: Callable[[str], None] | None = None, log_every_s: float = 30.0,
                   progress: Callable[[int, int], None] | None = None) -> WarmStart:
    """Teacher-forced cross-entropy on completions (prompt tokens unscored).

    With `evaluate` (a score of the current weights, higher is better), the model is scored every
    `eval_every` steps and after the last; the best weights are restored at the end, and training
    stops at the first evaluation reaching `target` (> 0). `log` gets a progress line at least every
    `log_every_s` seconds and one per evaluation; `progress(step, steps)` is called at the same times.
    """
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    warmup = 50  # linear, then `schedule`
    schedule_ = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, warmup=warmup, total=steps, schedule=schedule))
    result = WarmStart(loss=float("nan"), kept_step=steps)
    best_state: dict[str, torch.Tensor] | None = None
    started = last_log = time.monotonic()
    bar = tqdm(range(steps), desc="warm start", unit="step", disable=not sys.stderr.isatty(), leave=False)
    for step in bar:
        model.train()
        batch = rng.sample(pairs, min(batch_size, len(pairs)))
        tokens = sum(len(c) for _, c in batch)  # the loss is the mean over the whole batch's completion tokens
        optimizer.zero_grad(set_to_none=True)
        result.loss = 0.0
        for group in length_groups(batch, LENGTH_GROUPS):
            ids_BS, mask_BS, labels_BS = _padded(group, pad_token_id)
            loss = model(input_ids=ids_BS, attention_mask=mask_BS, labels=labels_BS, num_items_in_batch=tokens).loss
            loss.backward()
            result.loss += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule_.step()
        bar.set_postfix(loss=f"{result.loss:.4f}", refresh=False)
        done = step + 1
        now = time.monotonic()
        if evaluate is not None and (done % eval_every == 0 or done == steps):
            model.eval()
            accuracy = evaluate()
            if best_state is None or accuracy > result.best_accuracy:  # ties keep the earlier weights
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                result.kept_step = done
            result.evaluations.append((done, accuracy))
            if log is not None:
                log(f"[embedded]   step {done}/{steps}  loss {result.loss:.4f}  validation accuracy {accuracy:.3f}  "
                    f"lr {schedule_.get_last_lr()[0]:.2e}  ({now - started:.0f}s)")
            last_log = now
            if progress is not None:
                progress(done, steps)
            if target > 0 and accuracy >= target:
                result.stopped_early = done < steps
                break
        elif now - last_log >= log_every_s:
            last_log = now
            if log is not None:
                log(f"[embedded]   step {done}/{steps}  loss {result.loss:.4f}  ({now - started:.0f}s)")
            if progress is not None:
                progress(done, steps)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


def stop_threshold(target: float, num_problems: int) -> float:
    """The validation accuracy at which the teacher's warm start stops: `target` plus two standard
    errors of an accuracy measured on `num_problems` problems, so that the held-out accuracy —
    other problems, the same distribution — is at or above `target` too, not only the lucky draw
    that crossed it first. 0 when there is no target.

    >>> round(stop_threshold(0.9, 200), 3)
    0.942
    """
    if target <= 0:
        return 0.0
    return min(1.0, target + 2 * math.sqrt(target * (1 - target) / max(num_problems, 1)))


def train_embedded_model(role: str, cfg: RunConfig, path: Path, *, log=print,
                         progress: Callable[[int, int], None] | None = None) -> WarmStart:
    """Build, warm-start and save one embedded model (atomically: temp dir, then rename).

    The teacher is scored on the validation problems as it trains, stops once it is confidently
    at `embedded.teacher_target` (`stop_threshold`) and keeps its best evaluated weights; if the
    step cap comes first it is still saved (the cap is a budget, not a failure) and a warning
    with the numbers and the settings to change is logged. `warm_start.json` beside the weights
    records what happened.
    """
    emb = cfg.embedded
    teacher = role == "teacher"
    steps = emb.teacher_steps if teacher else emb.student_steps
    stop_at = stop_threshold(emb.teacher_target, emb.num_validation) if teacher else 0.0
    what = f"{steps} SFT steps"
    if stop_at > 0:
        what = (f"up to {steps} SFT steps, until greedy accuracy on {emb.num_validation} validation problems is "
                f"≥ {stop_at:.3f}: target {emb.teacher_target:g} + 2 standard errors")
    log(f"[embedded] training the tiny {role} ({what}; once, then cached in {path})")
    started = time.perf_counter()
    tokenizer = build_char_tokenizer()
    seed = 1000 * emb.seed + cfg.data.seed + (1 if teacher else 2)
    model = build_tiny_llama(tokenizer, seed=seed, **ROLES[role])
    evaluate = None
    if teacher:
        val_ids, val_golds = validation_problems(cfg, tokenizer)
        max_new = cfg.rollout.max_new_tokens

        def evaluate() -> float:
            return greedy_accuracy(model, tokenizer, val_ids, val_golds, max_new_tokens=max_new)

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        result = sft_warm_start(
            model, _training_pairs(cfg, tokenizer), steps=steps, batch_size=emb.batch_size, lr=emb.lr, seed=seed,
            pad_token_id=tokenizer.pad_token_id, schedule=emb.lr_schedule if teacher else "constant",
            evaluate=evaluate, eval_every=emb.eval_every, target=stop_at, log=log,
            log_every_s=emb.log_every_s, progress=progress)
    tmp = path.with_name(f".{path.name}.tmp")
    save_model(model, tokenizer, tmp)
    (tmp / "warm_start.json").write_text(json.dumps(
        {"role": role, "steps_run": result.evaluations[-1][0] if result.evaluations else steps,
         "kept_step": result.kept_step, "final_loss": result.loss, "validation": result.evaluations,
         "target": emb.teacher_target if teacher else None, "stop_at": stop_at or None,
         "seconds": round(time.perf_counter() - started, 1)},
        indent=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(path)
    summary = f"[embedded] {role} done in {time.perf_counter() - started:.0f}s, final loss {result.loss:.3f}"
    if result.best_accuracy is not None:
        summary += f", kept step {result.kept_step} (validation accuracy {result.best_accuracy:.3f})"
    log(summary)
    if stop_at > 0 and (result.best_accuracy or 0.0) < stop_at:
        log(f"[embedded] WARNING: the teacher reached {result.best_accuracy:.3f} validation accuracy in "
            f"embedded.teacher_steps={steps} steps, short of the {stop_at:.3f} that makes "
            f"embedded.teacher_target={emb.teacher_target:g} likely on the held-out problems. It is kept (the best "
            f"of {len(result.evaluations)} evaluations); to train longer, delete {path} and raise "
            f"embedded.teacher_steps (or lower embedded.teacher_target, or try another embedded.seed).")
    return result


def missing_embedded_models(cfg: RunConfig) -> list[str]:
    """The embedded models a run of `cfg` loads ("student", "teacher", in the order a session
    loads them) whose cached folder does not exist yet."""
    names = [cfg.model.name_or_path, *([cfg.teacher.name_or_path] if cfg.loads_teacher else [])]
    names = names if is_embedded(cfg.data.source) else []
    roles = [n.split(":", 1)[1] for n in names if n.startswith("embedded:") and n.split(":", 1)[1] in ROLES]
    return [r for r in dict.fromkeys(roles) if not (embedded_dir(cfg) / r / "config.json").exists()]
