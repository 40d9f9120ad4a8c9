"""Reading configs in and reporting what is wrong with them, for any frozen pydantic config model
(`kdrl.config.RunConfig`, `EvalConfig`): strict YAML files, ``--set section.key=value``
overrides, and one ``<key path>: <message>`` line per problem, with a did-you-mean for typos.

The models and the checks of what a run means are in `kdrl.config`; this module knows only
YAML and pydantic, so every config reads and fails the same way.

    values = merge_dicts(read_yaml("cfg.yaml"), parse_override("loss.beta_init=0.01"))
    cfg = validate_config(RunConfig, values, source="cfg.yaml")   # ValueError: a line per bad key
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

_ModelT = TypeVar("_ModelT", bound=BaseModel)


def merge_dicts(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, recursively for nested mappings.

    >>> merge_dicts({"loss": {"beta_init": 0.1, "pg_coef": 1.0}}, {"loss": {"beta_init": 0.2}})
    {'loss': {'beta_init': 0.2, 'pg_coef': 1.0}}
    """
    out = dict(base)
    for key, value in top.items():
        out[key] = merge_dicts(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """Turn "loss.beta_init=0.01" into {"loss": {"beta_init": 0.01}} (value parsed as YAML).

    >>> parse_override("loss.beta_init=0.01")
    {'loss': {'beta_init': 0.01}}
    >>> parse_override("run.method=grpo")
    {'run': {'method': 'grpo'}}
    """
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ValueError(f"override {text!r}: the key {dotted.strip()!r} has an empty part (form: section.key=value)")
    try:
        value: Any = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ValueError(f"override {text!r}: the value {raw!r} is not valid YAML "
                         f"({getattr(err, 'problem', None) or err}); quote it, e.g. {dotted}='\"{raw}\"'") from None
    for part in reversed(parts):
        value = {part: value}
    return value


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: YAML keeps the last silently,
    so a second `loss:` section would drop every key of the first."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode):
    seen: dict[str, yaml.Mark] = {}
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key_node.value!r} appears twice in one mapping (first on line "
                    f"{seen[key_node.value].line + 1}): the first would be dropped", key_node.start_mark)
            seen[key_node.value] = key_node.start_mark
    yield from loader.construct_yaml_map(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in the YAML file at `path` ({} for an empty file); errors name the file, and
    for syntax errors the line and column."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except OSError as err:
        raise ValueError(f"config file {path}: cannot be read ({err.strerror or err})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
                         "save the file as UTF-8") from None
    try:
        loaded = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        context = f" ({err.context}, line {err.context_mark.line + 1})" if err.context and err.context_mark else ""
        source_line = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
        snippet = f"\n    {source_line}\n    {' ' * mark.column}^" if source_line else ""
        raise ValueError(f"{where}: invalid YAML: {err.problem}{context}{snippet}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: invalid YAML: {err}") from None
    if loaded is None:  # empty, or only comments: the defaults
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of sections at the top level (run:, loss:, ...), "
                         f"got a {type(loaded).__name__}")
    return loaded


def _model_at(cls: type[BaseModel], loc: tuple[str, ...]) -> type[BaseModel] | None:
    """The nested model at the field path `loc` of `cls`, or None where `loc` is not a section."""
    for part in loc:
        field = cls.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        cls = field.annotation
    return cls


def check_sections(cls: type[BaseModel], values: dict[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
    """`values` with each section of `cls` checked to be a mapping (an empty `run:` means its
    defaults); a ValueError naming `where` and the section otherwise."""
    out = dict(values)
    for key, value in values.items():
        section = _model_at(cls, (str(key),))
        if section is None:
            continue
        if value is None:
            out[key] = {}
        elif isinstance(value, dict):
            out[key] = check_sections(section, value, where, f"{prefix}{key}.")
        else:
            raise ValueError(f"{where}: `{prefix}{key}` is a section: it needs a mapping of its keys "
                             f"(`{key}:`, then indented `{next(iter(section.model_fields))}: ...` lines), "
                             f"not {reprlib.repr(value)}")
    return out


def _keys(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of `cls` ("loss.beta_init", "teacher.vllm.dtype", ...)."""
    out = []
    for name in cls.model_fields:
        sub = _model_at(cls, (name,))
        out.extend(_keys(sub, f"{prefix}{name}.") if sub else [f"{prefix}{name}"])
    return out


def _unknown_key(cls: type[BaseModel], loc: tuple[str, ...], renamed: Mapping[str, str]) -> str:
    """ "unknown key; did you mean `loss.beta_init`?" for a key `cls` does not have at `loc` (a
    typo of a `renamed` key is pointed at its new name)."""
    parent = _model_at(cls, loc[:-1])
    names = list(parent.model_fields) if parent else []
    is_section = bool(names) and all(_model_at(parent, (n,)) for n in names)
    what = "unknown section" if is_section else "unknown key"
    close = difflib.get_close_matches(loc[-1], names, n=1, cutoff=0.6)
    if close:
        return f"{what}; did you mean `{'.'.join((*loc[:-1], close[0]))}`?"
    close = difflib.get_close_matches(".".join(loc), renamed, n=1, cutoff=0.6)
    if close:
        return f"{what}; did you mean `{renamed[close[0]]}`?"
    elsewhere = [k for k in _keys(cls) if k.rsplit(".", 1)[-1] == loc[-1]]
    if elsewhere:
        return f"{what}; did you mean `{elsewhere[0]}`?"
    return f"{what} (known: {', '.join(names)})" if names else what


def _renamed(old: str, new: str, value: Any) -> list[str]:
    """ "samples: renamed to `run.eval_samples`"; a renamed section, a line per key given under it.

    >>> _renamed("vllm", "rollout.vllm", {"dtype": "bfloat16"})
    ['vllm.dtype: renamed to `rollout.vllm.dtype`, the key a run config uses']
    """
    if isinstance(value, dict) and value:
        return [line for key, sub in value.items() for line in _renamed(f"{old}.{key}", f"{new}.{key}", sub)]
    return [f"{old}: renamed to `{new}`, the key a run config uses"]


def format_validation_error(cls: type[BaseModel], err: ValidationError, renamed: Mapping[str, str] = {}) -> list[str]:
    """One `<key path>: <message>` line per problem; a model-level problem (whose message names
    its keys) as it is, without an empty location. A key of `renamed` (old dotted key → new)
    is reported with its new name."""
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and ".".join(loc) in renamed:
            lines.extend(_renamed(".".join(loc), renamed[".".join(loc)], e.get("input")))
            continue
        if e["type"] == "extra_forbidden":
            msg = _unknown_key(cls, loc, renamed)
        elif e["type"] not in ("value_error", "missing"):
            msg += f" (got {reprlib.repr(e.get('input'))})"
        key = ".".join(loc)
        lines.extend(f"{key}: {line}" if key else line for line in msg.splitlines())
    return lines


def validate_config(cls: type[_ModelT], values: dict[str, Any], *, source: str, overrides=(),
                    context: dict[str, Any] | None = None, renamed: Mapping[str, str] = {}) -> _ModelT:
    """`cls.model_validate(values, context=context)`, with one ValueError that names every bad
    key, a line each (`source` and `overrides` say where the values came from; `renamed` maps
    keys `cls` had before to the ones it has now)."""
    try:
        return cls.model_validate(values, context=context)
    except ValidationError as err:
        where = f"{source}, overrides {list(overrides)}" if overrides else source
        problems = "\n  ".join(format_validation_error(cls, err, renamed))
        raise ValueError(f"invalid config ({where}):\n  {problems}") from None
