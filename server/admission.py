"""Admission control: at most ``max_running`` sequences, at most ``max_waiting`` queued.

A request that finds every slot busy and the queue full is refused at once (the API answers 429
with Retry-After), so memory is bounded by ``max_running + max_waiting`` requests. Waiters are
served first come, first served.

An engine that keeps vLLM's own queues (``Engine.own_queue``: continuous batching, at most
``max_num_seqs`` = LLM_MAX_CONCURRENCY running and the rest waiting inside the engine) gets a
controller that only bounds the total, LLM_MAX_CONCURRENCY + LLM_MAX_QUEUE, and refuses beyond
it; the request gauges then read the engine's counts (:func:`for_engine`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.engines.base import Engine


class Overloaded(Exception):
    """Every slot is busy and the wait queue is full."""


class Aborted(Exception):
    """The server stopped waiting (drain deadline passed) before a slot was free."""


class AdmissionController:
    def __init__(self, max_running: int, max_waiting: int) -> None:
        if max_running < 1 or max_waiting < 0:
            raise ValueError("max_running must be >= 1 and max_waiting >= 0")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._aborted = False

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one running slot for the body of the ``async with``.

        Raises :class:`Overloaded` immediately when the queue is full, :class:`Aborted` when
        :meth:`abort_waiting` is called while queued.
        """
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self._aborted:
            raise Aborted
        if self.running < self.max_running and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.max_waiting:
            raise Overloaded
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # the releaser transfers its slot to us (running is not decremented)
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release()  # we were granted a slot but got cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # hand the slot over
                return
        self.running -= 1

    def abort_waiting(self) -> None:
        """Fail every queued request and refuse new ones (used at the drain deadline)."""
        self._aborted = True
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(Aborted())


def for_engine(engine: Engine, max_concurrency: int, max_queue: int
               ) -> tuple[AdmissionController, Callable[[], int], Callable[[], int]]:
    """The controller in front of ``engine`` and the (running, waiting) gauges' sources."""
    if engine.own_queue:
        admission = AdmissionController(max_concurrency + max_queue, 0)
        return (admission, lambda: engine.requests_running, lambda: engine.requests_waiting)
    admission = AdmissionController(max_concurrency, max_queue)
    return admission, lambda: admission.running, lambda: admission.waiting
