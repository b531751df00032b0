"""Latency profiles: an engine's timing model as data, with its provenance and its fit.

A profile is one YAML file, ``server/profiles/<name>.yaml`` (shipped in the server image). It
says what engine it describes and where its numbers come from (``provenance``), how that engine
schedules sequences (``scheduler``), how long its work takes (``cost``) and, for a fitted
profile, how well the cost model matches every measured cell (``fit``). Every consumer (the sim
engine, local mode, the benchmarks, the discrete-event model) reads the profile; nothing keeps
its own copy of the numbers.

Two kinds, by ``scheduler.kind``:

* ``slots`` (cost form ``slots-linear``): today's sim engine. A fixed number of slots; a
  sequence prefills on its own in ``prefill_base + per_token x uncached + per_cached_token x
  cached`` and then joins one engine-wide decode loop whose step takes ``decode_base +
  per_seq x active``. API: :meth:`Profile.prefill_seconds`, :meth:`Profile.decode_step_seconds`.
* ``continuous`` (cost form ``roofline``): a vLLM-style engine that runs one forward pass per
  step over decodes and prefill chunks alike. The scheduler fields keep vLLM's flag names in
  snake_case (``--max-num-seqs`` is ``max_num_seqs``). API: :meth:`Profile.step_seconds` of a
  :class:`~server.engines.steps.StepBatch`.

The ``roofline`` step model (fitted in bench/fit.py; the parameters are in milliseconds,
microseconds or nanoseconds as their names say). With ``N`` tokens in the step, ``S``
sequences, decode KV lengths ``k_i`` and prefill chunks of ``q`` new tokens after ``c`` cached:

    dense     = (weights^h + (compute_per_token x N)^h)^(1/h)  - single_token_discount [N = 1]
    attention = attention_base + kv_read x max(parallel_seqs x max k_i, sum k_i)   (if decodes)
              + prefill_attention x sum q (c + q / 2)
    step      = dense + attention + per_sequence x S

``dense`` is a roofline of the matrix multiplies: a floor while reading the weights dominates,
compute-bound beyond the knee (``h`` is how sharp the knee is); a one-token step runs
matrix-vector kernels and is a little cheaper. Decode attention reads each sequence's KV cache;
it is bound by total KV bytes when the batch fills the GPU, and by the longest sequence when it
does not (below ``parallel_seqs`` sequences the GPU is not full, which is why batch 1 at long
context is slow). Prefill attention is compute: causal query-key pairs.

Time dilation (:meth:`Profile.dilated`) multiplies every modelled duration by ``D``, so a GPU
regime can run on a few CPU cores at ``1/D`` of its speed; an engine reports ``D`` so a
calibration can undo it.

Pure: PyYAML and pydantic only (no torch, no Pulumi); server, local mode and bench import it.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from server.engines.steps import StepBatch

PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"
"""The shipped profiles: ``server/profiles/<name>.yaml``."""
SUFFIX = ".yaml"


class ProfileError(ValueError):
    """A profile that cannot be found or is invalid; the message names the file and the key."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- provenance ---------------------------------------------------------------------------------


class EngineInfo(_Frozen):
    name: str
    """The engine the profile describes (``vllm``, ``transformers``, ``sim``)."""
    version: str
    """Its version, or how it was run (e.g. ``5.24.0, CUDA graphs``)."""


class DataFile(_Frozen):
    file: str
    """A measurement file, relative to ``server/profiles/``."""
    what: str
    """What it holds."""
    model: str | None = None
    """The model's key in that file, when it holds several."""


class Provenance(_Frozen):
    source: Literal["measured-endpoint", "microbenchmark", "chosen"]
    """``measured-endpoint``: probed through an OpenAI-compatible API (``bench calibrate``);
    ``microbenchmark``: forward passes timed on the hardware; ``chosen``: set by hand (say why)."""
    engine: EngineInfo
    model: str
    hardware: str
    date: datetime.date
    method: str
    """How the numbers were obtained (or, for ``chosen``, why they are what they are)."""
    data: tuple[DataFile, ...] = ()
    notes: str | None = None


# --- scheduler ----------------------------------------------------------------------------------


class SlotsScheduler(_Frozen):
    kind: Literal["slots"]
    slots: int = Field(ge=1)
    """Sequences generated at once (the server's ``LLM_MAX_CONCURRENCY``)."""
    prefix_cache_tokens: int = Field(default=0, ge=0)
    """Prefix-cache capacity per replica in tokens (LRU over whole blocks); 0 turns it off."""
    prefix_cache_block_tokens: int = Field(default=16, ge=1)
    """Only whole blocks of a shared prefix are reused."""

    @property
    def admission_slots(self) -> int:
        return self.slots


class ContinuousScheduler(_Frozen):
    """vLLM's scheduler settings, named as its flags in snake_case (``--max-num-seqs``)."""

    kind: Literal["continuous"]
    max_num_seqs: int = Field(ge=1)
    """Sequences in one step at most."""
    max_num_batched_tokens: int = Field(ge=1)
    """New tokens in one step at most (the per-step token budget)."""
    block_size: int = Field(ge=1)
    """KV-cache block in tokens (also the prefix cache's unit)."""
    num_gpu_blocks: int = Field(ge=1)
    """KV-cache capacity in blocks (vLLM profiles memory for it; see ``notes``)."""
    enable_prefix_caching: bool
    enable_chunked_prefill: bool
    long_prefill_token_threshold: int = Field(default=0, ge=0)
    """A prefill chunk takes at most this many tokens of a step; 0: no limit but the budget."""
    notes: str | None = None
    """Where each value comes from."""

    @model_validator(mode="after")
    def _budget_holds_a_full_batch(self) -> ContinuousScheduler:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs}), as vLLM requires")
        return self

    @property
    def kv_cache_tokens(self) -> int:
        return self.num_gpu_blocks * self.block_size

    @property
    def admission_slots(self) -> int:
        return self.max_num_seqs

    def limits(self) -> dict[str, int | bool]:
        """The scheduler's settings as server.engines.scheduler.SchedulerConfig takes them
        (its ``max_num_seqs`` and ``max_model_len`` come from the server's own settings)."""
        return {"kv_cache_tokens": self.kv_cache_tokens,
                "max_num_batched_tokens": self.max_num_batched_tokens,
                "block_size": self.block_size,
                "enable_prefix_caching": self.enable_prefix_caching,
                "enable_chunked_prefill": self.enable_chunked_prefill,
                "long_prefill_token_threshold": self.long_prefill_token_threshold}


# --- cost ---------------------------------------------------------------------------------------


class SlotsLinearParams(_Frozen):
    prefill_base_ms: float = Field(ge=0)
    prefill_ms_per_token: float = Field(ge=0)
    """Per uncached prompt token."""
    prefill_ms_per_cached_token: float = Field(default=0.0, ge=0)
    """Per prompt token found in the prefix cache."""
    decode_base_ms: float = Field(gt=0)
    decode_ms_per_seq: float = Field(ge=0)
    """Per sequence in the decode batch."""

    def prefill_seconds(self, uncached: int, cached: int = 0) -> float:
        return (self.prefill_base_ms + self.prefill_ms_per_token * uncached
                + self.prefill_ms_per_cached_token * cached) / 1e3

    def decode_step_seconds(self, active: int) -> float:
        return (self.decode_base_ms + self.decode_ms_per_seq * active) / 1e3


class SlotsLinearCost(_Frozen):
    form: Literal["slots-linear"]
    params: SlotsLinearParams


class RooflineParams(_Frozen):
    weights_ms: float = Field(gt=0)
    """Floor of the dense part: reading the weights plus fixed per-step work."""
    single_token_discount_ms: float = Field(default=0.0, ge=0)
    """A one-token step runs matrix-vector kernels: this much below the floor."""
    compute_us_per_token: float = Field(gt=0)
    """Dense compute per token once compute-bound."""
    roofline_sharpness: float = Field(ge=1)
    """``h`` of the smooth maximum (1: the two add; large: a hard max)."""
    attention_base_ms: float = Field(ge=0)
    """Fixed cost of decode attention in a step with decodes."""
    kv_read_ns_per_token: float = Field(ge=0)
    """Decode attention per cached token read, when the batch fills the GPU."""
    attention_parallel_seqs: float = Field(ge=1)
    """Sequences whose decode attention fills the GPU; fewer take as long as this many."""
    per_sequence_us: float = Field(ge=0)
    """Per sequence in the step (sampling, logits, per-sequence kernels)."""
    prefill_attention_ns_per_pair: float = Field(ge=0)
    """Prefill attention per causal query-key pair."""

    @model_validator(mode="after")
    def _discount_below_floor(self) -> RooflineParams:
        if self.single_token_discount_ms >= self.weights_ms:
            raise ValueError(f"single_token_discount_ms ({self.single_token_discount_ms}) must "
                             f"be below weights_ms ({self.weights_ms})")
        return self

    def parts(self, batch: StepBatch) -> tuple[float, float, float, float]:
        """(dense, decode attention, prefill attention, per-sequence), in seconds."""
        tokens = batch.tokens
        if tokens == 0:
            return 0.0, 0.0, 0.0, 0.0
        h = self.roofline_sharpness
        dense = (self.weights_ms ** h
                 + (self.compute_us_per_token * 1e-3 * tokens) ** h) ** (1 / h)
        if tokens == 1:
            dense -= self.single_token_discount_ms
        decode = 0.0
        if batch.decode_kv:
            kv = max(self.attention_parallel_seqs * max(batch.decode_kv), sum(batch.decode_kv))
            decode = self.attention_base_ms + self.kv_read_ns_per_token * 1e-6 * kv
        pairs = sum(new * (cached + new / 2) for new, cached in batch.prefill)
        prefill = self.prefill_attention_ns_per_pair * 1e-6 * pairs
        per_seq = self.per_sequence_us * 1e-3 * batch.sequences
        return dense / 1e3, decode / 1e3, prefill / 1e3, per_seq / 1e3

    def step_seconds(self, batch: StepBatch) -> float:
        return math.fsum(self.parts(batch))


class RooflineCost(_Frozen):
    form: Literal["roofline"]
    params: RooflineParams


# --- fit ----------------------------------------------------------------------------------------


class FitCell(_Frozen):
    file: str
    cell: str
    """What was measured, e.g. ``decode batch 16 kv 512``."""
    measured_ms: float
    predicted_ms: float
    error_pct: float
    """(predicted - measured) / measured, in percent."""
    method: str = "engine"
    """How the cell was timed (bench/fit.py: engine, eager, graph_prefill)."""
    note: str | None = None


class Fit(_Frozen):
    method: str
    """How the parameters were fitted, and by which command."""
    method_terms: dict[str, float] = {}
    """Terms of the measurement method, not of the engine (fitted, not used by step_seconds)."""
    cells_counted: int = Field(ge=0)
    """Cells in the median and worst (cells fixed by a method term are listed, not counted)."""
    median_abs_error_pct: float = Field(ge=0)
    worst_abs_error_pct: float = Field(ge=0)
    cells: tuple[FitCell, ...]
    """Every measured cell: measured, predicted, error."""


# --- the profile ----------------------------------------------------------------------------------


Scheduler = Annotated[Union[SlotsScheduler, ContinuousScheduler], Field(discriminator="kind")]
Cost = Annotated[Union[SlotsLinearCost, RooflineCost], Field(discriminator="form")]
_FORM_OF_KIND = {"slots": "slots-linear", "continuous": "roofline"}


class Profile(_Frozen):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    summary: str
    provenance: Provenance
    scheduler: Scheduler
    cost: Cost
    fit: Fit | None = None

    _dilation: float = PrivateAttr(default=1.0)
    _path: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _form_fits_kind(self) -> Profile:
        want = _FORM_OF_KIND[self.scheduler.kind]
        if self.cost.form != want:
            raise ValueError(f"cost.form {self.cost.form!r} does not fit scheduler.kind "
                             f"{self.scheduler.kind!r} (it needs {want!r})")
        if self.provenance.source != "chosen" and self.fit is None:
            raise ValueError(f"provenance.source {self.provenance.source!r} needs a fit "
                             "section (only a chosen profile may have none)")
        return self

    @property
    def kind(self) -> str:
        return self.scheduler.kind

    @property
    def path(self) -> Path | None:
        """The file it was loaded from (None when built in memory)."""
        return self._path

    @property
    def ref(self) -> str:
        """How to name it to another process (``LLM_SIM_PROFILE``): its name when it is a
        shipped profile, else its absolute path."""
        if self._path is not None and self._path.resolve() != profile_path(self.name).resolve():
            return str(self._path.resolve())
        return self.name

    @property
    def time_dilation(self) -> float:
        return self._dilation

    def dilated(self, factor: float) -> Profile:
        """This profile with every modelled duration multiplied by ``factor`` (from the
        undilated one: dilating twice does not compound)."""
        if not (factor > 0 and math.isfinite(factor)):
            raise ProfileError(f"time dilation must be a positive number, got {factor!r}")
        out = self.model_copy()
        out._dilation = float(factor)
        out._path = self._path
        return out

    # Timing API (seconds, dilated) --------------------------------------------------------------

    def step_seconds(self, batch: StepBatch) -> float:
        """One engine step over ``batch`` (continuous profiles)."""
        if not isinstance(self.cost, RooflineCost):
            raise ProfileError(f"profile {self.name} is a {self.kind} profile: it models "
                               "prefill_seconds and decode_step_seconds, not engine steps")
        return self._dilation * self.cost.params.step_seconds(batch)

    def prefill_seconds(self, uncached: int, cached: int = 0) -> float:
        """A prompt's prefill alone on the engine: a slots profile's formula; for a continuous
        profile, one step holding just that prompt (no chunking)."""
        if isinstance(self.cost, SlotsLinearCost):
            return self._dilation * self.cost.params.prefill_seconds(uncached, cached)
        return self.step_seconds(StepBatch(prefill=((uncached, cached),)))

    def decode_step_seconds(self, active: int, kv_tokens: int = 0) -> float:
        """One decode step of ``active`` sequences (each holding ``kv_tokens`` in its KV cache;
        a slots profile ignores them)."""
        if isinstance(self.cost, SlotsLinearCost):
            return self._dilation * self.cost.params.decode_step_seconds(active)
        return self.step_seconds(StepBatch(decode_kv=(kv_tokens,) * active))

    def describe(self) -> str:
        """One line for banners and reports."""
        d = f", time dilated {self._dilation:g}x" if self._dilation != 1 else ""
        if isinstance(self.cost, SlotsLinearCost):
            p, s = self.cost.params, self.scheduler
            assert isinstance(s, SlotsScheduler)
            return (f"profile {self.name} ({self.provenance.source}): prefill "
                    f"{p.prefill_base_ms:g} ms + {p.prefill_ms_per_token:g} ms/uncached token, "
                    f"decode step {p.decode_base_ms:g} ms + {p.decode_ms_per_seq:g} ms x active; "
                    f"{s.slots} slots, prefix cache {s.prefix_cache_tokens} tokens{d}")
        s = self.scheduler
        assert isinstance(s, ContinuousScheduler)
        one = self.decode_step_seconds(1, 512) / self._dilation * 1e3
        full = self.decode_step_seconds(s.max_num_seqs, 512) / self._dilation * 1e3
        return (f"profile {self.name} ({self.provenance.source}, "
                f"{self.provenance.hardware.split(' (')[0]}): "
                f"continuous batching, max_num_seqs {s.max_num_seqs}, "
                f"max_num_batched_tokens {s.max_num_batched_tokens}, KV cache "
                f"{s.kv_cache_tokens} tokens; decode step {one:.1f} ms at batch 1, "
                f"{full:.1f} ms at {s.max_num_seqs} (kv 512){d}")


# --- loading ------------------------------------------------------------------------------------


def profile_path(name: str) -> Path:
    return PROFILE_DIR / f"{name}{SUFFIX}"


def profile_names() -> list[str]:
    """The shipped profiles."""
    return sorted(p.stem for p in PROFILE_DIR.glob(f"*{SUFFIX}"))


def resolve(name_or_path: str | Path) -> Path:
    """A shipped profile's name, or a path to a profile file."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or text.endswith((SUFFIX, ".yml")):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ProfileError(f"profile file {path} does not exist")
        return path
    path = profile_path(text)
    if not path.is_file():
        raise ProfileError(f"unknown profile {text!r}; shipped profiles: "
                           f"{', '.join(profile_names())} (or give a path to a .yaml file)")
    return path


def load_profile(name_or_path: str | Path) -> Profile:
    """Load and validate a profile; :class:`ProfileError` names the file and every bad key."""
    path = resolve(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from None
    profile = parse_profile(data, str(path))
    if path.parent.resolve() == PROFILE_DIR.resolve() and profile.name != path.stem:
        raise ProfileError(f"{path}: name: {profile.name!r} must equal the file name "
                           f"{path.stem!r} for a shipped profile")
    profile._path = path
    return profile


def parse_profile(data: Any, where: str = "<profile>") -> Profile:
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: a profile is a mapping with keys "
                           f"{', '.join(Profile.model_fields)}; got {type(data).__name__}")
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ProfileError(f"{where}: {problems}") from None


_TAGS = {"slots", "continuous", "slots-linear", "roofline"}


def _describe(err: dict[str, Any]) -> str:
    raw = list(err.get("loc", ()))
    loc = list(raw)
    # A discriminated union puts the tag into the path (scheduler.slots.slots): drop it.
    if len(loc) > 1 and loc[0] in ("scheduler", "cost") and loc[1] in _TAGS:
        del loc[1]
    key = ".".join(str(p) for p in loc)
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        allowed = _allowed_keys(raw[:-1])
        msg = "unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    elif err.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        field = "kind" if loc and loc[0] == "scheduler" else "form"
        key = f"{key}.{field}"
        allowed = sorted(_FORM_OF_KIND) if field == "kind" else sorted(_FORM_OF_KIND.values())
        msg = f"must be one of {', '.join(allowed)}"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None or err.get("type") in (
        "missing", "extra_forbidden") else f" (got {got!r})"
    return f"{key}: {msg}{shown}" if key else f"{msg}{shown}"


def _allowed_keys(loc: Iterable[Any]) -> list[str]:
    """The keys a mapping at ``loc`` (pydantic's path, union tags included) may hold."""
    node: Any = Profile
    for part in loc:
        node = _strip(node)
        if get_origin(node) is Union:  # a discriminated union: the part is the tag
            node = next((a for a in get_args(node) if part in _tags_of(a)), None)
            continue
        if isinstance(part, int):
            args = get_args(node)
            node = args[0] if args else None
            continue
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            return []
        field = node.model_fields.get(str(part))
        if field is None:
            return []
        node = field.annotation
    node = _strip(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return []


def _tags_of(model: Any) -> set[str]:
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return set()
    tags: set[str] = set()
    for name in ("kind", "form"):
        field = model.model_fields.get(name)
        if field is not None:
            tags |= set(get_args(field.annotation))
    return tags


def _strip(node: Any) -> Any:
    """Annotated[X, ...] -> X; X | None -> X."""
    while get_origin(node) is Annotated:
        node = get_args(node)[0]
    args = get_args(node)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return node
