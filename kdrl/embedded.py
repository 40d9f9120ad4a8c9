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
import random
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kdrl.config import RunConfig
from kdrl.data import build_prompts, worked_answer
from kdrl.models import TINY_STUDENT, TINY_TEACHER, build_char_tokenizer, build_tiny_llama, save_model

ROLES = {"teacher": TINY_TEACHER, "student": TINY_STUDENT}
_RECIPE_VERSION = "2"  # bump when the warm-start recipe changes, to invalidate caches


def cache_key(cfg: RunConfig) -> str:
    """Hash of what determines the embedded models (data, warm-start recipe, architectures)."""
    blob = json.dumps(
        {"data": cfg.data.model_dump(mode="json"), "embedded": cfg.embedded.model_dump(mode="json"),
         "roles": ROLES, "recipe": _RECIPE_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def embedded_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run.cache_dir) / f"embedded-{cache_key(cfg)}"


def resolve_model_path(name_or_path: str, cfg: RunConfig, *, log=print) -> str:
    """"embedded:teacher"/"embedded:student" → the cached warm-started folder (trained on first
    use); anything else is returned unchanged (a hub name or a local path)."""
    if not name_or_path.startswith("embedded:"):
        return name_or_path
    role = name_or_path.split(":", 1)[1]
    if role not in ROLES:
        raise ValueError(f"unknown embedded model {name_or_path!r}; use embedded:teacher or embedded:student")
    if cfg.data.source != "embedded":
        raise ValueError(f"{name_or_path!r} is trained on the embedded task; data.source is {cfg.data.source!r}")
    path = embedded_dir(cfg) / role
    if not (path / "config.json").exists():
        train_embedded_model(role, cfg, path, log=log)
    return str(path)


def _training_pairs(cfg: RunConfig, tokenizer) -> list[tuple[list[int], list[int]]]:
    prompts = build_prompts(cfg.data, tokenizer)
    train = prompts.filter(prompts["split"] == "train")
    pairs = []
    for question, prompt_ids in zip(train["question"].to_list(), train["prompt_token_ids"].to_list()):
        a, b = (int(x) for x in question.rstrip("=").split("+"))
        completion = tokenizer(worked_answer(a, b), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        pairs.append((prompt_ids, completion))
    return pairs


def sft_warm_start(model, pairs, *, steps: int, batch_size: int, lr: float, seed: int, pad_token_id: int,
                   log=None, log_every: int = 100) -> float:
    """Teacher-forced cross-entropy on completions (prompt tokens unscored); returns last loss."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50))
    model.train()
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(steps), desc="warm start", unit="step", disable=not sys.stderr.isatty(), leave=False)
    for step in bar:
        batch = rng.sample(pairs, min(batch_size, len(pairs)))
        width = max(len(p) + len(c) for p, c in batch)
        ids_BS = torch.full((len(batch), width), pad_token_id)
        labels_BS = torch.full((len(batch), width), -100)
        mask_BS = torch.zeros(len(batch), width, dtype=torch.long)
        for i, (p, c) in enumerate(batch):
            ids_BS[i, : len(p) + len(c)] = torch.tensor(p + c)
            labels_BS[i, len(p) : len(p) + len(c)] = torch.tensor(c)
            mask_BS[i, : len(p) + len(c)] = 1
        loss = model(input_ids=ids_BS, attention_mask=mask_BS, labels=labels_BS).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if log is not None and (step + 1) % log_every == 0:
            log(f"[embedded]   step {step + 1}/{steps}  loss {loss.item():.4f}")
    model.eval()
    return float(loss.detach())


def train_embedded_model(role: str, cfg: RunConfig, path: Path, *, log=print) -> None:
    """Build, warm-start and save one embedded model (atomically: temp dir, then rename)."""
    steps = cfg.embedded.teacher_steps if role == "teacher" else cfg.embedded.student_steps
    log(f"[embedded] training the tiny {role} ({steps} SFT steps; cached in {path})")
    started = time.perf_counter()
    tokenizer = build_char_tokenizer()
    seed = cfg.data.seed + (1 if role == "teacher" else 2)
    model = build_tiny_llama(tokenizer, seed=seed, **ROLES[role])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        loss = sft_warm_start(model, _training_pairs(cfg, tokenizer), steps=steps, batch_size=cfg.embedded.batch_size,
                              lr=cfg.embedded.lr, seed=seed, pad_token_id=tokenizer.pad_token_id, log=log)
    tmp = path.with_name(f".{path.name}.tmp")
    save_model(model, tokenizer, tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(path)
    log(f"[embedded] {role} done in {time.perf_counter() - started:.0f}s, final loss {loss:.3f}")
