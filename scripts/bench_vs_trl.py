"""kdrl vs TRL on the same work, side by side, plus the compute floor of each stage.

    python scripts/bench_vs_trl.py                               # 16x8 32x8 64x8, 3 reps, 6 steps
    python scripts/bench_vs_trl.py --shapes 16x8 --reps 2 --steps 4 --no-flow --no-floors

The setup (issue 18): the same model folders (the embedded student and teacher), the same
prompts in the same order (kdrl's own draw for steps 0..n-1, fed to TRL unshuffled), the same
P x G, temperature 1, top-k/top-p off, at most --max-new-tokens tokens, stop at EOS, one
optimizer step per generation batch, the same reward function (kdrl's), fp32, 1 torch thread.
Each framework batches the work its own way, as a user gets it: TRL in 64-row micro-batches
(per_device_train_batch_size, with gradient accumulation to one step); kdrl with its defaults
(optim.micro_batch_size 64, and on a CPU at most 1,024 tokens per pass, rows sorted by length).
`--set` overrides reach the kdrl arms only. Arms (each a fresh process, so start-up counts
imports):

- ``kdrl``       kdrl's `kdrl` preset (GRPO + k2 reverse KL to the teacher), plain loop
- ``trl_kd``     TRL 1.16 `GRPOTrainer` subclass adding β·(log p_T − log p_S) per token to the
                 advantage (the MiniLLM form; one no-grad teacher and one no-grad student forward
                 per step — the student's could come from the update's own forward in a tighter
                 implementation, which would make this arm faster by about one student forward)
- ``grpo``       kdrl's `grpo` preset, plain loop
- ``trl_grpo``   TRL `GRPOTrainer`
- ``flow_kdrl``  kdrl's `kdrl` preset as a Prefect flow run (`kdrl train`, a local server)

Pairs are alternated A B A B within each repetition. A step's time is the wall time between the
starts of two consecutive training generations (everything a step does: generation, rewards,
teacher, update, I/O, bookkeeping); the first step (warm-up) and the last (followed by the final
evaluation/save) are not timed. Start-up = process start to the first training generation; an
untimed kdrl run first fills the caches a second run of a user finds (the embedded models, the
baseline evaluation), so every timed kdrl run starts as a user's second run does. The
floor is the same rows through bare transformers calls: `generate`, one teacher forward with
`logits_to_keep` + log_softmax/gather, and the update's forward/backward/AdamW step.

Needs TRL: ``pip install -e '.[bench]'`` (pinned in constraints.txt). Not a test: ratios measured
in one invocation on a quiet machine are what docs/benchmarks.md records.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MICRO_BATCH = 64
PAIRS = {"kd": ("kdrl", "trl_kd"), "grpo": ("grpo", "trl_grpo")}
ARM_METHOD = {"kdrl": "kdrl", "grpo": "grpo", "flow_kdrl": "kdrl"}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}


def _overrides(args: argparse.Namespace, shape: tuple[int, int], runs_dir: str) -> list[str]:
    P, G = shape
    # rollout.max_new_tokens only when asked: it is in the embedded models' cache key
    tokens = [] if args.max_new_tokens is None else [f"rollout.max_new_tokens={args.max_new_tokens}"]
    return [f"rollout.prompts_per_step={P}", f"rollout.samples_per_prompt={G}", *tokens, "rollout.temperature=1.0",
            "rollout.top_p=1.0",
            "rollout.engine=hf", "teacher.engine=hf", f"optim.micro_batch_size={MICRO_BATCH}",
            "run.num_threads=1", f"run.steps={args.steps}", "run.eval_every=0", "run.checkpoint_every=0",
            f"run.runs_dir={runs_dir}", *args.overrides]


# ---------------------------------------------------------------------------------------- workers


def _step_stats(starts: list[float], tokens: list[int], t0: float) -> dict:
    """Step times from consecutive training-generation starts (steps 1..n-2)."""
    return {"startup_s": starts[0] - t0, "step_s": [b - a for a, b in zip(starts[1:-1], starts[2:])],
            "tokens": tokens[1:-1]}


def _after_import(name: str, patch) -> None:
    """Call `patch(module)` when `name` is first imported, so the worker imports nothing before
    `kdrl train` does (the flow's local server boots during those imports, as for a user)."""
    import importlib.abc
    import importlib.util

    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                patch(module)

            spec.loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, Hook())


def worker_kdrl(args: argparse.Namespace, t0: float) -> dict:
    P, G = args.shape
    starts: list[float] = []
    tokens: list[int] = []

    def instrument(hf) -> None:  # instrumentation only: the call is unchanged
        generate = hf.HFRolloutEngine.generate

        def timed_generate(self, prompt_token_ids, **kw):
            start = time.time()
            out = generate(self, prompt_token_ids, **kw)
            if kw.get("temperature") == 1.0 and kw.get("n") == G and len(prompt_token_ids) == P:  # not an evaluation
                starts.append(start)
                tokens.append(sum(map(len, out.completion_token_ids)))
            return out

        hf.HFRolloutEngine.generate = timed_generate

    _after_import("kdrl.engines.hf", instrument)
    overrides = [f"run.method={ARM_METHOD[args.arm]}", *_overrides(args, args.shape, args.runs_dir)]
    argv = ["train", *(["--config", args.config] if args.config else []), "--run-id", f"{args.arm}-{os.getpid()}"]
    for item in overrides:
        argv += ["--set", item]
    if args.arm != "flow_kdrl":
        argv.append("--no-prefect")
    from flows.cli import main

    if main(argv) != 0:
        raise SystemExit(f"kdrl train failed: {argv}")
    if not starts:
        raise SystemExit("no training generation was timed: the instrumentation did not reach kdrl.engines.hf")
    return _step_stats(starts, tokens, t0)


def _step_prompts(args: argparse.Namespace) -> tuple[list[str], list[list[int]], list[str], str, str]:
    """kdrl's prompts of steps 0..steps-1 in kdrl's order, and the resolved model folders."""
    import polars as pl

    from kdrl.config import load_config
    from kdrl.data import build_prompts, sample_prompt_ids
    from kdrl.embedded import resolve_model_path
    from kdrl.models import load_tokenizer

    cfg = load_config(args.config, _overrides(args, args.shape, args.runs_dir))
    student = resolve_model_path(cfg.model.name_or_path, cfg)
    teacher = resolve_model_path(cfg.teacher.name_or_path, cfg)
    table = build_prompts(cfg.data, load_tokenizer(student))
    train_ids = table.filter(pl.col("split") == "train")["prompt_id"].to_list()
    texts, ids, answers = [], [], []
    for step in range(args.steps):
        chosen = sample_prompt_ids(train_ids, step=step, count=args.shape[0], seed=cfg.run.seed)
        rows = table.filter(pl.col("prompt_id").is_in(chosen)).sort("prompt_id")
        texts += rows["prompt_text"].to_list()
        ids += rows["prompt_token_ids"].to_list()
        answers += rows["answer"].to_list()
    return texts, ids, answers, student, teacher


def trl_reward(reward_cfg, eos: int):
    """kdrl's reward rules as a TRL reward function (a completion without EOS is truncated)."""
    from kdrl.rewards import score_batch

    def reward(prompts, completions, completion_ids, answer, **_):
        finish = ["stop" if ids and ids[-1] == eos else "length" for ids in completion_ids]
        return [r for _, r in score_batch(completions, answer, finish, mode=reward_cfg.extract,
                                          thinking=reward_cfg.thinking, timeout_s=reward_cfg.timeout_s)]

    return reward


def timed_trainer(teacher, *, beta: float, micro: int, starts: list, tokens: list, step_prompts: list):
    """TRL's `GRPOTrainer`, recording when each generation batch starts, its completion tokens and
    its prompts; with a `teacher`, the MiniLLM form: β·(log p_T − log p_S) per completion token
    added to the advantage (one no-grad teacher forward, TRL's own fused-head scoring, and the
    student's old log-probs, or one no-grad student forward where TRL keeps none)."""
    import torch
    from trl import GRPOTrainer

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            start = time.time()
            out = self._with_teacher(super()._generate_and_score_completions(inputs))
            starts.append(start)
            tokens.append(int(out["completion_mask"].sum()))
            step_prompts.append([row[m.bool()].tolist() for row, m in zip(out["prompt_ids"], out["prompt_mask"])])
            return out

        def _with_teacher(self, out):
            return out

    class TimedKD(Timed):
        def _with_teacher(self, out):
            ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
            mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
            keep = out["completion_ids"].shape[1]
            with torch.no_grad():
                teacher_logp, _, _ = self._get_per_token_logps_and_entropies(teacher, ids, mask, keep,
                                                                              batch_size=micro)
                student_logp = out.get("old_per_token_logps")
                if student_logp is None:
                    student_logp, _, _ = self._get_per_token_logps_and_entropies(self.model, ids, mask, keep,
                                                                                  batch_size=micro)
            kd = beta * (teacher_logp - student_logp) * out["completion_mask"]
            out["advantages"] = out["advantages"].unsqueeze(1) + kd
            return out

    if teacher is None:
        return Timed
    from trl.trainer import add_fused_lm_head

    add_fused_lm_head(teacher, temperature=1.0)  # how TRL scores with its reference model
    return TimedKD


def worker_trl(args: argparse.Namespace, t0: float) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig

    from kdrl.config import load_config
    from kdrl.models import load_tokenizer

    torch.set_num_threads(1)
    P, G = args.shape
    cfg = load_config(args.config, [f"run.method={ARM_METHOD['kdrl']}", *_overrides(args, args.shape, args.runs_dir)])
    texts, prompt_ids, answers, student_path, teacher_path = _step_prompts(args)
    tokenizer = load_tokenizer(student_path)
    reward = trl_reward(cfg.reward, tokenizer.eos_token_id)
    starts: list[float] = []
    tokens: list[int] = []
    step_prompts: list[list[list[int]]] = []
    teacher = None
    if args.arm == "trl_kd":
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    trainer_cls = timed_trainer(teacher, beta=cfg.loss.beta_init, micro=MICRO_BATCH, starts=starts, tokens=tokens,
                                step_prompts=step_prompts)
    micro = min(MICRO_BATCH, P * G)
    if P * G % micro:
        raise SystemExit(f"P×G = {P * G} is not a multiple of TRL's {micro}-row micro-batch: TRL's generation "
                         "batch would not be one step's prompts")
    config = GRPOConfig(
        output_dir=str(Path(args.runs_dir) / f"trl-{os.getpid()}"), use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=micro, gradient_accumulation_steps=P * G // micro, num_generations=G,
        max_completion_length=cfg.rollout.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
        num_iterations=1, shuffle_dataset=False, learning_rate=cfg.optim.lr, max_grad_norm=cfg.optim.grad_clip,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_steps=args.steps, logging_steps=1,
        report_to="none", save_strategy="no", disable_tqdm=True, seed=cfg.run.seed, dataloader_num_workers=0,
        log_completions=False,
    )
    trainer = trainer_cls(model=student_path, reward_funcs=reward, args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": texts, "answer": answers}))
    trainer.train()
    sent = [row for batch in step_prompts for row in batch[::G]]
    if sent != prompt_ids:  # the benchmark's premise: same prompts, same order, same token ids
        raise SystemExit(f"TRL tokenized or ordered the prompts differently: {sent[:2]} vs {prompt_ids[:2]}")
    return _step_stats(starts, tokens, t0)


def worker_floor(args: argparse.Namespace, t0: float) -> dict:
    """One step's rows (step 1's prompts) through each stage in isolation, alternated per
    repetition: bare transformers calls (what a minimal loop computes: `generate`, one padded
    teacher forward + log_softmax/gather, 64-row forward/backward + AdamW), and kdrl's own stage
    functions (engine, rewards, teacher scorer, `update_step`) without the loop around them —
    the floor a kdrl step is compared to (its overhead: Parquet, bookkeeping, the flow)."""
    import polars as pl
    import torch
    from transformers import AutoModelForCausalLM

    from kdrl.batching import collate, join_step_tables
    from kdrl.config import load_config
    from kdrl.data import build_prompts, sample_prompt_ids
    from kdrl.engines.hf import HFRolloutEngine, HFTeacherScorer
    from kdrl.models import load_tokenizer
    from kdrl.stages import generate_rollouts, kd_needed, score_rewards, score_teacher
    from kdrl.train import build_optimizer, update_step

    torch.set_num_threads(1)
    P, G = args.shape
    cfg = load_config(args.config, [f"run.method={ARM_METHOD['kdrl']}", *_overrides(args, args.shape, args.runs_dir)])
    _, prompt_ids, _, student_path, teacher_path = _step_prompts(args)
    tokenizer = load_tokenizer(student_path)
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    table = build_prompts(cfg.data, tokenizer)
    train_ids = table.filter(pl.col("split") == "train")["prompt_id"].to_list()
    drawn = table.filter(pl.col("prompt_id").is_in(sample_prompt_ids(train_ids, step=1, count=P, seed=cfg.run.seed)))
    drawn = drawn.sort("prompt_id")
    rows = [ids for ids in drawn["prompt_token_ids"].to_list() for _ in range(G)]
    assert drawn["prompt_token_ids"].to_list() == prompt_ids[P:2 * P]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    engine, scorer = HFRolloutEngine(student, tokenizer), HFTeacherScorer(
        teacher, tokenizer, max_tokens_per_batch=cfg.teacher.max_tokens_per_batch)
    own_optimizer, own_scheduler = build_optimizer(student, cfg.optim, total_steps=args.steps)
    out: dict[str, list[float]] = {k: [] for k in ("generate_s", "teacher_s", "update_s", "own_generate_s",
                                                   "own_rewards_s", "own_teacher_s", "own_update_s")}

    def timed(key, fn):
        start = time.perf_counter()
        result = fn()
        out[key].append(time.perf_counter() - start)
        return result

    for rep in range(args.steps):
        # bare transformers
        student.eval()
        torch.manual_seed(rep)
        with torch.no_grad():
            seq = timed("generate_s", lambda: student.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=cfg.rollout.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id))
        completion = seq[:, width:]
        done = (completion == tokenizer.eos_token_id).cumsum(1)
        cmask = ((done == 0) | ((done == 1) & (completion == tokenizer.eos_token_id))).long()
        full_mask = torch.cat([mask, cmask], 1)
        keep = completion.shape[1]

        def bare_teacher():
            with torch.no_grad():
                logits = teacher(input_ids=seq, attention_mask=full_mask, logits_to_keep=keep + 1).logits[:, :-1]
                return torch.log_softmax(logits.float(), -1).gather(-1, completion[..., None]).squeeze(-1).tolist()

        def bare_update():
            student.train()
            n_tokens = cmask.sum()
            for lo in range(0, len(rows), MICRO_BATCH):
                sl = slice(lo, lo + MICRO_BATCH)
                logits = student(input_ids=seq[sl], attention_mask=full_mask[sl],
                                 logits_to_keep=keep + 1).logits[:, :-1]
                logp = torch.log_softmax(logits.float(), -1).gather(-1, completion[sl, :, None]).squeeze(-1)
                (-(logp * cmask[sl]).sum() / n_tokens).backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        timed("teacher_s", bare_teacher)
        timed("update_s", bare_update)
        # kdrl's own stage functions on the same prompts
        rollouts = timed("own_generate_s", lambda: generate_rollouts(
            engine, drawn, step=1, n=G, max_new_tokens=cfg.rollout.max_new_tokens, temperature=1.0, seed=rep))
        rewards = timed("own_rewards_s", lambda: score_rewards(rollouts, drawn, cfg.reward))
        scores = timed("own_teacher_s", lambda: score_teacher(scorer, rollouts, kd_needed(rollouts, rewards, cfg.loss),
                                                              top_k=cfg.teacher.top_k))
        batch = collate(join_step_tables(rollouts, rewards, scores), pad_token_id=tokenizer.pad_token_id)
        timed("own_update_s", lambda: update_step(student, own_optimizer, own_scheduler, batch, loss_cfg=cfg.loss,
                                                  optim_cfg=cfg.optim, optimizer_step=rep))
    return {key: values[1:] for key, values in out.items()} | {"tokens": int(cmask.sum())}


WORKERS = {"kdrl": worker_kdrl, "grpo": worker_kdrl, "flow_kdrl": worker_kdrl, "trl_kd": worker_trl,
           "trl_grpo": worker_trl, "floor": worker_floor}


# ------------------------------------------------------------------------------------------ driver


def _run_arm(arm: str, shape: tuple[int, int], args: argparse.Namespace, scratch: Path) -> dict:
    out = scratch / f"{arm}-{shape[0]}x{shape[1]}-{time.time_ns()}.json"
    argv = [sys.executable, __file__, "--worker", arm, "--shapes", f"{shape[0]}x{shape[1]}", "--steps",
            str(args.steps), *([] if args.max_new_tokens is None else ["--max-new-tokens", str(args.max_new_tokens)]),
            "--runs-dir", str(scratch / "runs"),
            "--out", str(out), *(["--config", args.config] if args.config else [])]
    for item in args.overrides:
        argv += ["--set", item]
    env = _env() | {"BENCH_T0": repr(time.time()), "PREFECT_HOME": str(scratch / "prefect-home")}
    done = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)
    if done.returncode != 0:
        sys.exit(f"arm {arm} {shape} failed:\n{done.stdout[-6000:]}")
    return json.loads(out.read_text())


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["16x8", "32x8", "64x8"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="steps per run (the first and last are not timed)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's (48)")
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--no-flow", action="store_true", help="skip the Prefect flow arm")
    parser.add_argument("--no-floors", action="store_true")
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--runs-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.shape = tuple(int(x) for x in args.shapes[0].split("x"))

    if args.worker:
        t0 = float(os.environ["BENCH_T0"])
        args.arm = args.worker
        result = WORKERS[args.worker](args, t0)
        Path(args.out).write_text(json.dumps(result))
        return

    scratch = Path(tempfile.mkdtemp(prefix="kdrl-bench-trl-"))
    print(f"scratch {scratch}; {args.reps} reps x {args.steps} steps; steps 1..{args.steps - 2} timed; "
          f"max_new_tokens {args.max_new_tokens or 'from the config'}; 1 torch thread", flush=True)
    # Caches first: an embedded warm start is minutes, the baseline evaluation seconds; neither
    # may land inside a timed run (every timed kdrl run starts as a user's second run does).
    warm = argparse.Namespace(**{**vars(args), "steps": 3})
    _run_arm("kdrl", tuple(int(x) for x in args.shapes[0].split("x")), warm, scratch)
    rows = []
    for text in args.shapes:
        shape = tuple(int(x) for x in text.split("x"))
        arms = [arm for pair in args.pairs for arm in PAIRS[pair]] + ([] if args.no_flow else ["flow_kdrl"])
        results: dict[str, list[dict]] = {arm: [] for arm in arms}
        for rep in range(args.reps):
            for arm in arms:  # A B A B: every pair alternates within each repetition
                results[arm].append(_run_arm(arm, shape, args, scratch))
                r = results[arm][-1]
                print(f"  {text} rep {rep} {arm}: step {statistics.median(r['step_s']):.2f} s, start-up "
                      f"{r['startup_s']:.1f} s, tokens/step {statistics.mean(r['tokens']):.0f}", flush=True)
        floor = None if args.no_floors else _run_arm("floor", shape, args, scratch)
        rows.append((text, results, floor))
    _report(rows, args)


def _report(rows, args) -> None:
    print("\n| shape | pair | kdrl s/step | TRL s/step | kdrl / TRL (per rep) | tokens/step kdrl / TRL "
          "| start-up kdrl / TRL s |")
    print("|---|---|---|---|---|---|---|")
    for text, results, floor in rows:
        for pair in args.pairs:
            a, b = PAIRS[pair]
            sa = [statistics.median(r["step_s"]) for r in results[a]]
            sb = [statistics.median(r["step_s"]) for r in results[b]]
            ratios = [x / y for x, y in zip(sa, sb)]
            ta = statistics.mean(t for r in results[a] for t in r["tokens"])
            tb = statistics.mean(t for r in results[b] for t in r["tokens"])
            ua = [r["startup_s"] for r in results[a]]
            ub = [r["startup_s"] for r in results[b]]
            print(f"| {text} | {a} / {b} | {_fmt(sa)} | {_fmt(sb)} | **{statistics.median(ratios):.2f}** "
                  f"({', '.join(f'{x:.2f}' for x in ratios)}) | {ta:.0f} / {tb:.0f} ({ta / tb - 1:+.1%}) "
                  f"| {statistics.median(ua):.1f} / {statistics.median(ub):.1f} |")
        if "flow_kdrl" in results:
            sf = [statistics.median(r["step_s"]) for r in results["flow_kdrl"]]
            uf = [r["startup_s"] for r in results["flow_kdrl"]]
            print(f"| {text} | flow_kdrl (Prefect) | {_fmt(sf)} | | | | {statistics.median(uf):.1f} |")
    if any(floor for _, _, floor in rows):
        print("\n| shape | bare generate / teacher / update s | kdrl's own generate / rewards / teacher / update s "
              "| kdrl step / own floor | grpo step / own floor (no teacher) | kdrl step / bare floor |")
        print("|---|---|---|---|---|---|")
        for text, results, floor in rows:
            if not floor:
                continue
            m = {key: statistics.median(values) for key, values in floor.items() if key != "tokens"}
            bare = m["generate_s"] + m["teacher_s"] + m["update_s"]
            own = m["own_generate_s"] + m["own_rewards_s"] + m["own_teacher_s"] + m["own_update_s"]

            def over(arm: str, floor_s: float) -> str:
                if not results.get(arm):
                    return "–"
                return f"{statistics.median(statistics.median(r['step_s']) for r in results[arm]) / floor_s:.2f}"

            print(f"| {text} | {m['generate_s']:.2f} / {m['teacher_s']:.2f} / {m['update_s']:.2f} "
                  f"| {m['own_generate_s']:.2f} / {m['own_rewards_s']:.2f} / {m['own_teacher_s']:.2f} / "
                  f"{m['own_update_s']:.2f} | {over('kdrl', own)} | {over('grpo', own - m['own_teacher_s'])} "
                  f"| {over('kdrl', bare)} |")

if __name__ == "__main__":
    main()
