"""Parsing a stack's `llm-serving:*` values into `StackConfig`: once, validated, frozen.

Every problem becomes one line that names the stack key path (`llm-serving:model.maxTokens`)
and what is allowed there; nothing is half-applied. Pure: local mode and the tools parse stack
files with it, without the Pulumi SDK (components/config/pulumi_source.py reads a running
program's configuration and calls it).
"""

from __future__ import annotations

import difflib
import json
from typing import Any, Mapping

from pydantic import BaseModel, ValidationError

from components.config.rules import cross_check
from components.config.stack import StackConfig
from components.config.types import NAMESPACE

SECRET_KEYS = ("apiKey", "hfToken")
"""Top-level keys that must be set with `pulumi config set --secret`."""

API_KEY_MIN_LENGTH = 32
"""Shortest operator-supplied `apiKey` accepted (generated keys have 48 characters)."""


class ConfigError(ValueError):
    """A stack configuration mistake; `problems` holds one line per mistake, each naming its
    key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            "invalid stack configuration:\n" + "\n".join(f"  - {p}" for p in problems)
        )


def _decode(value: Any) -> Any:
    """Pulumi hands structured values over as JSON text; scalars stay text."""
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):  # nested too deep: left as text
            return value
    return value


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The camelCase keys allowed at the section that `loc` points into."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        field = next(
            (f for n, f in current.model_fields.items() if part in (n, f.alias)), None
        )
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        current = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)),
            None,
        )
        if current is None:
            # tuple[Toleration, ...] and similar: look one level deeper.
            for arg in args:
                inner = getattr(arg, "__args__", ())
                current = next(
                    (c for c in inner if isinstance(c, type) and issubclass(c, BaseModel)),
                    None,
                )
                if current:
                    break
    if not (isinstance(current, type) and issubclass(current, BaseModel)):
        return []
    return [f.alias or n for n, f in current.model_fields.items()]


def _key_path(loc: tuple[Any, ...]) -> str:
    path = f"{NAMESPACE}:"
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if i else "") + str(part)
    return path


def _closest(key: str, allowed: list[str]) -> str:
    """` (did you mean 'x'?)` for the allowed key nearest to a misspelt one, else ''."""
    by_case = {k.lower(): k for k in allowed}
    # cutoff 0.6 (difflib's default): close enough to be the same word mistyped, e.g.
    # replcias -> replicas, maxOutputTokns -> maxOutputTokens; not an unrelated key.
    found = difflib.get_close_matches(key.lower(), list(by_case), n=1, cutoff=0.6)
    return f" (did you mean '{by_case[found[0]]}'?)" if found else ""


def _describe(error: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(StackConfig, loc)
        if len(loc) == 1:
            allowed = sorted([*allowed, *SECRET_KEYS])
        hint = _closest(str(loc[-1]), allowed)
        return (f"{_key_path(loc)}: unknown key{hint}; allowed keys here: "
                f"{', '.join(allowed)}")
    if kind == "missing":
        return f"{_key_path(loc)}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if not loc:
        # A rule across the top-level keys: its message starts with the keys it names.
        return f"{NAMESPACE}:{message}"
    return f"{_key_path(loc)}: {message} (got {error.get('input')!r})"


def parse_stack_config(raw: Mapping[str, Any]) -> StackConfig:
    """Validate the non-secret `llm-serving:*` values (keys without the namespace).

    Raises ConfigError listing every problem, each naming its key.
    """
    data = {key: _decode(value) for key, value in raw.items() if key not in SECRET_KEYS}
    try:
        cfg = StackConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError([_describe(e) for e in err.errors()]) from None
    problems = cross_check(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def api_key_problems(key: Any) -> list[str]:
    """A guessable key is no key: refuse short ones (the message never shows the value)."""
    if key is None:
        return []
    length = len(str(key).strip())
    if length >= API_KEY_MIN_LENGTH:
        return []
    return [
        f"{NAMESPACE}:apiKey: must be at least {API_KEY_MIN_LENGTH} characters (got {length}); "
        "generate one with `openssl rand -hex 32`, or unset apiKey to have one generated"
    ]


