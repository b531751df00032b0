"""Workloads for capacity planning: which requests, and their lengths without their text.

A planning workload is one of bench/trace.py's (``standalone``, ``sessions``) or a small YAML
file, and its length distributions can be overridden from the command line
(``--prompt-tokens median=300,high=4096``). The YAML keys are ``trace.Workload``'s fields:

    sessions: false            # true: multi-turn conversations (bench/trace.py)
    prompt: {median: 150, sigma: 0.7, low: 8, high: 1024}    # log-normal, capped
    output: {median: 40, sigma: 1.4, low: 1, high: 384}
    # sessions only:
    context: {median: 1200, sigma: 0.5, low: 256, high: 4000}
    user_turn: {median: 40, sigma: 0.8, low: 4, high: 400}
    turns_mean: 4.0
    turns_max: 8
    think_mean_s: 3.0
    reply_s_per_token: 0.04

Every key is optional (the rest keep ``trace.Workload``'s defaults); a length that leaves out
``median``, ``sigma``, ``low`` or ``high`` keeps the default's value for it.

The discrete-event model needs only arrival times and token counts. ``jobs`` draws exactly what
``trace.generate`` draws, from the same seeded generator in the same order, but never builds
the prompt text nor tokenizes it: a prompt's sim token count is its words plus the chat
template's tokens (5 per message and 5 for the assistant's cue, server/engines/sim.py), and
skipping a word's random draw advances the generator as drawing it would. So ``jobs(rate,
duration, seed, w)`` has the very arrivals, prompt lengths and output lengths of
``trace.generate(rate, duration, seed, w)`` (tests/bench/test_plan.py holds it to that), at
about a tenth of the cost. Sessions carry prefix keys: a turn's prompt is the previous turn's
prompt plus the reply and the new user message, so block ``i`` of a session's prompt is the same
block in every later turn, and no block is shared across sessions.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bench import des, trace

TEMPLATE_TOKENS_PER_MESSAGE = 5
"""Sim tokens of ``<|role|>`` before each message, and of the final ``<|assistant|>`` cue."""
NAMED = {"standalone": trace.Workload(), "sessions": trace.Workload(sessions=True)}
LENGTH_KEYS = ("median", "sigma", "low", "high")


class WorkloadError(ValueError):
    """A workload that cannot be read; the message names the file or flag and the key."""


class _Length(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    median: float = Field(gt=0)
    sigma: float = Field(ge=0)
    low: int = Field(ge=1)
    high: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> _Length:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    sessions: bool = False
    prompt: dict[str, Any] = {}
    output: dict[str, Any] = {}
    context: dict[str, Any] = {}
    user_turn: dict[str, Any] = {}
    turns_mean: float = Field(trace.Workload.turns_mean, ge=1)
    turns_max: int = Field(trace.Workload.turns_max, ge=1)
    think_mean_s: float = Field(trace.Workload.think_mean_s, gt=0)
    reply_s_per_token: float = Field(trace.Workload.reply_s_per_token, ge=0)


def _length(base: trace.LogNormal, values: Mapping[str, Any], where: str) -> trace.LogNormal:
    unknown = sorted(set(values) - set(LENGTH_KEYS))
    if unknown:
        raise WorkloadError(f"{where}.{unknown[0]}: unknown key; allowed: {', '.join(LENGTH_KEYS)}")
    merged = {k: getattr(base, k) for k in LENGTH_KEYS} | dict(values)
    try:
        spec = _Length.model_validate(merged)
    except ValidationError as err:
        raise WorkloadError("; ".join(_problem(e, where) for e in err.errors())) from None
    return trace.LogNormal(spec.median, spec.sigma, spec.low, spec.high)


def _problem(error: Mapping[str, Any], where: str) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    path = f"{where}.{loc}" if loc else where
    msg = error["msg"].removeprefix("Value error, ")
    return f"{path}: {msg} (got {error.get('input')!r})"


def from_mapping(data: Mapping[str, Any], where: str = "workload") -> trace.Workload:
    """A workload from a YAML mapping (keys as in the module docstring)."""
    if not isinstance(data, Mapping):
        raise WorkloadError(f"{where}: expected a mapping of workload keys, got "
                            f"{type(data).__name__}")
    try:
        spec = _Spec.model_validate(dict(data))
    except ValidationError as err:
        problems = []
        for e in err.errors():
            if e["type"] == "extra_forbidden":
                problems.append(f"{where}.{e['loc'][0]}: unknown key; allowed: "
                                f"{', '.join(_Spec.model_fields)}")
            else:
                problems.append(_problem(e, where))
        raise WorkloadError("; ".join(problems)) from None
    base = trace.Workload(sessions=spec.sessions)
    if spec.turns_max < spec.turns_mean:
        raise WorkloadError(f"{where}.turns_max: must be at least turns_mean ({spec.turns_mean})")
    return replace(
        base,
        prompt=_length(base.prompt, spec.prompt, f"{where}.prompt"),
        output=_length(base.output, spec.output, f"{where}.output"),
        context=_length(base.context, spec.context, f"{where}.context"),
        user_turn=_length(base.user_turn, spec.user_turn, f"{where}.user_turn"),
        turns_mean=spec.turns_mean, turns_max=spec.turns_max, think_mean_s=spec.think_mean_s,
        reply_s_per_token=spec.reply_s_per_token)


def named(spec: str) -> tuple[str, trace.Workload]:
    """``standalone``, ``sessions`` or a YAML file: (a label, the workload)."""
    if spec in NAMED:
        return spec, NAMED[spec]
    path = Path(spec)
    if path.suffix not in (".yaml", ".yml"):
        raise WorkloadError(f"--workload: {spec!r} is neither {' nor '.join(NAMED)} nor a "
                            ".yaml file")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise WorkloadError(f"--workload: cannot read {spec}: {exc}") from None
    return path.stem, from_mapping(data or {}, str(path))


def parse_length_flag(text: str, flag: str) -> dict[str, float]:
    """``median=300,sigma=0.6,high=4096`` -> the keys given (checked when applied)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key not in LENGTH_KEYS:
            raise WorkloadError(f"{flag}: {part!r} is not KEY=VALUE with KEY one of "
                                f"{', '.join(LENGTH_KEYS)}")
        try:
            out[key] = float(value) if key in ("median", "sigma") else int(value)
        except ValueError:
            raise WorkloadError(f"{flag}: {key}={value!r} is not a number") from None
    if not out:
        raise WorkloadError(f"{flag}: give at least one of {', '.join(LENGTH_KEYS)}, e.g. "
                            "median=300,high=4096")
    return out


def with_lengths(workload: trace.Workload, prompt: Mapping[str, float] | None = None,
                 output: Mapping[str, float] | None = None) -> trace.Workload:
    """The workload with some length parameters overridden (the flags)."""
    return replace(
        workload,
        prompt=_length(workload.prompt, prompt, "--prompt-tokens") if prompt else workload.prompt,
        output=_length(workload.output, output, "--output-tokens") if output else workload.output)


def describe(workload: trace.Workload) -> str:
    def ln(x: trace.LogNormal) -> str:
        return f"log-normal median {x.median:g}, sigma {x.sigma:g}, {x.low}-{x.high}"

    if not workload.sessions:
        return f"prompt {ln(workload.prompt)} tokens; output {ln(workload.output)} tokens"
    return (f"sessions of {workload.turns_mean:g} turns on average (at most "
            f"{workload.turns_max}), context {ln(workload.context)}, user turn "
            f"{ln(workload.user_turn)}, output {ln(workload.output)} tokens, think "
            f"{workload.think_mean_s:g} s")


# --- lengths without text -------------------------------------------------------------------


class SessionBlocks(Sequence[Hashable]):
    """Prefix keys of a session's prompt: block ``i`` of session ``sid`` (O(1) memory)."""

    __slots__ = ("_base", "_n")

    def __init__(self, sid: int, blocks: int) -> None:
        self._base = sid << 20
        self._n = blocks

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._base + k for k in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._base + (i % self._n)


def _skip_words(rng: random.Random, n: int) -> None:
    # trace._words draws getrandbits(40) per word: two 32-bit outputs of the generator each, as
    # one getrandbits(64 * n) draws 2n (CPython's Mersenne Twister; the test compares traces).
    if n > 0:
        rng.getrandbits(64 * n)


def _prompt_tokens(messages: int, words: int) -> int:
    return TEMPLATE_TOKENS_PER_MESSAGE * (messages + 1) + words


def jobs(rate: float, duration: float, seed: int, workload: trace.Workload = trace.Workload(),
         max_model_len: int | None = None, block_size: int = 16) -> list[des.Job]:
    """The requests of ``trace.generate(rate, duration, seed, workload, max_model_len)`` as
    discrete-event jobs: the same arrivals and token counts, no text. Sessions' jobs carry
    prefix keys in blocks of ``block_size`` tokens."""
    rng = random.Random(seed)
    items: list[tuple[float, int, int, int]] = []  # arrival, prompt tokens, output, session
    if not workload.sessions:
        for t in trace.poisson_arrivals(rate, duration, rng):
            words = workload.prompt.draw(rng)
            _skip_words(rng, words)
            items.append((t, _prompt_tokens(1, words), workload.output.draw(rng), -1))
    else:
        per_session = workload.requests_per_session(seed)
        for s, start in enumerate(trace.poisson_arrivals(rate / per_session, duration, rng)):
            words = workload.context.draw(rng)
            _skip_words(rng, words)
            messages, t = 1, start
            for _turn in range(workload._turns(rng)):
                if t >= duration:
                    break
                user = workload.user_turn.draw(rng)
                _skip_words(rng, user)
                messages, words = messages + 1, words + user
                out = workload.output.draw(rng)
                items.append((t, _prompt_tokens(messages, words), out, s))
                _skip_words(rng, out)
                messages, words = messages + 1, words + out
                t += out * workload.reply_s_per_token + rng.expovariate(1 / workload.think_mean_s)
    items.sort(key=lambda it: it[0])
    out_jobs = []
    for t, n_prompt, out, s in items:
        if max_model_len is not None:
            out = max(1, min(out, max_model_len - n_prompt - 8))
        keys = SessionBlocks(s, n_prompt // block_size) if s >= 0 else None
        out_jobs.append(des.Job(t, n_prompt, out, keys))
    return out_jobs


def jobs_from_trace(tr: trace.Trace, block_size: int = 16) -> list[des.Job]:
    """Discrete-event jobs of a generated trace (its requests' arrivals and token counts);
    session turns carry prefix keys as ``jobs`` gives them."""
    out = []
    for r in tr.requests:
        keys = None
        if r.session is not None:
            keys = SessionBlocks(zlib.crc32(r.session.encode()), r.prompt_tokens // block_size)
        out.append(des.Job(r.arrival, r.prompt_tokens, r.max_tokens, keys))
    return out
