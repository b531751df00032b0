"""The small interface every engine implements.

An engine turns prompt token ids into a stream of :class:`Token`. Admission control (how many
sequences run at once), stop strings, metrics and the HTTP layer live outside the engine, so an
engine only has to: load, tokenize, and generate one sequence when asked.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    """Tokens to generate at most (already validated against the context)."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    seed: int | None = None
    """Same seed and prompt give the same text."""


@dataclass(frozen=True)
class Token:
    text: str
    """Text this token adds (may be empty while a multi-byte character is incomplete)."""
    finish_reason: str | None = None
    """Set on the last token: `length` (max_tokens reached) or `stop` (end-of-sequence)."""


class Engine(abc.ABC):
    """One model, many concurrent sequences."""

    kind: str
    """Engine name as in LLM_ENGINE."""
    own_queue: bool = False
    """True for an engine that schedules as vLLM does (continuous batching): it keeps its own
    running and waiting queues, admission control only bounds their total, and the request
    gauges read :attr:`requests_running` / :attr:`requests_waiting`."""

    @property
    @abc.abstractmethod
    def context_length(self) -> int:
        """Tokens a prompt plus its completion may use."""

    @abc.abstractmethod
    async def load(self) -> None:
        """Load weights (may take minutes); called once, in the background, after startup."""

    async def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release resources at shutdown."""

    @abc.abstractmethod
    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Apply the chat template (with the assistant generation prompt) and tokenize."""

    @abc.abstractmethod
    def encode_text(self, text: str) -> list[int]:
        """Tokenize a raw completion prompt."""

    @abc.abstractmethod
    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Token]:
        """Yield one :class:`Token` per generated token; the last one has a finish_reason.

        Closing the iterator early (client gone, stop string hit) must free the sequence.
        """

    def model_card(self) -> dict[str, Any]:
        """Extra fields for `/v1/models`."""
        return {}

    @property
    def requests_running(self) -> int:
        """With ``own_queue``: requests in the engine's batch (vLLM's num_requests_running)."""
        raise NotImplementedError

    @property
    def requests_waiting(self) -> int:
        """With ``own_queue``: requests the engine has not admitted yet or preempted (vLLM's
        num_requests_waiting)."""
        raise NotImplementedError

    def abort_waiting(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """With ``own_queue``: end the sequences that have not started (drain deadline)."""
