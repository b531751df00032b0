"""One generation: admission, engine stream, stop strings, metrics, drain cut-off."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from server.admission import AdmissionController
from server.engines.base import Engine, SamplingParams
from server.metrics import Metrics


class StopMatcher:
    """Finds stop strings in streamed text without ever emitting part of one.

    Text that could be the beginning of a stop string is held back until the next piece shows
    whether it is.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self._buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, stopped)."""
        if not self.stops:
            return text, False
        self._buf += text
        hits = [i for i in (self._buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self._buf[: min(hits)]
            self._buf = ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self._buf)), hold, -1):
                if self._buf.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self._buf) - hold
        out, self._buf = self._buf[:cut], self._buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out


@dataclass(frozen=True)
class Finished:
    reason: str
    """`stop`, `length` or `abort` (drain deadline)."""
    completion_tokens: int


ADMITTED = object()
"""First item of :meth:`Generation.run`: a slot was granted (the HTTP answer may start)."""


class Generation:
    def __init__(self, engine: Engine, admission: AdmissionController, metrics: Metrics,
                 aborting: Callable[[], bool]) -> None:
        self.engine = engine
        self.admission = admission
        self.metrics = metrics
        self.aborting = aborting

    async def run(self, prompt_ids: list[int], params: SamplingParams, stops: list[str],
                  arrived: float) -> AsyncIterator[object]:
        """Yield ADMITTED, then text pieces (str), then one :class:`Finished`.

        Raises Overloaded/Aborted (from admission) before ADMITTED.
        """
        async with self.admission.slot():
            yield ADMITTED
            self.metrics.prompt_tokens.inc(len(prompt_ids))
            matcher = StopMatcher(stops)
            count = 0
            reason = "length"
            tokens = self.engine.generate(prompt_ids, params)
            try:
                async for tok in tokens:
                    if tok.finish_reason == "abort" and not tok.text:
                        reason = "abort"  # the engine gave up before a token (drain deadline)
                        break
                    count += 1
                    if count == 1:
                        self.metrics.time_to_first_token.observe(time.monotonic() - arrived)
                    self.metrics.generation_tokens.inc()
                    out, stopped = matcher.feed(tok.text)
                    if out:
                        yield out
                    if stopped:
                        reason = "stop"
                        break
                    if tok.finish_reason:
                        reason = tok.finish_reason
                        break
                    if self.aborting():
                        reason = "abort"
                        break
                if reason != "stop":
                    rest = matcher.flush()
                    if rest:
                        yield rest
            finally:
                await tokens.aclose()
                self.metrics.e2e_latency.observe(time.monotonic() - arrived)
            yield Finished(reason, count)
