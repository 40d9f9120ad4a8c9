"""Tokenizers and causal LMs: the tiny char-level Llama fixtures, and loading any HF causal LM.

The embedded task uses a character-level tokenizer (one token per character) so that tiny models
can learn arithmetic without a BPE vocabulary. Two traps this module handles:

- ``Regex(".")`` does not match a newline in the tokenizers (Oniguruma) regex engine, so "\\n\\n"
  would become one ``<unk>`` piece; we split on ``[\\s\\S]`` instead.
- transformers 5 ``AutoTokenizer`` replaces the saved tokenizer class by the model type's own one
  (a Qwen2 ``config.json`` next to our tokenizer gives a ``Qwen2Tokenizer`` that drops spaces);
  :func:`load_tokenizer` honours a generic saved class instead.

    tok = build_char_tokenizer()
    student = build_tiny_llama(tok, **TINY_STUDENT, seed=0)
"""

from __future__ import annotations

import json
import os
import shutil
import string
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import (
        LlamaForCausalLM,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
    )

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
"""Special tokens of the char-level tokenizer, in id order (pad id 0, bos 1, eos 2, unk 3)."""

CHARSET: str = (
    string.digits + "+-*=#;:? \n" + string.ascii_lowercase + string.ascii_uppercase + ".,()"
)
"""Characters of the char-level vocabulary (ids follow SPECIAL_TOKENS, in this order)."""

TINY_STUDENT: dict[str, int] = dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512)
"""~1M-parameter student (head dim 32, which vLLM's CPU attention accepts)."""

TINY_TEACHER: dict[str, int] = dict(hidden_size=256, num_layers=6, num_heads=8, intermediate_size=1024)
"""~6M-parameter teacher (head dim 32)."""

_GENERIC_TOKENIZER_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}
_VLLM_CPU_HEAD_DIMS = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}


def _offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it only once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def build_char_tokenizer(chars: str = CHARSET) -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one id per character, ``<bos>`` prepended, left padding.

    >>> tok = build_char_tokenizer()
    >>> ids = tok("1 + 2 =\\n\\n3")["input_ids"]
    >>> ids[:4], tok.decode(ids, skip_special_tokens=True)
    ([1, 5, 22, 14], '1 + 2 =\\n\\n3')
    >>> tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id
    (0, 1, 2, 3)
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if len(set(chars)) != len(chars):
        raise ValueError("chars must not repeat a character")
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *chars))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_position_embeddings: int = 256,
    seed: int,
) -> LlamaForCausalLM:
    """Randomly initialised Llama sized for ``tokenizer``; the same seed gives the same weights.

    >>> m = build_tiny_llama(build_char_tokenizer(), **TINY_STUDENT, seed=0)
    >>> round(sum(p.numel() for p in m.parameters()) / 1e6, 2)
    1.07
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads or hidden_size // num_heads not in _VLLM_CPU_HEAD_DIMS:
        raise ValueError(f"head dim {hidden_size}/{num_heads} is not one of {sorted(_VLLM_CPU_HEAD_DIMS)}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _saved_tokenizer_class(name_or_path: str) -> str | None:
    """The ``tokenizer_class`` written in tokenizer_config.json (local, or already in the HF cache)."""
    from transformers.utils import cached_file

    try:
        path = cached_file(
            name_or_path,
            "tokenizer_config.json",
            local_files_only=_offline(),
            _raise_exceptions_for_missing_entries=False,
        )
    except OSError:
        return None
    if path is None:
        return None
    return json.loads(Path(path).read_text()).get("tokenizer_class")


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer, left-padded and with a pad token (falls back to eos).

    A tokenizer saved with a generic class (ours) is loaded as that class: transformers 5
    ``AutoTokenizer`` would swap in the model type's class (Qwen2Tokenizer drops spaces).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    name = str(name_or_path)
    if _saved_tokenizer_class(name) in _GENERIC_TOKENIZER_CLASSES:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(name, local_files_only=_offline())
    else:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=_offline())
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def resolve_device(device: str) -> torch.device:
    """"auto" → cuda when available, else cpu; anything else is passed to torch.device.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _torch_dtype(dtype: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(table)}")
    return table[dtype]


def _looks_local(name: str) -> bool:
    """A path rather than a hub id ("org/name" or "name")."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def load_causal_lm(
    name_or_path: str | os.PathLike, *, dtype: str = "float32", device: str = "cpu"
) -> PreTrainedModel:
    """Any HF causal LM (hub name or local folder) in ``dtype`` on ``device``, in eval mode.

    >>> load_causal_lm("/no/such/model")
    Traceback (most recent call last):
    ...
    FileNotFoundError: model '/no/such/model': no such local folder
    """
    from transformers import AutoModelForCausalLM

    name = str(Path(name_or_path).expanduser()) if str(name_or_path).startswith("~") else str(name_or_path)
    torch_dtype = _torch_dtype(dtype)
    if _looks_local(name) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"model {name!r}: no such local folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=torch_dtype, local_files_only=_offline()
        )
    except OSError as err:
        where = "the local HF cache (HF_HUB_OFFLINE is set)" if _offline() else "the Hugging Face hub"
        raise FileNotFoundError(
            f"model {name!r}: not a local folder, and not found in {where}: {err}"
        ) from err
    return model.to(resolve_device(device)).eval()


@contextmanager
def new_model_folder(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Write a model folder whole or not at all: yields an empty temporary folder beside
    `out_dir`, renamed to `out_dir` when the block ends and removed if it raises. An `out_dir`
    that already holds anything is refused (FileExistsError), never written over.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with new_model_folder(Path(d) / "m") as tmp:
    ...         _ = (tmp / "config.json").write_text("{}")
    ...     sorted(p.name for p in Path(d).iterdir()), (Path(d) / "m" / "config.json").exists()
    (['m'], True)
    """
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty: choose another output folder, "
                              "or remove it first")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.rename(out)


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike
) -> None:
    """Write model weights, config and tokenizer into one folder (loadable by the functions above)."""
    Path(path).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _special_ids(tok: PreTrainedTokenizerBase) -> dict[str, int | None]:
    names = ("bos", "eos", "pad", "unk")
    return {f"{name}_token_id": getattr(tok, f"{name}_token_id") for name in names}


def tokenizers_match(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> str | None:
    """None when ``a`` and ``b`` map every token to the same id and agree on special tokens;
    otherwise the first difference, in words.

    >>> a, b = build_char_tokenizer(), build_char_tokenizer()
    >>> tokenizers_match(a, b) is None
    True
    >>> tokenizers_match(a, build_char_tokenizer(CHARSET + "!"))
    'vocab size 80 vs 81'
    """
    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    if len(vocab_a) != len(vocab_b):
        return f"vocab size {len(vocab_a)} vs {len(vocab_b)}"
    for token, id_a in sorted(vocab_a.items(), key=lambda kv: kv[1]):
        if token not in vocab_b:
            return f"token {token!r} (id {id_a}) is missing from the second tokenizer"
        if vocab_b[token] != id_a:
            return f"token {token!r} has id {id_a} vs {vocab_b[token]}"
    for key, id_a in _special_ids(a).items():
        id_b = _special_ids(b)[key]
        if id_a != id_b:
            return f"{key} {id_a} vs {id_b}"
    added_a = {i: (t.content, t.special) for i, t in a.added_tokens_decoder.items()}
    added_b = {i: (t.content, t.special) for i, t in b.added_tokens_decoder.items()}
    for i in sorted(set(added_a) | set(added_b)):
        if added_a.get(i) != added_b.get(i):
            return f"added token at id {i}: {added_a.get(i)} vs {added_b.get(i)}"
    return None
