"""Scale-out on Ray (`cluster.backend: ray`): the three roles of `kdrl.workers` as Ray actor
groups, driven by the process that runs the flow (the controller).

    controller (the flow, or --no-prefect)             Ray actors
    RayStudent.update(batch)  ── whole prompt groups ──▶  TrainerRank × trainer.world_size
                                                          (torch.distributed: gloo / NCCL)
    RayRollout.sync()  ── rank 0's weights, object store ─▶ RolloutReplica × rollout.replicas
    RayRollout.engine().generate(prompts) ── shards ───▶  RolloutReplica (HF or vLLM engine)
    RayTeacher.scorer().score(rows) ── row shards ─────▶  TeacherReplica × teacher.replicas

The role objects here are the local ones' subclasses with the same methods, so `kdrl.pipeline`
and the flow run unchanged against either backend: a stage calls its role, the role sends the
work to its actors and concatenates their answers in key order. The controller reads and writes
every Parquet file; trainer rank 0 writes the checkpoints and every rank reads them on resume,
so across nodes the run directory (and the model folders) must be on storage all nodes mount.

Equal results: rollouts are split at the HF engine's generation-chunk boundaries with each
chunk's own seed (`kdrl.engines.hf.chunk_seed`), so they are the same for any number of
replicas; teacher scores are per row; the trainer's update equals one process's to float rounding
(`kdrl.distributed`). An actor that dies fails the stage with `WorkerLost`; nothing of that
stage is written, and rerunning the command resumes the run.
"""

from __future__ import annotations

import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdrl.config import ClusterConfig, Resources, RunConfig
from kdrl.distributed import DataParallel, full_state_dict, group_shards
from kdrl.engines.base import check_generate_args, check_score_args
from kdrl.engines.factory import EngineSpec, build_engine
from kdrl.engines.hf import HFTeacherScorer, chunk_seed
from kdrl.handoff import RunInfo
from kdrl.models import load_causal_lm, load_tokenizer, resolve_device
from kdrl.runs import latest_checkpoint
from kdrl.storage import RunPaths
from kdrl.train import UpdateResult
from kdrl.types import Rollouts, TeacherScores
from kdrl.workers import (
    OpenRun,
    Rollout,
    Student,
    Teacher,
    _check_run_config,
    engine_specs,
    load_student_model,
    open_prompts,
    resolve_engines,
    run_metadata,
)

Log = Callable[[str], None]
READY_TIMEOUT_S = 900.0
"""How long the actors of a run may take to be placed and load their models."""


class WorkerLost(RuntimeError):
    """A Ray actor of the run died (killed, out of memory, its node lost) during a stage. Nothing
    of that stage was written; rerunning the same command resumes the run."""


# ---------------------------------------------------------------------------------------------
# The connection


_REAPER = r"""
import os, shutil, signal, sys, time
root, controller = sys.argv[1].encode(), int(sys.argv[2])
sys.stdin.buffer.read()  # EOF: the controller closed the pipe or died (kill -9 included)

def ours():  # named on the command line, or holding a file open under the folder (renamed agents, workers)
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in (os.getpid(), controller):  # the controller holds Ray's log files
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    mine = root in f.read()
                fds = f"/proc/{name}/fd"
                mine = mine or any(os.readlink(f"{fds}/{fd}").encode().startswith(root) for fd in os.listdir(fds))
            except OSError:
                continue
            if mine:
                yield int(name)

for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
    pids = list(ours())
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.time() + wait
    while pids and time.time() < deadline and list(ours()):
        time.sleep(0.1)
shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


class RayCluster:
    """This run's connection to Ray: a cluster it joined (`cluster.address`), or a local one it
    started for the run, which `close` stops. A local cluster's processes all carry the run's
    own temp folder on their command line; a reaper process removes every one of them when the
    controller closes it or dies (kill -9 included), so a crash leaves no Ray process behind
    (those Ray renames, e.g. ``ray::DashboardAgent``, are found by the files they hold open there)."""

    def __init__(self, *, connected: bool, reaper: subprocess.Popen | None = None) -> None:
        self.connected, self.reaper = connected, reaper  # connected: this run called ray.init

    @classmethod
    def connect(cls, cfg: ClusterConfig, *, cpus_needed: float = 0.0, log: Log = print) -> RayCluster:
        try:
            import ray
        except ImportError:
            raise ValueError("cluster.backend='ray' needs Ray: pip install 'kdrl[ray]' "
                             "(or cluster.backend='local')") from None
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a run sends nothing anywhere
        if ray.is_initialized():  # e.g. a notebook that called ray.init: use it, leave it running
            log("[kdrl] ray: using the Ray this process is already connected to")
            return cls(connected=False)
        if cfg.address:
            env = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "TRANSFORMERS_", "TOKENIZERS_"))}
            ray.init(address=cfg.address, runtime_env={"env_vars": env} if env else None, log_to_driver=True)
            log(f"[kdrl] ray: joined {cfg.address} ({_describe(ray.cluster_resources())})")
            return cls(connected=True)
        # /tmp, short: Ray's unix sockets live under it (paths of at most 107 bytes)
        root = tempfile.mkdtemp(prefix="kdrl-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
        reaper = None
        if sys.platform.startswith("linux"):
            reaper = subprocess.Popen([sys.executable, "-c", _REAPER, root, str(os.getpid())], stdin=subprocess.PIPE,
                                      start_new_session=True)  # a Ctrl-C of the controller must not stop it first
        num_cpus = cfg.num_cpus or max(os.cpu_count() or 1, math.ceil(cpus_needed))
        started = time.perf_counter()
        try:
            # "local": a new instance even when `ray start` left one on this machine
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _temp_dir=root, log_to_driver=True)
        except BaseException:
            cls(connected=True, reaper=reaper).close()
            raise
        log(f"[kdrl] ray: started a local Ray with {num_cpus} logical CPUs in {time.perf_counter() - started:.1f}s "
            f"(stopped when the run ends; files under {root})")
        return cls(connected=True, reaper=reaper)

    def close(self) -> None:
        """Disconnect (a Ray this process was already connected to is left as it was); a cluster
        this run started is stopped and none of its processes is left."""
        import ray

        if self.connected and ray.is_initialized():
            ray.shutdown()
        if self.reaper is not None:
            self.reaper.stdin.close()
            try:
                self.reaper.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.reaper.kill()
            self.reaper = None


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(k, 0):g} {k}" for k in ("CPU", "GPU"))


# ---------------------------------------------------------------------------------------------
# The actors (plain classes: `ray.remote` wraps them when a run starts)


def _set_threads(num_cpus: float) -> None:
    torch.set_num_threads(max(1, int(num_cpus)))


class TrainerRank:
    """One data-parallel rank: a whole `Student` (model, optimizer, schedule) updating on its
    share of each batch; rank 0 writes the checkpoints and serves the weights to the replicas."""

    def __init__(self, cfg: RunConfig, student_path: str, rank: int, world_size: int) -> None:
        _set_threads(cfg.trainer.resources.num_cpus)
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        self.rank, self.world_size = rank, world_size
        self.device = resolve_device(cfg.model.device)
        load = cfg
        if cfg.trainer.sharded:  # on the CPU: only this rank's shard goes to the device
            load = cfg.model_copy(update={"model": cfg.model.model_copy(update={"device": "cpu"})})
        self.student = Student(cfg, load_student_model(load, student_path), load_tokenizer(student_path), student_path)

    def pid(self) -> int:
        return os.getpid()

    def rendezvous(self) -> str:
        """Rank 0: the address the others join it at (this node, a free port)."""
        ip = _node_ip()
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ip}:{port}"

    def join(self, init_method: str) -> None:
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.student.distribute(DataParallel.join(rank=self.rank, world_size=self.world_size,
                                                  init_method=init_method, backend=backend), self.device)

    def restore(self, checkpoint: str) -> tuple[int, int]:
        """(step, optimizer step) of the checkpoint, now loaded."""
        step = self.student.restore(Path(checkpoint))
        return step, self.student.optimizer_step

    def update(self, batch) -> UpdateResult:
        result = self.student.update(batch)
        return UpdateResult({k: float(v) for k, v in result.metrics.items()}, result.advantages_B.cpu(),
                            result.kd_mask_B.cpu(), result.student_logp_BT.cpu(), result.kd_per_token_BT.cpu())

    def save(self, path: str, step: int) -> str:
        """DDP: rank 0 writes (every rank holds the same state). FSDP2: every rank is called (the
        state is gathered to rank 0, which writes)."""
        if self.rank == 0 or self.student.sharded:
            self.student.save(Path(path), step)
        return path

    def weights(self) -> dict[str, torch.Tensor]:
        """The whole weights (FSDP2: gathered to rank 0, every rank called; the others get {})."""
        return full_state_dict(self.student.model)

    def score(self, prompt_token_ids: list[list[int]], completion_token_ids: list[list[int]]) -> list[list[float]]:
        """The trainer's log-probs of given completions (the weight-sync check; FSDP2: every rank
        is called with the same sequences, their forwards gather the weights together)."""
        scorer = HFTeacherScorer(self.student.model, self.student.tokenizer)
        return scorer.score(prompt_token_ids, completion_token_ids).logprobs

    def close(self) -> None:
        if self.student.dp is not None:
            self.student.dp.close()


class RolloutReplica:
    """An engine (HF or vLLM) on this actor's own copy of the student's weights."""

    def __init__(self, cfg: RunConfig, spec: EngineSpec) -> None:
        _set_threads(cfg.rollout.resources.num_cpus)
        self.tokenizer = load_tokenizer(spec.model_path)
        self.model = load_causal_lm(spec.model_path, dtype=cfg.model.dtype, device=cfg.model.device)
        self.engine = build_engine(spec, self.tokenizer, module=self.model)
        self.kind = spec.kind

    def pid(self) -> int:
        return os.getpid()

    def generate(self, prompt_token_ids: list[list[int]], **sampling: Any) -> Rollouts:
        return self.engine.generate(prompt_token_ids, **sampling)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(weights)
        if self.kind == "vllm":
            self.engine.sync_weights()

    def score(self, prompt_token_ids: list[list[int]], completion_token_ids: list[list[int]]) -> list[list[float]]:
        """The engine's log-probs of given completions (the weight-sync check)."""
        if self.kind == "vllm":
            from kdrl.engines.vllm import VLLMTeacherScorer

            self.engine.wake()
            return VLLMTeacherScorer(self.engine.llm).score(prompt_token_ids, completion_token_ids).logprobs
        return HFTeacherScorer(self.model, self.tokenizer).score(prompt_token_ids, completion_token_ids).logprobs

    def sleep(self) -> None:
        self.engine.sleep()


class TeacherReplica:
    """A `Teacher` in an actor: scores rows and samples prompts on its engine."""

    def __init__(self, cfg: RunConfig, path: str, spec: EngineSpec) -> None:
        _set_threads(cfg.teacher.resources.num_cpus)
        self.teacher = Teacher(cfg, path, load_tokenizer(path), spec)

    def pid(self) -> int:
        return os.getpid()

    def score(self, prompt_token_ids: list[list[int]], completion_token_ids: list[list[int]],
              top_k: int) -> TeacherScores:
        return self.teacher.scorer().score(prompt_token_ids, completion_token_ids, top_k=top_k)

    def generate(self, prompt_token_ids: list[list[int]], **sampling: Any) -> Rollouts:
        return self.teacher.sampler().generate(prompt_token_ids, **sampling)

    def release(self) -> None:
        self.teacher.release()


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


# ---------------------------------------------------------------------------------------------
# Groups of actors, seen from the controller


@dataclass
class ActorGroup:
    """The actors of one role, with their PIDs (for messages and operators)."""

    role: str
    actors: list[Any]
    pids: list[int]

    def get(self, what: str, calls: Sequence[tuple[int, Any]]) -> list[Any]:
        """The results of `calls` ((actor index, ObjectRef) pairs), in order. An actor's death
        becomes `WorkerLost` naming the actor; an exception raised in an actor is raised as is."""
        import ray

        try:
            return ray.get([ref for _, ref in calls])
        except ray.exceptions.RayActorError as err:
            dead = next((i for i, ref in calls if _failed(ref)), calls[0][0] if calls else 0)
            raise WorkerLost(
                f"{self.role} actor {dead} (pid {self.pids[dead]}) died during {what}: "
                f"{str(err).splitlines()[0]} — nothing of this stage was written; rerun the same command to resume "
                "the run") from None

    def call(self, what: str, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """`method(*args, **kwargs)` on every actor, in parallel."""
        return self.get(what, [(i, getattr(a, method).remote(*args, **kwargs)) for i, a in enumerate(self.actors)])


def _failed(ref) -> bool:
    import ray

    try:
        ray.get(ref, timeout=0)
    except ray.exceptions.RayActorError:
        return True
    except Exception:  # noqa: BLE001 (not ready or another error: not the dead actor)
        return False
    return False


def prompt_shards(num_prompts: int, n: int, parts: int, chunk_rows: int | None) -> list[tuple[int, int]]:
    """Contiguous [start, stop) prompt ranges for `parts` replicas. With `chunk_rows` (an HF
    engine's batch size), every range starts on a generation-chunk boundary (start·n a multiple of
    chunk_rows), so each chunk is generated with the rows and seed it has in one call.

    >>> prompt_shards(16, 8, 2, 32), prompt_shards(16, 8, 2, 256)
    ([(0, 8), (8, 16)], [(0, 16), (16, 16)])
    """
    unit = 1 if chunk_rows is None else chunk_rows // math.gcd(n, chunk_rows)
    units = math.ceil(num_prompts / unit)
    return [(min(a * unit, num_prompts), min(b * unit, num_prompts)) for a, b in group_shards(units, parts)]


class ShardedEngine:
    """A `RolloutEngine` over a group's actors: a call's prompts split across them
    (`prompt_shards`), the answers concatenated in prompt order."""

    def __init__(self, group: ActorGroup, *, chunk_rows: int | None, log: Log = print) -> None:
        self.group, self.chunk_rows, self.log = group, chunk_rows, log
        self._warned = False

    def generate(self, prompt_token_ids: list[list[int]], *, n: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0) -> Rollouts:
        check_generate_args(prompt_token_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature)
        shards = prompt_shards(len(prompt_token_ids), n, len(self.group.actors), self.chunk_rows)
        busy = [(i, a, b) for i, (a, b) in enumerate(shards) if b > a]
        if len(busy) < len(shards) and not self._warned:
            self._warned = True
            self.log(f"[kdrl] ray: {len(prompt_token_ids) * n} rows fill {len(busy)} of the {len(shards)} "
                     f"{self.group.role} actors (rows are split at rollout.batch_size={self.chunk_rows} chunks); "
                     "a smaller rollout.batch_size spreads them")
        calls = [(i, self.group.actors[i].generate.remote(
            prompt_token_ids[a:b], n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            seed=seed if self.chunk_rows is None else chunk_seed(seed, a * n // self.chunk_rows)))
            for i, a, b in busy]
        parts = self.group.get("generation", calls)
        return Rollouts(
            prompt_index=[p + a for (_, a, _), part in zip(busy, parts) for p in part.prompt_index],
            **{field: [x for part in parts for x in getattr(part, field)] for field in
               ("sample_index", "prompt_token_ids", "completion_token_ids", "sampler_logprobs", "finish_reason",
                "completion_text")})

    def sync_weights(self) -> None:
        """`RayRollout.sync` pushes the weights (it knows the trainer)."""

    def sleep(self) -> None:
        self.group.call("sleep", "sleep")

    def wake(self) -> None:
        """Replicas wake on their next call."""


class ShardedScorer:
    """A `TeacherScorer` over the teacher actors: rows split in contiguous shards."""

    def __init__(self, group: ActorGroup) -> None:
        self.group = group

    def score(self, prompt_token_ids: list[list[int]], completion_token_ids: list[list[int]], *,
              top_k: int = 0) -> TeacherScores:
        check_score_args(prompt_token_ids, completion_token_ids)
        shards = [(i, a, b) for i, (a, b) in enumerate(group_shards(len(prompt_token_ids), len(self.group.actors)))
                  if b > a]
        parts = self.group.get("teacher scoring", [
            (i, self.group.actors[i].score.remote(prompt_token_ids[a:b], completion_token_ids[a:b], top_k))
            for i, a, b in shards])
        logprobs = [row for part in parts for row in part.logprobs]
        if top_k <= 0:
            return TeacherScores(logprobs=logprobs)
        return TeacherScores(logprobs=logprobs, topk_ids=[r for p in parts for r in p.topk_ids],
                             topk_logprobs=[r for p in parts for r in p.topk_logprobs])


# ---------------------------------------------------------------------------------------------
# The roles, backed by the groups


class RayStudent(Student):
    """The trainer group in the `Student` role: `update` splits the batch by prompt groups over
    the ranks (`kdrl.distributed`), `save`/`restore` go to the ranks. Holds no model here."""

    def __init__(self, cfg: RunConfig, tokenizer, path: str, ranks: ActorGroup) -> None:
        self.cfg, self.tokenizer, self.path, self.ranks = cfg, tokenizer, path, ranks
        self.model, self.dp = None, None
        self.optimizer_step = 0
        self.next_step = 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # the controller's copy of a batch

    def restore(self, checkpoint: Path) -> int:
        step, self.optimizer_step = self.ranks.call("restore", "restore", str(checkpoint))[0]
        self.next_step = step + 1
        return step

    def update(self, batch) -> UpdateResult:
        shards = group_shards(batch.rewards_PG.shape[0], len(self.ranks.actors))
        results = self.ranks.get("the update", [(i, rank.update.remote(batch.groups(a, b)))
                                                for i, (rank, (a, b)) in enumerate(zip(self.ranks.actors, shards))])
        self.optimizer_step += self.cfg.loss.ppo_epochs
        return UpdateResult(results[0].metrics, *(torch.cat([getattr(r, f) for r in results]) for f in
                                                  ("advantages_B", "kd_mask_B", "student_logp_BT", "kd_per_token_BT")))

    @property
    def _collective(self) -> list[int]:
        """The ranks a call that reads the weights goes to: all of them when they are sharded."""
        return list(range(len(self.ranks.actors))) if self.cfg.trainer.sharded else [0]

    def save(self, path: Path, step: int) -> Path:
        self.ranks.get("the checkpoint", [(i, self.ranks.actors[i].save.remote(str(path), step))
                                          for i in self._collective])
        return path

    def weights(self):
        """Rank 0's weights, as an object-store reference the replicas fetch themselves (FSDP2:
        gathered there by every rank; this waits for the others' part)."""
        refs = [self.ranks.actors[i].weights.remote() for i in self._collective]
        if len(refs) > 1:
            self.ranks.get("the weight gathering", list(enumerate(refs))[1:])
        return refs[0]

    def score(self, prompt_token_ids: list[list[int]], completion_token_ids: list[list[int]]):
        """Rank 0's log-probs of the given completions (FSDP2: every rank runs the forward)."""
        return self.ranks.get("the weight-sync check", [(i, self.ranks.actors[i].score.remote(
            prompt_token_ids, completion_token_ids)) for i in self._collective])[0]


class RayRollout(Rollout):
    """The rollout replicas in the `Rollout` role: `engine()` is a `ShardedEngine` over them,
    `sync` sends them rank 0's weights after every update (timed into the step's metrics)."""

    def __init__(self, spec: EngineSpec, student: RayStudent, replicas: ActorGroup, *, log: Log = print) -> None:
        super().__init__(spec, student, log=log)
        self.replicas = replicas
        self._engine = ShardedEngine(replicas, chunk_rows=spec.batch_size if spec.kind == "hf" else None, log=log)
        self._synced_at = 0  # the replicas loaded the initial weights from the model folder

    def engine(self) -> ShardedEngine:
        if self._synced_at != self.student.optimizer_step:
            self.sync()
        return self._engine

    def sync(self) -> float:
        started = time.perf_counter()
        weights = self.student.weights()  # type: ignore[attr-defined]  (a RayStudent)
        self.replicas.call("the weight sync", "load_weights", weights)
        self._synced_at = self.student.optimizer_step
        return time.perf_counter() - started

    def sleep(self) -> None:
        if self.kind == "vllm":
            self._engine.sleep()

    def logprob_gap(self, prompt_token_ids: list[list[int]],
                    completion_token_ids: list[list[int]]) -> tuple[float, float]:
        """(max, mean) |log π_replica − log π_trainer| after the sync: replica 0's engine against
        trainer rank 0, on the given sequences."""
        student: RayStudent = self.student  # type: ignore[assignment]
        ours = self.replicas.get("the weight-sync check", [(0, self.replicas.actors[0].score.remote(
            prompt_token_ids, completion_token_ids))])[0]
        theirs = student.score(prompt_token_ids, completion_token_ids)
        gaps = [abs(a - b) for row_a, row_b in zip(ours, theirs) for a, b in zip(row_a, row_b)]
        return (max(gaps), sum(gaps) / len(gaps)) if gaps else (float("nan"), float("nan"))

    def close(self) -> None:
        self._engine = None


class RayTeacher(Teacher):
    """The teacher replicas in the `Teacher` role (scoring and sampling split across them)."""

    def __init__(self, cfg: RunConfig, path: str, tokenizer, spec: EngineSpec, replicas: ActorGroup, *,
                 log: Log = print) -> None:
        super().__init__(cfg, path, tokenizer, spec, log=log)
        self.replicas = replicas

    def scorer(self) -> ShardedScorer:
        return ShardedScorer(self.replicas)

    def sampler(self) -> ShardedEngine:
        return ShardedEngine(self.replicas, chunk_rows=self.spec.batch_size if self.kind == "hf" else None,
                             log=self.log)

    def release(self) -> None:
        if self.cfg.teacher.offload:
            self.replicas.call("the teacher's release", "release")


# ---------------------------------------------------------------------------------------------
# Opening a run on Ray


def _start(role: str, cls: type, count: int, resources: Resources, args: Callable[[int], tuple], *,
           strategy: Callable[[int], Any] | None = None) -> ActorGroup:
    """`count` actors of `cls` (actor i built from args(i)); they load their models in parallel."""
    import ray

    remote = ray.remote(cls)
    actors = []
    for i in range(count):
        options = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus, "max_restarts": 0}
        if strategy is not None:
            options["scheduling_strategy"] = strategy(i)
        actors.append(remote.options(**options).remote(*args(i)))
    return ActorGroup(role, actors, [])


def wait_ready(*groups: ActorGroup) -> None:
    """Every actor placed and its models loaded (they load in parallel), or a clear error; then a
    trainer group of several ranks joins its torch.distributed group."""
    import ray

    pending = {a.pid.remote(): (g, i) for g in groups for i, a in enumerate(g.actors)}
    for g in groups:
        g.pids = [0] * len(g.actors)
    ready, waiting = ray.wait(list(pending), num_returns=len(pending), timeout=READY_TIMEOUT_S)
    if waiting:
        missing = sorted({pending[r][0].role for r in waiting})
        raise ValueError(f"ray: the {', '.join(missing)} actors were not ready after {READY_TIMEOUT_S:.0f}s: "
                         f"the cluster has {_describe(ray.available_resources())} free; check the *.resources "
                         "settings against it (`ray status` shows what each node has)")
    for ref in ready:
        group, index = pending[ref]
        try:
            group.pids[index] = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            raise WorkerLost(f"{group.role} actor {index} could not start: {str(err).splitlines()[0]}") from None
    for group in groups:
        if group.role == "trainer" and len(group.actors) > 1:
            address = group.get("the rendezvous", [(0, group.actors[0].rendezvous.remote())])[0]
            group.call("joining the trainer group", "join", address)


def rollout_group(cfg: RunConfig, spec: EngineSpec, replicas: int | None = None) -> ActorGroup:
    """rollout.replicas (or `replicas`) `RolloutReplica`s of `spec`."""
    return _start("rollout", RolloutReplica, replicas or cfg.rollout.replicas, cfg.rollout.resources,
                  lambda i: (cfg, spec))


def teacher_group(cfg: RunConfig, path: str, spec: EngineSpec, replicas: int | None = None) -> ActorGroup:
    """teacher.replicas (or `replicas`) `TeacherReplica`s of the teacher at `path`."""
    return _start("teacher", TeacherReplica, replicas or cfg.teacher.replicas, cfg.teacher.resources,
                  lambda i: (cfg, path, spec))


def _check_fits(cfg: RunConfig, has_teacher: bool) -> None:
    """Refuse at once what this cluster can never place (Ray would wait forever)."""
    import ray

    groups = [("trainer", cfg.trainer.world_size, cfg.trainer.resources),
              ("rollout", cfg.rollout.replicas, cfg.rollout.resources)]
    if has_teacher:
        groups.append(("teacher", cfg.teacher.replicas, cfg.teacher.resources))
    total = ray.cluster_resources()
    for key, unit in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        asked = sum(n * getattr(r, unit) for _, n, r in groups)
        if asked > total.get(key, 0) + 1e-9:
            parts = " + ".join(f"{name} {n}×{getattr(r, unit):g}" for name, n, r in groups)
            raise ValueError(f"the run's actors ask for {asked:g} {key}s ({parts}) and the Ray cluster has "
                             f"{total.get(key, 0):g}: lower trainer/rollout/teacher .resources.{unit} or the counts")


def trainer_group(cfg: RunConfig, student_path: str) -> ActorGroup:
    """trainer.world_size `TrainerRank`s in a PACK placement group (`wait_ready` joins them)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    res = cfg.trainer.resources
    bundle = {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus else {})}
    group = placement_group([bundle] * cfg.trainer.world_size, strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=READY_TIMEOUT_S)
    if not ready:
        raise ValueError(f"ray: no room for the trainer's {cfg.trainer.world_size} × {bundle} after "
                         f"{READY_TIMEOUT_S:.0f}s (free: {_describe(ray.available_resources())}); lower "
                         "trainer.world_size or trainer.resources")
    world = cfg.trainer.world_size
    return _start("trainer", TrainerRank, world, res, lambda i: (cfg, student_path, i, world),
                  strategy=lambda i: PlacementGroupSchedulingStrategy(group, i))


def open_ray_run(cfg: RunConfig, paths: RunPaths, student_path: str, teacher_path: str | None, *,
                 log: Log = print) -> OpenRun:
    """`kdrl.workers.load_run` on Ray: the run's files as a local run writes them, and its roles
    as actor groups (started in parallel, each loading its models)."""
    from transformers import AutoConfig

    from kdrl.engines.select import count_parameters

    _check_run_config(cfg, paths)
    tokenizer = load_tokenizer(student_path)
    prompts = open_prompts(cfg, paths, tokenizer, AutoConfig.from_pretrained(student_path), student_path,
                           teacher_path)
    rollout_choice, teacher_choice = resolve_engines(cfg, student_params=lambda: count_parameters(student_path),
                                                     teacher_path=teacher_path)
    rollout_spec, teacher_spec = engine_specs(cfg, student_path=student_path, teacher_path=teacher_path,
                                              rollout=rollout_choice, teacher=teacher_choice)
    cpus = (cfg.trainer.world_size * cfg.trainer.resources.num_cpus
            + cfg.rollout.replicas * cfg.rollout.resources.num_cpus
            + (cfg.teacher.replicas * cfg.teacher.resources.num_cpus if teacher_path else 0))
    cluster = RayCluster.connect(cfg.cluster, cpus_needed=cpus, log=log)
    try:
        _check_fits(cfg, teacher_path is not None)
        ranks = trainer_group(cfg, student_path)
        replicas = rollout_group(cfg, rollout_spec)
        teachers = None if teacher_path is None else teacher_group(cfg, teacher_path, teacher_spec)
        wait_ready(*(g for g in (ranks, replicas, teachers) if g is not None))
        log(f"[kdrl] ray: trainer {cfg.trainer.world_size} rank(s) (pids {ranks.pids}), rollout "
            f"{rollout_choice.engine} × {cfg.rollout.replicas} (pids {replicas.pids})"
            + ("" if teachers is None else f", teacher {teacher_choice.engine} × {cfg.teacher.replicas} "
               f"(pids {teachers.pids})"))
        student = RayStudent(cfg, tokenizer, student_path, ranks)
        resumed = latest_checkpoint(paths)
        if resumed is not None:
            student.restore(paths.checkpoint(resumed))
            log(f"[kdrl] resuming {paths.root} after step {resumed}")
        teacher = None if teachers is None else RayTeacher(cfg, teacher_path, tokenizer, teacher_spec, teachers,
                                                           log=log)
        info = RunInfo(str(paths.root), cfg, run_metadata(cfg, paths, rollout_choice, teacher_choice))
        return OpenRun(info, student, RayRollout(rollout_spec, student, replicas, log=log), teacher, prompts,
                       cluster=cluster)
    except BaseException:
        cluster.close()
        raise

