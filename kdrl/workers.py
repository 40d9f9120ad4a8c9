"""What stays resident between stages, split by role: the student being trained, the rollout
engine, the teacher. Each is a small object with explicit methods; nothing happens on
attribute access. `load_run` builds all three for a run directory (resuming after its latest
checkpoint) and writes the run's config and prompts table.

    Student  — model, optimizer, LR schedule, counters: update(), save(), restore()
    Rollout  — samples from the student: generate(), sync(), sleep(), logprob_gap()
    Teacher  — scores and samples: scorer(), sampler(), release(), identity()

Engines are built on first use (an SFT run never samples from its student), always through
`kdrl.engines.factory.build_engine`, and once: the rollout engine lives until `close`.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kdrl.config import RunConfig, dump_config, load_config
from kdrl.data import build_prompts, run_prompt_limit
from kdrl.distributed import DataParallel, shard_model
from kdrl.embedded import resolve_model_path
from kdrl.engines.base import RolloutEngine, SyncedEngine, TeacherScorer
from kdrl.engines.factory import EngineSpec, build_engine
from kdrl.engines.hf import HFTeacherScorer, check_same_tokenizer
from kdrl.engines.select import EngineChoice, choose_engine, count_parameters
from kdrl.handoff import Artifact, RunInfo
from kdrl.models import load_causal_lm, load_tokenizer, resolve_device
from kdrl.prompts import check_same_rendering, warn_if_chat_model
from kdrl.runs import latest_checkpoint
from kdrl.storage import RunPaths, read_table, write_table
from kdrl.train import (
    UpdateResult,
    build_optimizer,
    gather_states,
    load_sharded_state,
    load_trainer_state,
    save_checkpoint,
    sharded_logprobs,
    update_step,
)

if TYPE_CHECKING:
    from kdrl.cluster import RayCluster
    from kdrl.engines.vllm import VLLMRolloutEngine

Log = Callable[[str], None]


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def model_identity(path: str) -> str:
    """What a cached result of a model depends on: its folder's config, weight and tokenizer files
    (names, sizes, mtimes), or the hub name."""
    root = Path(path)
    if not root.exists():
        return path
    suffixes = {".json", ".safetensors", ".bin", ".model", ".txt", ".jinja"}
    files = sorted(p for p in root.iterdir() if p.suffix in suffixes)
    listing = [str(root.resolve()), [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:32]


class Student:
    """The policy being trained: its model, tokenizer, optimizer and LR schedule, and how far it
    got (`optimizer_step`; `next_step`, the first iteration still to run). With `dp`, one rank of a
    data-parallel trainer (`kdrl.cluster.TrainerRank`): `update` takes this rank's share."""

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, tokenizer, path: str, *,
                 dp: DataParallel | None = None) -> None:
        self.cfg, self.model, self.tokenizer, self.path, self.dp = cfg, model, tokenizer, path, dp
        self.optimizer, self.scheduler = build_optimizer(model, cfg.optim, cfg.run.steps * cfg.loss.ppo_epochs)
        self.optimizer_step = 0
        self.next_step = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def sharded(self) -> bool:
        return self.dp is not None and self.dp.sharded

    def distribute(self, dp: DataParallel, device: torch.device | None = None) -> None:
        """Become one rank of a data-parallel trainer (before any update or restore). With
        trainer.strategy "fsdp2", shard the model onto `device` (`kdrl.distributed.shard_model`)
        and rebuild the optimizer over the shards."""
        self.dp = dp
        if self.cfg.trainer.sharded:
            shard_model(self.model, sharded_logprobs, device)
            dp.sharded = True
            self.optimizer, self.scheduler = build_optimizer(self.model, self.cfg.optim,
                                                             self.cfg.run.steps * self.cfg.loss.ppo_epochs)

    def restore(self, checkpoint: Path) -> int:
        """Load a checkpoint's weights, optimizer, schedule and RNG; returns its step."""
        load = functools.partial(load_sharded_state, dp=self.dp) if self.sharded else load_trainer_state
        state = load(checkpoint, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        self.optimizer_step, self.next_step = state["optimizer_step"], state["step"] + 1
        return state["step"]

    def update(self, batch) -> UpdateResult:
        """One optimizer step per PPO epoch on a collated batch (`kdrl.train.update_step`)."""
        result = update_step(self.model, self.optimizer, self.scheduler, batch.to(self.device), loss_cfg=self.cfg.loss,
                             optim_cfg=self.cfg.optim, optimizer_step=self.optimizer_step,
                             temperature=self.cfg.rollout.temperature, dp=self.dp)
        self.optimizer_step += self.cfg.loss.ppo_epochs
        return result

    def save(self, path: Path, step: int) -> Path:
        """Weights, tokenizer and trainer state after iteration `step` (resumable). A sharded
        rank takes part in gathering them; rank 0 writes."""
        states = gather_states(self.model, self.optimizer) if self.sharded else None
        if states is None or self.dp.rank == 0:  # type: ignore[union-attr]
            save_checkpoint(path, model=self.model, tokenizer=self.tokenizer, optimizer=self.optimizer,
                            scheduler=self.scheduler, step=step, optimizer_step=self.optimizer_step, sharded=states)
        return path


class Rollout:
    """Samples from the student. HF runs on the student's own module; vLLM holds a copy of the
    weights, which `sync` refreshes after every update (and `engine` before any use that finds
    it stale: a resumed run, an engine first built after some updates)."""

    def __init__(self, spec: EngineSpec, student: Student, *, log: Log = print) -> None:
        self.spec, self.student, self.log = spec, student, log
        self._engine: RolloutEngine | None = None
        self._synced_at = 0  # the optimizer step whose weights the engine holds

    @property
    def kind(self) -> str:
        return self.spec.kind

    def engine(self) -> RolloutEngine:
        """The engine, built on first call, holding the student's current weights."""
        if self._engine is None:
            self._engine = build_engine(self.spec, self.student.tokenizer, module=self.student.model, log=self.log)
            self._synced_at = 0 if self.kind == "vllm" else self.student.optimizer_step  # vLLM: the initial weights
        if self._synced_at != self.student.optimizer_step:
            self.sync()
        return self._engine

    def sync(self) -> float | None:
        """Push the student's weights into a built vLLM engine; seconds (None: nothing to do,
        the engine is HF or not built yet)."""
        seconds = None
        if self._engine is not None and self.kind == "vllm":
            seconds = self._engine.sync_weights()
        self._synced_at = self.student.optimizer_step
        return seconds

    def sleep(self) -> None:
        """vLLM with sleep mode: give the accelerator back to the trainer until the next use."""
        if self._engine is not None:
            self._engine.sleep()

    def logprob_gap(self, prompt_token_ids: list[list[int]],
                    completion_token_ids: list[list[int]]) -> tuple[float, float]:
        """(max, mean) |log π_vLLM − log π_trainer| of the given sequences (vLLM only)."""
        engine = self.engine()
        if self.kind != "vllm":
            raise ValueError("the HF rollout engine runs on the trainer's own module: there is no gap to measure")
        synced: SyncedEngine = engine  # type: ignore[assignment]  (a vLLM engine)
        return synced.logprob_gap(prompt_token_ids, completion_token_ids)

    def close(self) -> None:
        self._engine = None


class Teacher:
    """The teacher: scores the student's completions and samples (SFT data, the baseline). With
    `teacher.offload`, `release` frees its memory between uses (HF: unloaded; vLLM: asleep)."""

    def __init__(self, cfg: RunConfig, path: str, tokenizer, spec: EngineSpec, *, log: Log = print) -> None:
        self.cfg, self.path, self.tokenizer, self.spec, self.log = cfg, path, tokenizer, spec, log
        self._model: torch.nn.Module | None = None
        self._vllm: VLLMRolloutEngine | None = None

    @property
    def kind(self) -> str:
        return self.spec.kind

    def identity(self) -> str:
        """What a cached teacher score depends on (`model_identity`)."""
        return model_identity(self.path)

    def _hf_model(self) -> torch.nn.Module:
        if self._model is None:
            self._model = load_causal_lm(self.path, dtype=self.cfg.teacher.dtype, device=self.cfg.teacher.device)
        return self._model

    def _vllm_engine(self) -> VLLMRolloutEngine:
        if self._vllm is None:  # scored through its `llm` (VLLMTeacherScorer): a vLLM engine, not any RolloutEngine
            self._vllm = build_engine(self.spec, self.tokenizer, log=self.log, name="teacher")  # type: ignore[assignment]
        self._vllm.wake()
        return self._vllm

    def scorer(self) -> TeacherScorer:
        """Scores completions under the teacher, on the configured engine."""
        if self.kind == "vllm":
            from kdrl.engines.vllm import VLLMTeacherScorer

            return VLLMTeacherScorer(self._vllm_engine().llm)
        return HFTeacherScorer(self._hf_model(), self.tokenizer,
                               max_tokens_per_batch=self.cfg.teacher.max_tokens_per_batch)

    def sampler(self) -> RolloutEngine:
        """Samples from the teacher, on the configured engine."""
        if self.kind == "vllm":
            return self._vllm_engine()
        return build_engine(self.spec, self.tokenizer, module=self._hf_model())

    def release(self) -> None:
        """With `teacher.offload`: drop the HF teacher from memory, or put a vLLM teacher to sleep
        (a no-op where the engine cannot sleep: CPU)."""
        if not self.cfg.teacher.offload:
            return
        if self._vllm is not None:
            self._vllm.sleep()
        if self._model is not None:
            self._model = None
            _free_memory()

    def close(self) -> None:
        self._model = self._vllm = None


def engine_specs(cfg: RunConfig, *, student_path: str, teacher_path: str | None,
                 rollout: EngineChoice, teacher: EngineChoice) -> tuple[EngineSpec, EngineSpec | None]:
    """The rollout and teacher engines of a run, from its config sections."""
    rollout_spec = EngineSpec(rollout.engine, student_path, cfg.model.dtype, cfg.rollout.vllm, cfg.rollout.batch_size,
                              cfg.run.seed)
    if teacher_path is None:
        return rollout_spec, None
    return rollout_spec, EngineSpec(teacher.engine, teacher_path, cfg.teacher.dtype, cfg.teacher.vllm,
                                    cfg.rollout.batch_size, cfg.run.seed, max_logprobs=cfg.teacher.top_k)


def resolve_engines(cfg: RunConfig, *, student_params: int | Callable[[], int],
                    teacher_path: str | None) -> tuple[EngineChoice, EngineChoice]:
    """The engines of the rollout and teacher stages (see `kdrl.engines.select`)."""
    from kdrl.engines.vllm import VLLMSettings, vllm_available

    installed = vllm_available()
    rollout = choose_engine(cfg.rollout.engine, field="rollout.engine",
                            num_params=student_params,
                            device=resolve_device(cfg.model.device).type, vllm_installed=installed)
    if teacher_path is None:
        return rollout, EngineChoice("hf", "no teacher")
    sleeps = VLLMSettings.from_config(cfg.teacher.vllm, model_dtype=cfg.teacher.dtype).sleeps
    teacher = choose_engine(cfg.teacher.engine, field="teacher.engine",
                            num_params=lambda: count_parameters(teacher_path),
                            device=resolve_device(cfg.teacher.device).type, vllm_installed=installed,
                            must_release=cfg.teacher.offload and not sleeps)
    return rollout, teacher


class OpenRun:
    """A run opened in this process: where it writes and with which config (`info`), the three
    resident workers and its prompts table. A plain class (not a dataclass): Prefect passes it between
    tasks as it is, without walking into its models."""

    def __init__(self, info: RunInfo, student: Student, rollout: Rollout, teacher: Teacher | None,
                 prompts: Artifact, *, cluster: RayCluster | None = None) -> None:
        self.info, self.student, self.rollout, self.teacher, self.prompts = info, student, rollout, teacher, prompts
        self.cluster = cluster

    @property
    def start(self) -> int:
        """The first step still to run (after the latest checkpoint)."""
        return self.student.next_step

    def close(self) -> None:
        """Free the engines and the teacher now, all together. vLLM engines sit in reference
        cycles, so without the explicit collection they would be freed at some later gc pass,
        possibly while the next run's engines live, which breaks those (vLLM's shared parallel
        state)."""
        self.rollout.close()
        if self.teacher is not None:
            self.teacher.close()
        if self.cluster is not None:  # stops the actors (and a local Ray this run started)
            self.cluster.close()
        _free_memory()


def _check_run_config(cfg: RunConfig, paths: RunPaths) -> None:
    if paths.config.exists():
        if paths.config.read_text() == dump_config(cfg):  # the usual resume: nothing to parse
            return
        existing = load_config(paths.config, check_objective=False)  # as it was written, even if refused today
        if existing.hash() != cfg.hash():
            raise ValueError(
                f"{paths.root} was started with another config (hash {existing.hash()}, now {cfg.hash()}); "
                "use a new --run-id, or `kdrl replay` for counterfactual updates"
            )
    else:
        paths.root.mkdir(parents=True, exist_ok=True)
        paths.config.write_text(dump_config(cfg))


def load_student_model(cfg: RunConfig, path: str) -> torch.nn.Module:
    """The student's module as the trainer holds it: loaded in model.dtype on model.device, with
    gradient checkpointing and a LoRA adapter when configured."""
    model = load_causal_lm(path, dtype=cfg.model.dtype, device=cfg.model.device)
    if cfg.model.gradient_checkpointing:  # recompute each layer in backward (generation, in eval mode, keeps its cache)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.lora is not None:  # train an adapter instead of every weight (kdrl.lora)
        from kdrl.lora import apply_lora

        model = apply_lora(model, cfg.model.lora, seed=cfg.run.seed)
    return model


def open_prompts(cfg: RunConfig, paths: RunPaths, tokenizer, student_config, student_path: str,
                 teacher_path: str | None) -> Artifact:
    """The run's prompts table: read back, or built and written (after the checks that may refuse
    the run: the teacher's tokenizer and chat rendering must be the student's)."""
    if teacher_path is not None:
        teacher_tokenizer = load_tokenizer(teacher_path)
        check_same_tokenizer(tokenizer, teacher_tokenizer)
    warn_if_chat_model(cfg.data, tokenizer, student_path)
    if paths.prompts.exists():
        prompts = read_table(paths.prompts, table="prompts")
    else:
        limit = run_prompt_limit(cfg, student_config, tokenizer, teacher=teacher_path)
        prompts = build_prompts(cfg.data, tokenizer, max_prompt_tokens=limit)
    if teacher_path is not None:  # before the prompts are written: a refused run leaves no prompts table
        check_same_rendering(cfg.data, prompts["question"].to_list(), prompts["prompt_token_ids"].to_list(),
                             tokenizer, teacher_tokenizer)
    if not paths.prompts.exists():
        write_table(prompts, paths.prompts, table="prompts", metadata={"kdrl.config_hash": cfg.hash()})
    return Artifact.of(paths.prompts)


def run_metadata(cfg: RunConfig, paths: RunPaths, rollout: EngineChoice, teacher: EngineChoice) -> dict[str, str]:
    """What every Parquet file of the run carries (config hash, run id, engines)."""
    return {"kdrl.config_hash": cfg.hash(), "kdrl.run_id": paths.root.name,
            "kdrl.rollout_engine": rollout.engine, "kdrl.teacher_engine": teacher.engine}


def load_run(cfg: RunConfig, run_dir: str | Path, *, log: Log = print) -> OpenRun:
    """Load the student (training embedded models on first use), build the optimizer, write the
    config and the prompts table if missing, and resume after the latest checkpoint if any. With
    cluster.backend "ray", the roles are Ray worker groups instead (`kdrl.cluster.open_ray_run`)."""
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)  # nothing of ours draws from it, but checkpoints store its state: same run, same bytes
    paths = RunPaths(Path(run_dir))
    student_path = resolve_model_path(cfg.model.name_or_path, cfg, log=log)
    teacher_path = resolve_model_path(cfg.teacher.name_or_path, cfg, log=log) if cfg.loads_teacher else None
    if cfg.cluster.backend == "ray":
        from kdrl.cluster import open_ray_run

        return open_ray_run(cfg, paths, student_path, teacher_path, log=log)
    from kdrl.memory import (
        check_memory,  # before any weights load and the run folder is written: a refused run can change its config
    )

    check_memory(cfg, student_path, teacher_path, run_dir=paths.root, log=log)
    _check_run_config(cfg, paths)
    tokenizer = load_tokenizer(student_path)
    model = load_student_model(cfg, student_path)
    prompts = open_prompts(cfg, paths, tokenizer, model.config, student_path, teacher_path)
    student = Student(cfg, model, tokenizer, student_path)
    rollout_choice, teacher_choice = resolve_engines(cfg, student_params=sum(p.numel() for p in model.parameters()),
                                                     teacher_path=teacher_path)
    log(f"[kdrl] engines: rollout {rollout_choice.engine} ({rollout_choice.reason}); "
        f"teacher {teacher_choice.engine} ({teacher_choice.reason})")
    rollout_spec, teacher_spec = engine_specs(cfg, student_path=student_path, teacher_path=teacher_path,
                                              rollout=rollout_choice, teacher=teacher_choice)
    teacher = None if teacher_path is None else Teacher(cfg, teacher_path, tokenizer, teacher_spec, log=log)
    resumed = latest_checkpoint(paths)
    if resumed is not None:
        student.restore(paths.checkpoint(resumed))
        log(f"[kdrl] resuming {paths.root} after step {resumed}")
    return OpenRun(RunInfo(str(paths.root), cfg, run_metadata(cfg, paths, rollout_choice, teacher_choice)), student,
                   Rollout(rollout_spec, student, log=log), teacher, prompts)
