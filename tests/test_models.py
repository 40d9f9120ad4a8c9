"""Char-level tokenizer, tiny model builders, loading/saving, and tokenizer comparison."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from kdrl.models import (
    CHARSET,
    TINY_STUDENT,
    TINY_TEACHER,
    build_char_tokenizer,
    build_tiny_llama,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    save_model,
    tokenizers_match,
)

TEXTS = [
    "12 + 345 = 357",
    "a  b\n\nc\n",  # double space and double newline: one token per character
    "Tom has 3 apples. He eats 1; how many are left?\n#### 2",
    " leading and trailing ",
    "(7 * 8) - 6: 50",
]


def _round_trip(tok, text: str) -> str:
    return tok.decode(tok(text)["input_ids"], skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_char_tokenizer_round_trips_exactly(tiny_tokenizer, text):
    ids = tiny_tokenizer(text)["input_ids"]
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert len(ids) == 1 + len(text)  # <bos> + one token per character
    assert _round_trip(tiny_tokenizer, text) == text


def test_char_tokenizer_special_ids_and_unknowns(tiny_tokenizer):
    tok = tiny_tokenizer
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 4 + len(CHARSET)
    assert tok("1€")["input_ids"][2] == tok.unk_token_id
    # special tokens written in text are matched whole, not spelled out
    assert tok("1<eos>")["input_ids"] == [1, tok.convert_tokens_to_ids("1"), 2]


def test_char_tokenizer_pads_on_the_left(tiny_tokenizer):
    batch = tiny_tokenizer(["1", "123"], padding=True)
    assert batch["input_ids"][0][:2] == [0, 0]
    assert batch["attention_mask"][0] == [0, 0, 1, 1]


@pytest.mark.parametrize("config_cls", [LlamaConfig, Qwen2Config])
def test_load_tokenizer_offline_keeps_spaces(tmp_path, monkeypatch, tiny_tokenizer, config_cls):
    # Qwen2Config is the trap: AutoTokenizer would return a Qwen2Tokenizer that drops spaces.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_tokenizer.save_pretrained(tmp_path)
    config_cls(vocab_size=len(tiny_tokenizer)).save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    for text in TEXTS:
        assert _round_trip(loaded, text) == text
    assert loaded.padding_side == "left"
    assert tokenizers_match(tiny_tokenizer, loaded) is None


def test_load_tokenizer_falls_back_to_eos_for_padding(tmp_path):
    tok = build_char_tokenizer()
    tok.pad_token = None
    tok.padding_side = "right"
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token_id == loaded.eos_token_id == 2
    assert loaded.padding_side == "left"


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_tiny_presets_have_the_stated_sizes(tiny_student, tiny_teacher):
    # per layer: attention 4h² + MLP 3·h·4h + two RMSNorms 2h; plus untied embed/head 2·80·h and
    # the final norm h. Student h=128, 4 layers: 4·262,400 + 20,480 + 128 = 1,070,208 (~1M).
    # Teacher h=256, 6 layers: 6·1,049,088 + 40,960 + 256 = 6,335,744 (~6M).
    assert _n_params(tiny_student) == 1_070_208
    assert _n_params(tiny_teacher) == 6_335_744
    for model, preset in ((tiny_student, TINY_STUDENT), (tiny_teacher, TINY_TEACHER)):
        assert model.config.head_dim == 32 == preset["hidden_size"] // preset["num_heads"]
        assert model.config.tie_word_embeddings is False


def test_build_tiny_llama_is_seeded_and_leaves_global_rng_alone(tiny_tokenizer):
    state = torch.get_rng_state()
    a = build_tiny_llama(tiny_tokenizer, **TINY_STUDENT, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_tiny_llama(tiny_tokenizer, **TINY_STUDENT, seed=3)
    c = build_tiny_llama(tiny_tokenizer, **TINY_STUDENT, seed=4)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_build_tiny_llama_rejects_odd_head_dims(tiny_tokenizer):
    with pytest.raises(ValueError, match="head dim"):
        build_tiny_llama(
            tiny_tokenizer, hidden_size=48, num_layers=1, num_heads=2, intermediate_size=64, seed=0
        )


def test_save_then_load_gives_bit_identical_logits(tmp_path, monkeypatch, tiny_tokenizer, tiny_student):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_model(tiny_student, tiny_tokenizer, tmp_path / "m")
    model = load_causal_lm(tmp_path / "m")
    tok = load_tokenizer(tmp_path / "m")
    ids_BS = torch.tensor([tok("12 + 34 =")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids_BS).logits, tiny_student(ids_BS).logits)
    assert not model.training
    assert tokenizers_match(tok, tiny_tokenizer) is None


def test_load_causal_lm_dtype(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir / "student", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm(tiny_model_dir / "student", dtype="fp8")


def test_load_causal_lm_missing_path_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_causal_lm(missing)
    # a hub-style id offline: fails fast from the cache, naming the id
    with pytest.raises(FileNotFoundError, match="kdrl-test/no-such-model.*HF_HUB_OFFLINE"):
        load_causal_lm("kdrl-test/no-such-model")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_tokenizers_match_identical_is_none(tiny_tokenizer):
    assert tokenizers_match(tiny_tokenizer, build_char_tokenizer()) is None


def test_tokenizers_match_reports_first_difference(tiny_tokenizer):
    extra = build_char_tokenizer(CHARSET + "!")
    assert tokenizers_match(tiny_tokenizer, extra) == "vocab size 80 vs 81"  # 4 specials + 76 chars
    # same characters, two swapped: '0' (id 4) and '1' (id 5) trade places
    swapped = build_char_tokenizer("10" + CHARSET[2:])
    assert tokenizers_match(tiny_tokenizer, swapped) == "token '0' has id 4 vs 5"
    other_eos = build_char_tokenizer()
    other_eos.eos_token = "#"
    hash_id = tiny_tokenizer.convert_tokens_to_ids("#")
    assert tokenizers_match(tiny_tokenizer, other_eos) == f"eos_token_id 2 vs {hash_id}"
