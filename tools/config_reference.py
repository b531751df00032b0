"""Print the stack configuration reference as a Markdown table.

`python -m tools.config_reference` regenerates the table in README.md; a test
fails when the README and components/config.py disagree.
"""

from __future__ import annotations

import typing
from typing import Any, Iterator

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from components.config import NAMESPACE, SECRET_KEYS, StackConfig

SECRET_DESCRIPTIONS = {
    "apiKey": "API key clients must send as `Authorization: Bearer`; generated with pulumi-random when unset. Secret.",
    "hfToken": "Hugging Face token for gated models, stored in a Kubernetes Secret. Secret.",
}


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(names)
    if origin is tuple:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return "map"
    if isinstance(annotation, type):
        return {"str": "string", "int": "integer", "bool": "boolean"}.get(
            annotation.__name__, "object"
        )
    return str(annotation)


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.default
    if value is None:
        return "—"
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value in ({}, ()):
        return "empty"
    return f"`{value}`"


def rows(model: type[BaseModel] = StackConfig, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        annotation = field.annotation
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        section = _section_type(annotation)
        items = None
        if typing.get_origin(annotation) is tuple and _section_type(inner[0]):
            items = _section_type(inner[0])
        description = (field.description or "").replace("\n", " ")
        if section is not None:
            default = ""
            if field.is_required():
                default = "required"
            elif isinstance(field.default, BaseModel):
                own = field.default.model_dump(exclude_defaults=True, by_alias=True)
                default = ", ".join(f"{k}: `{v}`" for k, v in own.items())
            yield key, "section", default, description
            yield from rows(section, key + ".")
        elif items is not None:
            yield key, f"list of {items.__name__}", _default(field), description
            yield from rows(items, key + "[].")
        else:
            yield key, _type_name(annotation), _default(field), " ".join(description.split())


def table() -> str:
    lines = ["| Key (`llm-serving:`…) | Type | Default | Meaning |", "|---|---|---|---|"]
    for key, kind, default, description in rows():
        lines.append(f"| `{key}` | {kind} | {default} | {description} |")
    for key in SECRET_KEYS:
        lines.append(f"| `{key}` | secret string | — | {SECRET_DESCRIPTIONS[key]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    assert NAMESPACE == "llm-serving"
    print(table())
