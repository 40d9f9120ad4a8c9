"""Questions → prompt text and token ids, the one rendering student and teacher both see.

Two formats (``data.prompt_format``):

- ``plain``: ``data.prompt_template`` filled with the question, tokenized with the tokenizer's own
  special tokens (a bos where it adds one). Base models and the embedded task.
- ``chat``: the tokenizer's chat template (``apply_chat_template``) renders an optional system
  message, the user message (``prompt_template`` filled with the question) and the generation
  prompt, with ``data.chat_template_kwargs`` passed through (e.g. ``enable_thinking``). The
  rendered text already holds the template's special tokens, so it is tokenized without adding
  more. Instruct and reasoning models.

The teacher scores exactly the token ids the student saw (pitfall 1 in docs/paper.md), so its own
template must render the same ids: `rendering_difference` compares the two renderings and names
the first token where they part; the run refuses to start on any difference.

    texts, ids = render_prompts(cfg.data, tokenizer, ["What is 2+3?"])
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from kdrl.config import DataConfig

logger = logging.getLogger(__name__)


class PromptFormatError(ValueError):
    """The prompts cannot be rendered as configured, or the teacher would see other ids."""


def chat_messages(cfg: DataConfig, question: str) -> list[dict[str, str]]:
    """The conversation of one prompt: [system,] user.

    >>> from kdrl.config import DataConfig
    >>> cfg = DataConfig(prompt_format="chat", system_prompt="Be brief.", prompt_template="Q: {question}")
    >>> chat_messages(cfg, "1+1?")
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Q: 1+1?'}]
    """
    user = {"role": "user", "content": cfg.prompt_template.format(question=question)}
    return [{"role": "system", "content": cfg.system_prompt}, user] if cfg.system_prompt else [user]


def render_prompts(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, questions: list[str], *,
                   who: str = "the student") -> tuple[list[str], list[list[int]]]:
    """(prompt texts, prompt token ids) of `questions` under `cfg`'s format; `who` names the
    tokenizer's owner in errors.

    >>> from kdrl.config import DataConfig
    >>> from kdrl.models import build_char_tokenizer
    >>> render_prompts(DataConfig(prompt_template="{question}="), build_char_tokenizer(), ["1+2"])
    (['1+2='], [[1, 5, 14, 6, 17]])
    """
    if cfg.prompt_format == "plain":
        texts = [cfg.prompt_template.format(question=question) for question in questions]
        return texts, tokenizer(texts, add_special_tokens=True)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise PromptFormatError(
            f"data.prompt_format=chat, but the tokenizer of {who} ({tokenizer.name_or_path or 'unnamed'}) has no chat "
            "template; use data.prompt_format=plain (a base model), or a model folder whose tokenizer_config.json "
            "(or chat_template.jinja) holds one")
    try:
        texts = [tokenizer.apply_chat_template(chat_messages(cfg, question), tokenize=False, add_generation_prompt=True,
                                               **cfg.chat_template_kwargs) for question in questions]
    except Exception as err:  # jinja errors: a template that rejects a system message, raise_exception(...)
        raise PromptFormatError(f"the chat template of {who} cannot render the prompts ({type(err).__name__}: {err}); "
                                "check data.system_prompt and data.chat_template_kwargs") from err
    return texts, tokenizer(texts, add_special_tokens=False)["input_ids"]


def _token(tokenizer: PreTrainedTokenizerBase, ids: list[int], position: int) -> str:
    if position >= len(ids):
        return "nothing (the prompt has ended)"
    return f"{ids[position]} {tokenizer.convert_ids_to_tokens(ids[position])!r}"


def rendering_difference(cfg: DataConfig, questions: list[str], student_ids: list[list[int]],
                         student_tokenizer: PreTrainedTokenizerBase,
                         teacher_tokenizer: PreTrainedTokenizerBase) -> str | None:
    """None when the teacher's tokenizer renders every question to the ids the student's prompts
    hold (`student_ids`, row for row); else the first differing token, in words, with the text
    around it in both renderings.

    >>> from kdrl.config import DataConfig
    >>> from kdrl.models import build_char_tokenizer
    >>> cfg, tok = DataConfig(prompt_format="chat"), build_char_tokenizer()
    >>> tok.chat_template = "{% for m in messages %}Q: {{ m.content }}\\n{% endfor %}A:"
    >>> other = build_char_tokenizer()
    >>> other.chat_template = "{% for m in messages %}Q: {{ m.content }}\\n{% endfor %}Answer:"
    >>> _, ids = render_prompts(cfg, tok, ["1+1"])
    >>> print(rendering_difference(cfg, ["1+1"], ids, tok, other))
    prompt 0: token 8 is 20 ':' for the student but 37 'n' for the teacher (student '\\nA:', teacher '\\nAns')
    """
    _, teacher_ids = render_prompts(cfg, teacher_tokenizer, questions, who="the teacher")
    for row, (ours, theirs) in enumerate(zip(student_ids, teacher_ids)):
        if list(ours) == list(theirs):
            continue
        position = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        student_text = student_tokenizer.decode(list(ours)[max(0, position - 2):position + 2])
        teacher_text = teacher_tokenizer.decode(list(theirs)[max(0, position - 2):position + 2])
        return (f"prompt {row}: token {position} is {_token(student_tokenizer, list(ours), position)} for the student "
                f"but {_token(teacher_tokenizer, list(theirs), position)} for the teacher "
                f"(student {student_text!r}, teacher {teacher_text!r})")
    return None


def check_same_rendering(cfg: DataConfig, questions: list[str], student_ids: list[list[int]],
                         student_tokenizer: PreTrainedTokenizerBase,
                         teacher_tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise `PromptFormatError` unless the teacher renders the prompts to the student's ids."""
    difference = rendering_difference(cfg, questions, student_ids, student_tokenizer, teacher_tokenizer)
    if difference is not None:
        what = "chat template" if cfg.prompt_format == "chat" else "tokenizer (its special tokens: bos, prefix space)"
        raise PromptFormatError(
            f"the teacher would see other prompt tokens than the student: {difference}. The teacher scores the "
            f"student's token ids, so its {what} must render the same prompts; give both models the same "
            "tokenizer files (tokenizer_config.json / chat_template.jinja), or train a student of the teacher's "
            "family")


def warn_if_chat_model(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """One WARNING when a model that has a chat template is prompted in the plain format (an
    instruct or reasoning model prompted that way sees text unlike anything it was tuned on)."""
    if cfg.prompt_format == "plain" and getattr(tokenizer, "chat_template", None):
        logger.warning("%s: the tokenizer has a chat template, but data.prompt_format=plain: an instruct or "
                       "reasoning model is prompted without its template; set data.prompt_format=chat "
                       "(see docs/models.md)", where)
