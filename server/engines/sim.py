"""Simulated engine: a latency model with no weights, for load-balancing tests and benchmarks.

Model (documented in server/README.md): a ``slots`` latency profile (server/engines/profile.py;
``LLM_SIM_PROFILE`` names one, e.g. ``cpu-sim``, and the ``LLM_SIM_*`` numbers override it),
every duration multiplied by ``LLM_SIM_TIME_DILATION``:

* Prefill: a new sequence pays ``prefill_base_ms + prefill_ms_per_token * uncached_tokens +
  prefill_ms_per_cached_token * cached_tokens`` and then emits its first token. ``cached_tokens``
  is what the :class:`PrefixCache` reports as already cached (a whole number of blocks),
  ``uncached_tokens`` the rest of the prompt. Prefills run concurrently with each other and
  with decoding.
* Prefix cache (:class:`LruPrefixCache`, on when the profile's ``prefix_cache_tokens`` or
  ``LLM_SIM_PREFIX_CACHE_TOKENS`` > 0): like vLLM's automatic prefix caching, per replica, in
  blocks of ``prefix_cache_block_tokens`` (``LLM_SIM_PREFIX_CACHE_BLOCK_TOKENS``).
  A block is identified by its tokens *and everything before it*, so only a shared prefix hits.
  A prompt's full blocks are inserted when its prefill ends (generated tokens are not cached);
  least recently used blocks are evicted beyond the capacity, the tail of a prefix first.
* Decode: ONE engine-wide loop (like continuous batching). A step takes
  ``decode_base_ms + decode_ms_per_seq * active`` where ``active`` is the number of sequences in
  the batch when the step starts; at its end every one of them receives one token. A sequence that
  finishes prefill joins at the next step boundary.
* The slot limit (LLM_MAX_CONCURRENCY) and the wait queue are enforced by the admission controller
  in front of every engine.
* Load: ``load()`` sleeps ``LLM_SIM_LOAD_SECONDS`` (0 by default) before the engine is ready,
  like reading weights, so a new replica's cold start is realistic.
* Text is deterministic: words drawn from a fixed vocabulary by a PRNG seeded with
  ``(seed or 0, prompt token ids)``. The sequence never ends by itself (no end-of-sequence), so
  completions run to ``max_tokens`` unless a stop string matches.
* Tokenizer: ``\\w+|[^\\w\\s]`` (runs of word characters, or single punctuation marks); each
  piece is one token, its id a stable CRC32 of the piece. Generated tokens are " word".

Timing is drift-free: step ``k+1`` is scheduled at the *planned* end of step ``k``, so event-loop
jitter does not accumulate and the model holds under load as long as the CPU keeps up.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.engines.base import Engine, SamplingParams, Token
from server.engines.profile import Profile, SlotsLinearCost, SlotsScheduler
from server.settings import Settings

_PIECE = re.compile(r"\w+|[^\w\s]")
VOCAB = (
    "the", "a", "of", "to", "and", "in", "is", "it", "that", "for", "on", "with", "as", "was",
    "at", "by", "an", "be", "this", "from", "or", "are", "not", "have", "model", "token",
    "server", "cluster", "request", "stream", "latency", "queue", "batch", "decode", "prefill",
    "cache", "node", "pod", "replica", "balance", "load", "metric", "sample", "signal", "drain",
    "ready", "health", "prompt", "context", "window", "quick", "brown", "fox", "jumps", "over",
    "lazy", "dog", "river", "mountain", "cloud", "silver", "garden", "lantern", "harbor",
)


def sim_tokenize(text: str) -> list[int]:
    return [zlib.crc32(piece.encode()) & 0x7FFFFFFF for piece in _PIECE.findall(text)]


def sim_chat_prompt(messages: Sequence[dict[str, Any]]) -> str:
    parts = [f"<|{m['role']}|>\n{m['content']}\n" for m in messages]
    return "".join(parts) + "<|assistant|>\n"


class PrefixCache(Protocol):
    """How many leading prompt tokens are already cached (their prefill is cheap)."""

    def cached_prefix_len(self, prompt_ids: Sequence[int]) -> int: ...

    def insert(self, prompt_ids: Sequence[int]) -> None: ...


class NoPrefixCache:
    def cached_prefix_len(self, prompt_ids: Sequence[int]) -> int:
        return 0

    def insert(self, prompt_ids: Sequence[int]) -> None:
        return None


class LruPrefixCache:
    """Block-granular LRU prefix cache holding at most ``capacity_tokens`` tokens.

    Block ``i`` of a prompt is keyed by a hash of the prompt's first ``(i + 1) * block`` tokens
    (a chain, as in vLLM), so a block is reused only after the same prefix. Only full blocks are
    cached. ``insert`` refreshes a prompt's blocks from the last to the first, so the first block
    is the most recently used: eviction then cuts prefixes from their tail, and a cached prefix
    never has a hole in it. ``hit_tokens`` / ``lookup_tokens`` count what lookups found.
    """

    def __init__(self, capacity_tokens: int, block_tokens: int = 16) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        if capacity_tokens < 0:
            raise ValueError(f"capacity_tokens must be >= 0, got {capacity_tokens}")
        self.block_tokens = block_tokens
        self.capacity_blocks = capacity_tokens // block_tokens
        self._blocks: OrderedDict[Hashable, None] = OrderedDict()  # oldest first
        self.hit_tokens = 0
        self.lookup_tokens = 0
        self.lookups = 0

    @property
    def cached_tokens(self) -> int:
        return len(self._blocks) * self.block_tokens

    def _keys(self, prompt_ids: Sequence[int]) -> list[int]:
        b = self.block_tokens
        keys, h = [], 0
        for start in range(0, len(prompt_ids) - b + 1, b):
            h = hash((h, tuple(prompt_ids[start:start + b])))
            keys.append(h)
        return keys

    def cached_prefix_len(self, prompt_ids: Sequence[int]) -> int:
        return self.lookup(self._keys(prompt_ids), len(prompt_ids))

    def insert(self, prompt_ids: Sequence[int]) -> None:
        self.insert_keys(self._keys(prompt_ids))

    def lookup(self, keys: Sequence[Hashable], num_tokens: int) -> int:
        """:meth:`cached_prefix_len` of a prompt of ``num_tokens`` tokens whose full blocks have
        ``keys`` (the discrete-event model keeps keys, not token ids)."""
        n = 0
        for key in keys:
            if key not in self._blocks:
                break
            n += self.block_tokens
        self.lookups += 1
        self.lookup_tokens += num_tokens
        self.hit_tokens += n
        return n

    def insert_keys(self, keys: Sequence[Hashable]) -> None:
        """:meth:`insert` of a prompt whose full blocks have ``keys``."""
        if self.capacity_blocks == 0:
            return
        for key in reversed(keys):
            self._blocks[key] = None
            self._blocks.move_to_end(key)
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)

    def stats(self) -> dict[str, int]:
        return {"capacity_tokens": self.capacity_blocks * self.block_tokens,
                "block_tokens": self.block_tokens, "cached_tokens": self.cached_tokens,
                "lookups": self.lookups, "lookup_tokens": self.lookup_tokens,
                "hit_tokens": self.hit_tokens}


def prefix_cache_for(scheduler: SlotsScheduler) -> PrefixCache:
    """The cache a slots profile asks for (``LLM_SIM_PREFIX_CACHE_TOKENS`` overrides it); a
    capacity under one block caches nothing."""
    if scheduler.prefix_cache_tokens < scheduler.prefix_cache_block_tokens:
        return NoPrefixCache()
    return LruPrefixCache(scheduler.prefix_cache_tokens, scheduler.prefix_cache_block_tokens)


def sim_model_card(profile: Profile) -> dict[str, Any]:
    """What /v1/models says about a simulated model: its profile and the time dilation (a
    calibration divides measured times by it to recover the profile's own)."""
    if isinstance(profile.cost, SlotsLinearCost):
        p = profile.cost.params
        latency = (f"prefill {p.prefill_base_ms:g} ms + {p.prefill_ms_per_token:g} ms/token; "
                   f"decode step {p.decode_base_ms:g} ms + {p.decode_ms_per_seq:g} ms per "
                   "active sequence")
    else:
        latency = f"continuous batching, step times of {profile.provenance.hardware}"
    dilation = profile.time_dilation
    return {
        "simulated": True,
        "description": (
            "Simulated model: no weights, deterministic text, latency from profile "
            f"{profile.name} ({latency}"
            + (f"; every duration x{dilation:g}" if dilation != 1 else "") + ")"),
        "profile": {"name": profile.name, "kind": profile.kind,
                    "source": profile.provenance.source},
        "time_dilation": dilation,
    }


@dataclass(eq=False)
class _Seq:
    tokens: asyncio.Queue[None] = field(default_factory=asyncio.Queue)


class SimLoopEngine(Engine):
    """What both sim engines share: `load` stands in for reading weights, then starts the
    engine's one background loop (`_run_loop`), which `close` cancels; the sim's tokenizer."""

    kind = "sim"
    load_seconds: float
    _loop_task: asyncio.Task[None] | None
    _loop_name: str

    def _run_loop(self) -> Coroutine[Any, Any, None]:
        raise NotImplementedError

    async def load(self) -> None:
        # Stands in for reading weights: /ready stays 503 until it is over, so autoscaling
        # sees the cold start of a real model (LLM_SIM_LOAD_SECONDS).
        if self.load_seconds > 0:
            await asyncio.sleep(self.load_seconds)
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run_loop(), name=self._loop_name)

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        return sim_tokenize(sim_chat_prompt(messages))

    def encode_text(self, text: str) -> list[int]:
        return sim_tokenize(text)


class SimEngine(SimLoopEngine):
    _loop_name = "sim-decode-loop"

    def __init__(self, settings: Settings, prefix_cache: PrefixCache | None = None,
                 profile: Profile | None = None) -> None:
        self.profile = profile if profile is not None else settings.sim_latency_profile()
        if not isinstance(self.profile.scheduler, SlotsScheduler):
            raise ValueError(f"SimEngine runs slots profiles; {self.profile.name} is "
                             f"{self.profile.kind}")
        self._context_length = settings.max_model_len
        self.load_seconds = settings.sim_load_seconds
        self.prefix_cache: PrefixCache = (
            prefix_cache if prefix_cache is not None else prefix_cache_for(self.profile.scheduler))
        # dicts as ordered sets: O(1) leave with hundreds of sequences
        self._active: dict[_Seq, None] = {}
        self._joining: dict[_Seq, None] = {}
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self.steps = 0

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def active_sequences(self) -> int:
        return len(self._active) + len(self._joining)

    def model_card(self) -> dict[str, Any]:
        card = sim_model_card(self.profile)
        if isinstance(self.prefix_cache, LruPrefixCache):
            # Live counters for the benchmark's hit rates (the sim has no other channel that
            # is not a metrics contract).
            card["prefix_cache"] = self.prefix_cache.stats()
        return card

    def prefill_seconds(self, prompt_ids: Sequence[int]) -> float:
        cached = min(len(prompt_ids), self.prefix_cache.cached_prefix_len(prompt_ids))
        return self.profile.prefill_seconds(len(prompt_ids) - cached, cached)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Token]:
        if self._loop_task is None:
            raise RuntimeError("sim engine not loaded")
        seed = zlib.crc32(repr((params.seed or 0, prompt_ids)).encode())
        rng = random.Random(seed)
        await asyncio.sleep(self.prefill_seconds(prompt_ids))
        self.prefix_cache.insert(prompt_ids)
        remaining = params.max_tokens - 1
        yield Token(" " + rng.choice(VOCAB), None if remaining else "length")
        if not remaining:
            return
        seq = _Seq()
        self._joining[seq] = None
        self._wakeup.set()
        try:
            while remaining:
                await seq.tokens.get()
                remaining -= 1
                yield Token(" " + rng.choice(VOCAB), None if remaining else "length")
        finally:
            self._leave(seq)

    def _leave(self, seq: _Seq) -> None:
        self._joining.pop(seq, None)
        self._active.pop(seq, None)

    async def _run_loop(self) -> None:  # the decode loop
        next_start: float | None = None
        base = self.profile.decode_step_seconds(0)
        while True:
            if not self._active and not self._joining:
                self._wakeup.clear()
                await self._wakeup.wait()
                next_start = None
            now = time.monotonic()
            # Drift-free schedule; if we fell behind by more than one base step (overload, idle
            # restart), start now instead of bursting to catch up.
            if next_start is None or now - next_start > base:
                next_start = now
            self._active.update(self._joining)
            self._joining.clear()
            batch = list(self._active)
            end = next_start + self.profile.decode_step_seconds(len(batch))
            delay = end - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.steps += 1
            for seq in batch:
                if seq in self._active:  # it may have left during the step
                    seq.tokens.put_nowait(None)
            next_start = end
