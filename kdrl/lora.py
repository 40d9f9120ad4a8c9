"""LoRA students (peft): the adapter trains; everything outside the trainer sees merged weights.

W' = W + (alpha / r)·B·A on the target modules (Hu et al. 2021, "LoRA: Low-Rank Adaptation").
B starts at 0, so the student of step 0 is the base model exactly. The trainer keeps peft's
unmerged module: base weights frozen, only A and B get gradients and optimizer state.

Outside the trainer (the vLLM rollout engine's sync, `save_merged` checkpoints, `kdrl merge-lora`,
`kdrl eval`) the model is `merged_weights`: the base architecture's parameter names with W'
computed per tensor in float32 from the live module. The training module is never merged in
place: a merge/unmerge round trip in bf16 would move the frozen W by rounding every sync.

A LoRA run's checkpoint holds ``adapter/`` (peft's adapter_config.json + adapter_model.safetensors,
and the tokenizer) where a full run's holds ``model/``; with ``model.lora.save_merged`` also
``merged/``, a plain HF model folder. The adapter names its base model by absolute path (or hub
name): merging later needs that base.

    student = apply_lora(load_causal_lm(path), LoraConfig(r=16, alpha=32), seed=0)
    merge_lora_checkpoint("runs/x/iter_00009/checkpoint", "merged-model")
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kdrl.config import LoraConfig

ADAPTER_DIR = "adapter"
"""A LoRA checkpoint's adapter folder (instead of a full run's ``model/``)."""
MERGED_DIR = "merged"
"""A LoRA checkpoint's merged model folder (with ``model.lora.save_merged``)."""
_SETTINGS = "kdrl_lora"  # the run's LoraConfig, attached to the wrapped model by apply_lora


class LoraError(ValueError):
    """A LoRA setting or adapter folder that cannot be used; the message says what to do."""


def require_peft():
    """The peft module, or a LoraError saying how to install it."""
    try:
        import peft
    except ImportError as err:
        raise LoraError("model.lora needs the peft package, which is not installed: "
                        "pip install peft (or pip install 'kdrl[lora]')") from err
    return peft


def is_lora(model: torch.nn.Module) -> bool:
    """Whether `model` is a peft-wrapped student (without importing peft)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """The distinct short names of `model`'s linear layers, in model order (what target_modules
    lists; e.g. q_proj, k_proj, ... for Llama)."""
    names = [name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    return list(dict.fromkeys(names))


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)  # peft's rule for a list of names


def _check_targets(model: torch.nn.Module, targets: list[str] | str) -> None:
    """Refuse targets that match nothing (naming the layers there are) and the output head,
    whose weight the trainer applies directly (`completion_logprobs_BT`), so a head adapter
    would be left out of the log-probs."""
    if targets == "all-linear":  # peft's own rule, which leaves the output head out
        return
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in targets if not any(_matches(name, t) for name in names)]
    if missing:
        linear = linear_layer_names(model)
        raise LoraError(f"model.lora.target_modules: {missing} match no module of the student; its linear layers are "
                        f"named {linear[:10]}{' ...' if len(linear) > 10 else ''} (or use target_modules=all-linear)")
    heads = {model.get_output_embeddings()}
    if getattr(model.config, "tie_word_embeddings", False):
        heads.add(model.get_input_embeddings())  # tied: the input embedding is the head too
    for name, module in model.named_modules():
        hit = [t for t in targets if _matches(name, t)]
        if module in heads and hit:
            raise LoraError(f"model.lora.target_modules: {hit} adapts {name}, the output head, which kdrl does not "
                            "support (the trainer uses the head's weight directly); remove it from target_modules")


def _base_name(model: torch.nn.Module) -> str:
    """The base model as the adapter should name it: an absolute path when local, else the hub name."""
    name = str(getattr(model, "name_or_path", "") or "")
    return str(Path(name).resolve()) if name and Path(name).exists() else name


def apply_lora(model: torch.nn.Module, cfg: LoraConfig, *, seed: int) -> torch.nn.Module:
    """`model` wrapped with a fresh LoRA adapter (peft): base weights frozen, A random, B = 0.

    A's initialisation draws from its own generator seeded with `seed` (run.seed), so the adapter
    is the same whatever ran before, and the caller's RNG stream is left as it was."""
    peft = require_peft()
    _check_targets(model, cfg.target_modules)
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    base = _base_name(model)
    with torch.random.fork_rng(devices=[]):  # adapters are created on the CPU, then moved
        torch.manual_seed(seed)
        wrapped = peft.get_peft_model(model, config)
    wrapped.peft_config["default"].base_model_name_or_path = base
    setattr(wrapped, _SETTINGS, cfg)
    return wrapped


def lora_settings(model: torch.nn.Module) -> LoraConfig | None:
    """The LoraConfig `apply_lora` wrapped `model` with (None for a full-weights model)."""
    return getattr(model, _SETTINGS, None) if is_lora(model) else None


def merged_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the base architecture, one at a time: W + (alpha/r)·B·A where adapted
    (float32 arithmetic, stored in W's dtype), the base tensor itself elsewhere. A full-weights
    model yields its state dict. Nothing of `model` is changed; at most one merged tensor is
    held at a time beyond what the caller keeps."""
    if not is_lora(model):
        yield from model.state_dict().items()
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    layers = {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:
            continue
        owner, _, leaf = key.rpartition(".base_layer.")
        layer = layers.get(owner) if leaf == "weight" else None
        if layer is None:
            yield key.replace(".base_layer.", "."), tensor.detach()
            continue
        merged = tensor.detach().float()
        with torch.no_grad():
            for adapter in layer.active_adapters:
                # merged_adapters are skipped: a peft merge put them in W already
                if adapter in layer.scaling and adapter not in layer.merged_adapters:
                    merged = merged + layer.get_delta_weight(adapter).float()
        yield f"{owner}.{leaf}", merged.to(tensor.dtype)


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`merged_weights` as a dict: what `base_model.load_state_dict` takes."""
    return dict(merged_weights(model))


def save_adapter(model: torch.nn.Module, tokenizer, directory: Path) -> None:
    """The adapter (peft's save_pretrained) and the tokenizer into `directory`."""
    model.save_pretrained(directory, save_embedding_layers=False)  # the base is frozen: embeddings are the base's
    tokenizer.save_pretrained(directory)


def save_merged(model: torch.nn.Module, tokenizer, directory: Path) -> None:
    """A plain HF model folder (config, merged weights, generation config, tokenizer)."""
    base = model.get_base_model()
    base.save_pretrained(directory, state_dict=merged_state_dict(model))
    model.generation_config.save_pretrained(directory)  # the base's own: HF generation swaps it on the inner module
    tokenizer.save_pretrained(directory)


def save_lora_checkpoint(model: torch.nn.Module, tokenizer, directory: Path) -> None:
    """adapter/ and, with the run's model.lora.save_merged, merged/ under a checkpoint folder."""
    save_adapter(model, tokenizer, Path(directory) / ADAPTER_DIR)
    settings = lora_settings(model)
    if settings is not None and settings.save_merged:
        save_merged(model, tokenizer, Path(directory) / MERGED_DIR)


def load_adapter_weights(model: torch.nn.Module, directory: Path) -> None:
    """Copy a saved adapter's A and B into the LoRA model `model` (bit-identical)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = Path(directory) / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no adapter weights there "
                                "(a LoRA checkpoint holds adapter/adapter_model.safetensors)")
    device = next(p.device for p in model.parameters() if p.requires_grad)
    result = set_peft_model_state_dict(model, load_file(file, device=str(device)))
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise LoraError(f"{file} does not fit this student's adapter (missing {missing[:3]}, unexpected "
                        f"{list(result.unexpected_keys)[:3]}); was it trained with other model.lora settings?")


def adapter_base_model(directory: Path) -> str:
    """The base model an adapter folder was trained on (path or hub name)."""
    file = Path(directory) / "adapter_config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{directory}: not a LoRA adapter folder (no adapter_config.json)")
    base = json.loads(file.read_text()).get("base_model_name_or_path")
    if not base:
        raise LoraError(f"{file} does not name its base model (base_model_name_or_path)")
    return base


def find_adapter(path: str | Path) -> Path:
    """The adapter folder of a LoRA run directory (its latest checkpoint), an iter_*/checkpoint
    folder, or the adapter folder itself."""
    from kdrl.runs import require_checkpoint
    from kdrl.storage import RunPaths

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if RunPaths(path).config.is_file():
        path = RunPaths(path).checkpoint(require_checkpoint(RunPaths(path)))
    for candidate in (path / ADAPTER_DIR, path):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    what = ("a full-weights checkpoint: its model/ folder is already a plain HF model" if (path / "model").is_dir()
            else "not a LoRA checkpoint (adapter/adapter_config.json) or adapter folder")
    raise LoraError(f"{path}: {what}")


def load_merged_model(adapter_dir: Path, *, dtype: str = "float32", device: str = "cpu") -> torch.nn.Module:
    """The base model of `adapter_dir` with the adapter merged in: a plain HF model, in eval mode."""
    peft = require_peft()
    from kdrl.models import load_causal_lm

    base_path = adapter_base_model(adapter_dir)
    try:
        base = load_causal_lm(base_path, dtype=dtype, device=device)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"the base model of the LoRA adapter {adapter_dir} is not available ({err}); "
                                "the adapter holds only the update, merging needs the base") from err
    wrapped = peft.PeftModel.from_pretrained(base, str(adapter_dir))
    merged = merged_state_dict(wrapped)
    plain = wrapped.unload()  # the base modules back in place, unchanged
    plain.load_state_dict(merged)
    return plain.eval()


def merge_lora_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, dtype: str | None = None) -> Path:
    """Write the merged model of a LoRA checkpoint (or run directory, or adapter folder) to
    `out_dir` as a plain HF model folder (config, weights, tokenizer) that any HF or vLLM tool
    loads. `dtype` None: the base model's own dtype. An existing non-empty `out_dir` is refused."""
    from kdrl.models import load_tokenizer, new_model_folder

    adapter = find_adapter(checkpoint)
    with new_model_folder(out_dir) as tmp:
        model = load_merged_model(adapter, dtype=dtype or _saved_dtype(adapter_base_model(adapter)))
        model.save_pretrained(tmp)
        has_tokenizer = (adapter / "tokenizer_config.json").is_file()  # kdrl's adapters carry it; others may not
        load_tokenizer(adapter if has_tokenizer else adapter_base_model(adapter)).save_pretrained(tmp)
    return Path(out_dir).expanduser()


def _saved_dtype(name_or_path: str) -> str:
    """The dtype a model was saved in, as a kdrl dtype name (float32 when unknown)."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(name_or_path), "dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"
