"""The base of every stack configuration section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class Section(BaseModel):
    """Frozen, unknown keys rejected, camelCase keys in the stack file."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        str_strip_whitespace=True,
        # Field docstrings become descriptions: the README's reference table.
        use_attribute_docstrings=True,
    )
