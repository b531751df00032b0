"""Simulated engine: a latency model with no weights, for load-balancing tests and benchmarks.

Model (documented in server/README.md):

* Prefill: a new sequence pays ``prefill_base_ms + prefill_ms_per_token * uncached_tokens`` and
  then emits its first token. ``uncached_tokens`` is the prompt length minus what the
  :class:`PrefixCache` reports as already cached; the default cache caches nothing, so a later
  prefix-cache only has to implement ``PrefixCache`` (no change to the cost formula).
  Prefills run concurrently with each other and with decoding.
* Decode: ONE engine-wide loop (like continuous batching). A step takes
  ``decode_base_ms + decode_ms_per_seq * active`` where ``active`` is the number of sequences in
  the batch when the step starts; at its end every one of them receives one token. A sequence that
  finishes prefill joins at the next step boundary.
* The slot limit (LLM_MAX_CONCURRENCY) and the wait queue are enforced by the admission controller
  in front of every engine.
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
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.engines.base import Engine, SamplingParams, Token
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


@dataclass(frozen=True)
class SimParams:
    prefill_base_s: float
    prefill_per_token_s: float
    decode_base_s: float
    decode_per_seq_s: float

    @classmethod
    def from_settings(cls, s: Settings) -> SimParams:
        return cls(
            prefill_base_s=s.sim_prefill_base_ms / 1000,
            prefill_per_token_s=s.sim_prefill_ms_per_token / 1000,
            decode_base_s=s.sim_decode_base_ms / 1000,
            decode_per_seq_s=s.sim_decode_ms_per_seq / 1000,
        )

    def prefill_seconds(self, uncached_tokens: int) -> float:
        return self.prefill_base_s + self.prefill_per_token_s * uncached_tokens

    def decode_step_seconds(self, active: int) -> float:
        return self.decode_base_s + self.decode_per_seq_s * active


class PrefixCache(Protocol):
    """How many leading prompt tokens are already cached (their prefill is free)."""

    def cached_prefix_len(self, prompt_ids: Sequence[int]) -> int: ...

    def insert(self, prompt_ids: Sequence[int]) -> None: ...


class NoPrefixCache:
    def cached_prefix_len(self, prompt_ids: Sequence[int]) -> int:
        return 0

    def insert(self, prompt_ids: Sequence[int]) -> None:
        return None


@dataclass(eq=False)
class _Seq:
    tokens: asyncio.Queue[None] = field(default_factory=asyncio.Queue)


class SimEngine(Engine):
    kind = "sim"

    def __init__(self, settings: Settings, prefix_cache: PrefixCache | None = None) -> None:
        self.params = SimParams.from_settings(settings)
        self._context_length = settings.max_model_len
        self.prefix_cache: PrefixCache = prefix_cache or NoPrefixCache()
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

    async def load(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._decode_loop(), name="sim-decode-loop")

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

    def model_card(self) -> dict[str, Any]:
        p = self.params
        return {
            "simulated": True,
            "description": (
                "Simulated model: no weights, deterministic text, latency from a model "
                f"(prefill {p.prefill_base_s * 1000:g} ms + {p.prefill_per_token_s * 1000:g} "
                f"ms/token; decode step {p.decode_base_s * 1000:g} ms + "
                f"{p.decode_per_seq_s * 1000:g} ms per active sequence)"
            ),
        }

    def prefill_seconds(self, prompt_ids: Sequence[int]) -> float:
        uncached = len(prompt_ids) - self.prefix_cache.cached_prefix_len(prompt_ids)
        return self.params.prefill_seconds(max(0, uncached))

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

    async def _decode_loop(self) -> None:
        next_start: float | None = None
        while True:
            if not self._active and not self._joining:
                self._wakeup.clear()
                await self._wakeup.wait()
                next_start = None
            now = time.monotonic()
            # Drift-free schedule; if we fell behind by more than one base step (overload, idle
            # restart), start now instead of bursting to catch up.
            if next_start is None or now - next_start > self.params.decode_base_s:
                next_start = now
            self._active.update(self._joining)
            self._joining.clear()
            batch = list(self._active)
            end = next_start + self.params.decode_step_seconds(len(batch))
            delay = end - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.steps += 1
            for seq in batch:
                if seq in self._active:  # it may have left during the step
                    seq.tokens.put_nowait(None)
            next_start = end
