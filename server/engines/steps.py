"""What one engine step computes: the input of a latency profile's step-time model.

A continuous-batching engine (vLLM's scheduler, and the sim engine's GPU-regime model) runs one
forward pass per step over every sequence it scheduled: each decoding sequence adds one token
after reading its whole KV cache, and each prefill chunk computes some new prompt tokens after
reading the tokens already cached before it (a prefix-cache hit or an earlier chunk). The time
of that pass is what a profile's cost model predicts (server/engines/profile.py); the scheduler
(server/engines/scheduler.py) decides what goes into it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepBatch:
    decode_kv: tuple[int, ...] = ()
    """One entry per decoding sequence: tokens already in its KV cache before this step."""
    prefill: tuple[tuple[int, int], ...] = ()
    """One entry per prefill chunk: (new tokens computed in this step, tokens already in the
    sequence's KV cache before the chunk)."""

    @property
    def tokens(self) -> int:
        """New tokens this step computes (what a per-step token budget counts)."""
        return len(self.decode_kv) + sum(new for new, _ in self.prefill)

    @property
    def sequences(self) -> int:
        return len(self.decode_kv) + len(self.prefill)
