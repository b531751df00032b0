"""The stack configuration of a running Pulumi program: the only module of components/config
that needs the Pulumi SDK. It reads the `llm-serving:*` values the engine hands over, refuses
secrets set in plain text, parses the rest (components/config/parse.py) and returns the secret
values as Outputs, so Pulumi keeps them encrypted end to end.
"""

from __future__ import annotations

from typing import Any

import pulumi
from pydantic import BaseModel, ConfigDict

from components.config.parse import SECRET_KEYS, ConfigError, api_key_problems, parse_stack_config
from components.config.stack import StackConfig
from components.config.types import NAMESPACE


class StackConfigError(ConfigError, pulumi.RunError):
    """A ConfigError raised inside a Pulumi program: RunError makes Pulumi print it without a
    traceback."""


class Secrets(BaseModel):
    """Secret stack values; Outputs so Pulumi keeps them encrypted end to end."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    api_key: pulumi.Output[str] | None = None
    hf_token: pulumi.Output[str] | None = None


def _namespace_keys() -> dict[str, Any]:
    """Every `llm-serving:*` config value the engine handed to this program."""
    values = {**pulumi.runtime.config.get_config_env(), **pulumi.runtime.config.CONFIG.get()}
    prefix = f"{NAMESPACE}:"
    return {k.removeprefix(prefix): v for k, v in values.items() if k.startswith(prefix)}


def _is_secret(full_key: str) -> bool:
    # The engine reports secret keys either through the runtime or, for some
    # language-host versions, through PULUMI_CONFIG_SECRET_KEYS only.
    runtime_config = pulumi.runtime.config
    return runtime_config.is_config_secret(full_key) or (
        full_key in runtime_config.get_config_secret_keys_env()
    )


def load_stack_config() -> tuple[StackConfig, Secrets]:
    """Read and validate this stack's configuration, once, from Pulumi."""
    raw = _namespace_keys()
    problems = [
        f"{NAMESPACE}:{key}: holds a secret; set it with "
        f"`pulumi config set --secret {key} ...`"
        for key in SECRET_KEYS
        if key in raw and not _is_secret(f"{NAMESPACE}:{key}")
    ]
    problems.extend(api_key_problems(raw.get("apiKey")))
    try:
        cfg = parse_stack_config(raw)
    except ConfigError as err:
        problems.extend(err.problems)
    if problems:
        raise StackConfigError(problems)
    config = pulumi.Config(NAMESPACE)
    return cfg, Secrets(
        api_key=config.get_secret("apiKey"), hf_token=config.get_secret("hfToken")
    )
