"""TOML tables as strict pydantic models: problems in the words of their keys, a reference.

A ``Table`` refuses unknown keys and takes values of its keys' types only (``rate =
"44100"`` is refused, not coerced). ``validated`` builds a model from data and turns
pydantic's errors into one ``ConfigError`` whose lines name the key path and the bad
value (``inputs[2].rate: must lie in 1000..768000, got 12``, ``batching.max_wiat_ms:
unknown key (known: ...)``); a validator's own refusal (``invalid``) keeps its words.
``reference_markdown`` renders a model's tables as Markdown from the fields' types,
defaults, bounds and descriptions, and ``write_reference`` puts that between a
document's markers.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class Table(BaseModel):
    """A TOML table: unknown keys refused, values of their key's type, nothing coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def invalid(problem: str) -> PydanticCustomError:
    """A validator's refusal, reported as ``key.path: problem``."""
    return PydanticCustomError("tagd_config", "{problem}", {"problem": problem})


M = typing.TypeVar("M", bound=BaseModel)


def validated(model: type[M], data: Any, path: str = "", context: dict | None = None) -> M:
    """``model`` from ``data``, or one ConfigError with every problem under ``path``."""
    try:
        return model.model_validate(data, strict=True, context=context)
    except ValidationError as exc:
        raise ConfigError([_problem(error, model, path) for error in exc.errors()]) from None


def from_text(annotation: Any, text: str) -> Any:
    """A string (a URL query's value) as a field's type, before the field's own checks:
    ``"44100"`` an int, ``"true"``/``"0"`` a bool, ``"a,b"`` a list."""
    kind = _scalar(annotation)
    if typing.get_origin(kind) is list:
        return [item for item in text.split(",") if item]
    if kind not in (int, float, bool):
        return str(text)
    try:
        return TypeAdapter(kind).validate_python(str(text))
    except ValidationError:
        raise invalid(f"expected {_EXPECTED[kind.__name__]}, got {str(text)!r}") from None


# -- the words of a problem ------------------------------------------------------------

_EXPECTED = {  # what a type error expected, by the first word of pydantic's error type
    **{"string": "a string", "int": "an integer", "float": "a number", "bool": "true or false"},
    **{"list": "a list", "model": "a table", "dict": "a table"},
}
_BOUNDS_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _problem(error: ErrorDetails, root: type[BaseModel], path: str) -> str:
    """One line of a ConfigError: ``inputs[2].rate: must lie in 1000..768000, got 12``."""
    for key in error["loc"]:
        if isinstance(key, int):
            path += f"[{key}]"
        else:
            path = f"{path}.{key}" if path else key
    return f"{path or 'config'}: {_reason(error, root)}"


def _reason(error: ErrorDetails, root: type[BaseModel]) -> str:
    kind, value = error["type"], error["input"]
    if kind == "tagd_config":
        return error["ctx"]["problem"]
    if kind == "extra_forbidden":
        known = _walk(root, error["loc"][:-1])[0].model_fields
        return f"unknown key (known: {', '.join(known)})"
    if kind == "missing":
        return "required"
    if kind.endswith(("_type", "_parsing", "_from_float")) and kind.split("_")[0] in _EXPECTED:
        return f"expected {_EXPECTED[kind.split('_')[0]]}, got {describe(value)}"
    if kind == "finite_number":
        return f"must be a finite number, got {value}"
    field = _walk(root, error["loc"])[1]
    if kind == "literal_error" and field is not None:
        return f"{value!r} is not one of {', '.join(map(str, _choices(field.annotation)))}"
    if kind in _BOUNDS_ERRORS and field is not None:
        verb, allowed = _allowed(field)
        return f"must {verb} {allowed}, got {value}"
    return f"{error['msg']}, got {describe(value)}"


def _walk(root: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """The table and the field a location names (list indices name the list's items)."""
    model, field = root, None
    for key in loc:
        if isinstance(key, int):
            continue
        if model is None or key not in model.model_fields:
            return None, None
        field = model.model_fields[key]
        model = _table_in(field.annotation)
    return model, field


def _table_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, alone, in a list or optional; None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _table_in(argument)
        if found is not None:
            return found
    return None


def _scalar(annotation: Any) -> Any:
    """``int`` of ``int | None``, ``str`` of ``Annotated[str, ...]``; lists and Literals kept."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _scalar(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar(inner)
    return annotation


def _choices(annotation: Any) -> tuple:
    kind = _scalar(annotation)
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else ()


def _allowed(field: FieldInfo) -> tuple[str, str]:
    """A field's bounds as words after "must": ("lie in", "1..64"), ("be", "positive")."""
    if isinstance(field.json_schema_extra, dict) and "allowed" in field.json_schema_extra:
        return "be", str(field.json_schema_extra["allowed"])  # words of its own
    bounds = {
        name: getattr(item, name)
        for item in field.metadata
        for name in ("ge", "gt", "le", "lt")
        if getattr(item, name, None) is not None
    }
    match bounds:
        case {"ge": low, "le": high}:
            return "lie in", f"{low}..{high}"
        case {"ge": low, "lt": high}:
            return "lie in", f"[{low}, {high})"
        case {"gt": 0}:
            return "be", "positive"
        case {"ge": 0}:
            return "be", "0 or positive"
        case {"ge": low}:
            return "be", f"at least {low}"
    return "be", " and ".join(f"{name} {limit}" for name, limit in bounds.items())


def describe(value: Any) -> str:
    kind = {dict: "table", list: "list", bool: "boolean"}.get(type(value), type(value).__name__)
    return f"{kind} {value!r}"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str | list):
        return json.dumps(value)
    return repr(value)


# -- the reference ---------------------------------------------------------------------

# The markers around a generated reference; the start marker's comment may say how to
# regenerate it, over several lines.
REFERENCE_START = "<!-- config-reference:start"
REFERENCE_END = "<!-- config-reference:end -->"


def reference_markdown(root: type[BaseModel], title: str = "Top level") -> str:
    """Every key of ``root`` and of its tables: type, default, what is allowed, what it sets.

    ``root``'s own keys come first under ``title``; then each table it holds, as
    ``[name]`` or, in a list, ``[[name]]``, described by its model's docstring.
    """
    tables: list[tuple[str, type[BaseModel]]] = [(title, root)]
    for name, field in root.model_fields.items():
        table = _table_in(field.annotation)
        if table is not None:
            list_of = typing.get_origin(field.annotation) is list
            tables.append((f"`[[{name}]]`" if list_of else f"`[{name}]`", table))
    parts = []
    for heading, table in tables:
        rows = [
            f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} "
            f"| {_allowed_words(field)} | {field.description or ''} |"
            for name, field in table.model_fields.items()
            if table is not root or _table_in(field.annotation) is None
        ]
        doc = " ".join((table.__doc__ or "").split())
        header = ["", "| Key | Type | Default | Allowed | |", "|---|---|---|---|---|"]
        parts.append("\n".join([f"**{heading}**: {doc}", *header, *rows]))
    return "\n\n".join(parts) + "\n"


def _type_name(annotation: Any) -> str:
    kind = _scalar(annotation)
    if typing.get_origin(kind) is list:
        return f"list of {_type_name(typing.get_args(kind)[0])}s"
    if typing.get_origin(kind) is Literal:
        return "string"
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return names.get(kind, "table")


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    return "unset" if value in (None, "") else f"`{toml_value(value)}`"


def _allowed_words(field: FieldInfo) -> str:
    choices = _choices(field.annotation)
    if choices:
        return ", ".join(f"`{toml_value(choice)}`" for choice in choices)
    _verb, allowed = _allowed(field)
    return allowed


def _reference_span(text: str) -> tuple[int, int]:
    start = text.index("-->\n", text.index(REFERENCE_START)) + len("-->\n")
    return start, text.index(REFERENCE_END, start)


def reference_in(text: str) -> str:
    """What a document holds between the reference markers."""
    start, end = _reference_span(text)
    return text[start:end].strip("\n") + "\n"


def write_reference(path: Path, reference: str) -> None:
    """Put ``reference`` between the reference markers of the document at ``path``."""
    text = path.read_text()
    start, end = _reference_span(text)
    path.write_text(f"{text[:start]}\n{reference}\n{text[end:]}")
