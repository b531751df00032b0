"""Server settings: every knob is an ``LLM_*`` environment variable, parsed once.

The variable names are a contract with the Kubernetes Deployment (see ``server/README.md``).
``from_env()`` turns pydantic's error list into one line per problem naming the variable, so a
bad value fails at startup with a message an operator can act on.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.engines.profile import Profile, ProfileError, load_profile, parse_profile

ENV_PREFIX = "LLM_"
_log = logging.getLogger(__name__)

# Kubernetes injects `<SERVICE>_SERVICE_HOST`, `<SERVICE>_PORT`, `<SERVICE>_PORT_8000_TCP...`
# for every Service in the namespace ("service links"). A Service named `llm` therefore puts
# `LLM_PORT=tcp://...` into our environment. No setting here is called LLM_PORT or LLM_SERVICE_*
# and those names are exempt from the unknown-variable warning.
_SERVICE_LINK = re.compile(r"^LLM_(SERVICE_HOST|SERVICE_PORT.*|PORT(_\d+_(TCP|UDP|SCTP).*)?)$")


class SettingsError(ValueError):
    """A bad ``LLM_*`` value; the message names every offending variable."""


class Settings(BaseSettings):
    """Frozen, validated server configuration. Field ``x`` is read from ``LLM_X``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="forbid",
        case_sensitive=False,
        env_ignore_empty=True,
    )

    engine: Literal["transformers", "sim"] = "sim"
    """Which engine serves requests. `sim` needs no weights (the default when unset)."""
    model: str | None = None
    """Hugging Face hub id or local directory; required for `transformers`."""
    model_revision: str | None = None
    """Hub revision (branch, tag or commit) for `transformers`."""
    served_model_name: str | None = None
    """Name clients put in `model`; defaults to `LLM_MODEL` (or `sim-llm` for the sim engine)."""
    max_model_len: int = Field(default=2048, ge=16, le=1_048_576)
    """Context window in tokens (prompt + completion). Capped by the model's own limit."""
    max_tokens: int = Field(default=256, ge=1, le=1_048_576)
    """Upper bound for a request's `max_tokens`, and its default when omitted."""
    max_concurrency: int = Field(default=32, ge=1, le=100_000)
    """Sequences generated at once (engine slots)."""
    max_queue: int = Field(default=128, ge=0, le=1_000_000)
    """Requests allowed to wait for a slot; beyond it requests get 429."""
    drain_seconds: float = Field(default=30.0, ge=0, le=86_400)
    """After SIGTERM, how long in-flight requests may run before they are cut."""
    api_key: SecretStr | None = None
    """When set, `/v1/*` requires `Authorization: Bearer <key>`."""
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=1_073_741_824)
    """Largest accepted request body; larger bodies get 413."""
    retry_after_seconds: int = Field(default=1, ge=0, le=3600)
    """Value of the `Retry-After` header on 429 (overload) and 503 (draining) answers."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Level of the server's own logs (uvicorn's are set by its `--log-level`)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`transformers` only: `auto` picks CUDA when present, else CPU."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """`transformers` only: weight dtype; `auto` is float32 on CPU, bfloat16/float16 on CUDA."""
    cuda_graphs: Literal["auto", "on", "off"] = "auto"
    """`transformers` only: replay the decode step as a CUDA graph; `auto` is on for CUDA. Never
    used on a CPU."""

    sim_profile: str | None = None
    """Sim: latency profile, a shipped name (`server/profiles/<name>.yaml`: `cpu-sim`,
    `h200-llama8b`, `h200-llama1b`) or a path to a profile file. Unset: a slots profile made of
    the LLM_SIM_* values below. Set: those LLM_SIM_* values that are given override it."""
    sim_time_dilation: float = Field(default=1.0, gt=0, le=100_000)
    """Sim: every modelled duration (prefill, step) is multiplied by this, so a fast regime can
    run on a few CPU cores; reported in /v1/models so a calibration can undo it."""
    sim_load_seconds: float = Field(default=0.0, ge=0, le=86_400)
    """Sim: how long loading takes before /ready answers 200 (a model's cold start)."""
    sim_prefill_base_ms: float = Field(default=100.0, ge=0, le=600_000)
    """Sim: fixed cost of a prefill."""
    sim_prefill_ms_per_token: float = Field(default=0.5, ge=0, le=60_000)
    """Sim: prefill cost per (uncached) prompt token."""
    sim_decode_base_ms: float = Field(default=40.0, gt=0, le=600_000)
    """Sim: fixed cost of one engine-wide decode step."""
    sim_decode_ms_per_seq: float = Field(default=0.25, ge=0, le=60_000)
    """Sim: extra decode-step cost per active sequence."""
    sim_prefix_cache_tokens: int = Field(default=0, ge=0, le=100_000_000)
    """Sim: prefix-cache capacity in tokens per replica (LRU, whole blocks); 0 turns it off."""
    sim_prefix_cache_block_tokens: int = Field(default=16, ge=1, le=4096)
    """Sim: prefix-cache block size; only whole blocks of a shared prefix are reused."""
    sim_prefill_ms_per_cached_token: float = Field(default=0.0, ge=0, le=60_000)
    """Sim: prefill cost per prompt token found in the prefix cache."""

    @model_validator(mode="after")
    def _check_engine_needs(self) -> Settings:
        if self.engine == "transformers" and not self.model:
            raise ValueError("LLM_MODEL is required when LLM_ENGINE=transformers")
        if self.engine == "sim":
            try:
                self.sim_latency_profile()
            except ProfileError as exc:
                raise ValueError(f"LLM_SIM_PROFILE: {exc}") from None
        if self.max_tokens >= self.max_model_len:
            raise ValueError(
                f"LLM_MAX_TOKENS ({self.max_tokens}) must be smaller than "
                f"LLM_MAX_MODEL_LEN ({self.max_model_len}) to leave room for a prompt"
            )
        return self

    def sim_latency_profile(self) -> Profile:
        """The sim engine's latency model: LLM_SIM_PROFILE with the LLM_SIM_* values given
        explicitly applied over it (or, with no profile named, a slots profile of the LLM_SIM_*
        values and their defaults), dilated by LLM_SIM_TIME_DILATION."""
        given = {f for f in _SLOTS_OVERRIDES if f in self.model_fields_set}
        if self.sim_profile is None:
            profile = parse_profile(_settings_profile(self), "LLM_SIM_* settings")
        else:
            profile = load_profile(self.sim_profile)
            if given and profile.kind != "slots":
                names = ", ".join(sorted(ENV_PREFIX + f.upper() for f in given))
                raise ProfileError(
                    f"{names} set numbers of a slots profile, and {profile.name} is a "
                    f"{profile.kind} profile: write a profile file with the numbers you want")
            if given:
                data = profile.model_dump()
                _set(data, {_SLOTS_OVERRIDES[f]: getattr(self, f) for f in given})
                data["summary"] = (f"{profile.summary} Overridden by "
                                   + ", ".join(sorted(ENV_PREFIX + f.upper() for f in given))
                                   + ".")
                path = profile.path
                profile = parse_profile(data, f"{profile.name} with LLM_SIM_* overrides")
                profile._path = path
        return profile.dilated(self.sim_time_dilation)

    @property
    def model_name(self) -> str:
        """The name served in `/v1/models` and accepted in a request's `model`."""
        if self.served_model_name:
            return self.served_model_name
        if self.model:
            return self.model
        return "sim-llm"


_SLOTS_OVERRIDES = {
    "sim_prefill_base_ms": ("cost", "params", "prefill_base_ms"),
    "sim_prefill_ms_per_token": ("cost", "params", "prefill_ms_per_token"),
    "sim_prefill_ms_per_cached_token": ("cost", "params", "prefill_ms_per_cached_token"),
    "sim_decode_base_ms": ("cost", "params", "decode_base_ms"),
    "sim_decode_ms_per_seq": ("cost", "params", "decode_ms_per_seq"),
    "sim_prefix_cache_tokens": ("scheduler", "prefix_cache_tokens"),
    "sim_prefix_cache_block_tokens": ("scheduler", "prefix_cache_block_tokens"),
}
"""LLM_SIM_* settings and the slots-profile keys they override."""


def _settings_profile(s: Settings) -> dict:
    """A slots profile made of the LLM_SIM_* settings (with their defaults)."""
    data: dict = {
        "name": "sim-settings",
        "summary": "The sim engine's LLM_SIM_* settings (no LLM_SIM_PROFILE given).",
        "provenance": {"source": "chosen", "engine": {"name": "sim", "version": "slots"},
                       "model": "none", "hardware": "any", "date": datetime.date.today(),
                       "method": "LLM_SIM_* environment variables and their defaults"},
        "scheduler": {"kind": "slots", "slots": s.max_concurrency},
        "cost": {"form": "slots-linear", "params": {}},
    }
    _set(data, {path: getattr(s, f) for f, path in _SLOTS_OVERRIDES.items()})
    return data


def _set(data: dict, values: dict[tuple[str, ...], object]) -> None:
    """Set nested keys of ``data`` given by key paths."""
    for path, value in values.items():
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value


def _describe(err: dict) -> str:
    loc = [str(p) for p in err.get("loc", ())]
    if loc:
        name = ENV_PREFIX + loc[0].upper()
        got = err.get("input")
        shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
        return f"{name}: {err['msg']}{shown}"
    return str(err.get("msg", "")).removeprefix("Value error, ")


def from_env(environ: dict[str, str] | None = None, **overrides: object) -> Settings:
    """Build settings from ``environ`` (default ``os.environ``); raise SettingsError if invalid.

    ``overrides`` take precedence over the environment (used by tests and the benchmark).
    """
    env = os.environ if environ is None else environ
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    for key in sorted(env):
        if key.startswith(ENV_PREFIX) and key not in known and not _SERVICE_LINK.match(key):
            _log.warning("ignoring unknown setting %s (known: %s)", key, ", ".join(sorted(known)))
    values: dict[str, object] = {
        k[len(ENV_PREFIX):].lower(): v
        for k, v in env.items()
        if k in known and v != ""
    }
    # Fail closed: an API key variable that is present but blank (an empty Secret) must not
    # silently turn authentication off. Surrounding whitespace (a Secret made from a file with a
    # trailing newline) can never arrive in a header, so it is dropped.
    if "LLM_API_KEY" in env:
        key = env["LLM_API_KEY"].strip()
        if not key:
            raise SettingsError("invalid server settings: LLM_API_KEY is set but blank; "
                                "unset it to serve without authentication")
        values["api_key"] = key
    values.update(overrides)
    try:
        # Values are passed explicitly (not read by BaseSettings itself) so that os.environ and a
        # test's dict go through the same path.
        return Settings.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise SettingsError(f"invalid server settings: {problems}") from None
