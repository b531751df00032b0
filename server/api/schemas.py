"""Request and response bodies of the OpenAI-compatible API.

Requests are validated strictly (``"max_tokens": "10"`` is a type error, not 10) so wrong types
come back as 400 naming the field. Unknown fields are ignored, as most OpenAI-compatible servers
do, so newer clients keep working. Bounds that depend on settings (``max_tokens``, the context)
are checked by the routes.
"""

from __future__ import annotations

import functools
import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


Stop = str | Annotated[list[str], Field(max_length=4)] | None


class _SamplingRequest(_Request):
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1, le=1)] = 1
    stop: Stop = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    """Accepted for compatibility, not applied."""
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    """Accepted for compatibility, not applied."""
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: Stop) -> Stop:
        items = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in items):
            raise ValueError("stop strings must not be empty")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    """Newer name of max_tokens; wins when both are given."""


class CompletionRequest(_SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    """One prompt (a list of exactly one string is accepted too)."""
    echo: Literal[False] = False

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


@functools.cache
def field_names(model: type[BaseModel]) -> frozenset[str]:
    """Every field name of ``model`` and the models nested in it (for error params)."""
    names: set[str] = set()
    todo: list[type[BaseModel]] = [model]
    seen: set[type[BaseModel]] = set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        for name, info in m.model_fields.items():
            names.add(name)
            stack = [info.annotation]
            while stack:
                t = stack.pop()
                if isinstance(t, type) and issubclass(t, BaseModel):
                    todo.append(t)
                stack.extend(getattr(t, "__args__", ()) or ())  # unions, list[...], Annotated
    return frozenset(names)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
