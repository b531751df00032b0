"""Graceful drain on SIGTERM.

uvicorn's own SIGTERM handling stops accepting connections and closes idle ones at once, and
after shutdown re-raises the signal (so the process would die by SIGTERM, not exit 0). We
replace its handler for SIGTERM while the app runs:

1. SIGTERM -> ``draining`` is set: `/ready` answers 503 and new `/v1/` requests get 503.
2. In-flight requests (streams included) continue until they finish or ``LLM_DRAIN_SECONDS``
   pass; at the deadline, streams are cut (finish_reason ``abort``) and queued requests fail.
3. Then uvicorn is asked to exit the normal way (``Server.should_exit``), which closes the
   listening socket, runs the lifespan shutdown, and the process exits 0.

SIGINT (Ctrl+C) is left to uvicorn: immediate shutdown, as developers expect.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

_log = logging.getLogger(__name__)


class DrainController:
    def __init__(self, drain_seconds: float, on_abort: Callable[[], None]) -> None:
        self.drain_seconds = drain_seconds
        self.draining = False
        self.aborting = False
        self.inflight = 0
        self._on_abort = on_abort
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    def begin(self, then: Callable[[], None]) -> None:
        """Start draining (idempotent); call ``then()`` when idle or at the deadline."""
        if self.draining:
            return
        self.draining = True
        _log.info("draining: %d request(s) in flight, deadline %.1fs",
                  self.inflight, self.drain_seconds)
        self._task = asyncio.get_running_loop().create_task(self._drain(then), name="drain")

    async def _drain(self, then: Callable[[], None]) -> None:
        start = time.monotonic()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=self.drain_seconds)
            _log.info("drained in %.2fs", time.monotonic() - start)
        except TimeoutError:
            _log.warning("drain deadline passed with %d request(s) in flight; cutting them",
                         self.inflight)
            self.aborting = True
            self._on_abort()
            try:  # cut streams end at their next token; give them a moment to say so
                await asyncio.wait_for(self._idle.wait(), timeout=2.0)
            except TimeoutError:
                _log.warning("%d request(s) still open at exit", self.inflight)
        then()


def _ask_uvicorn_to_exit(previous: Any) -> None:
    # `previous` is uvicorn.Server.handle_exit (a bound method) when run by uvicorn. Setting
    # should_exit directly (rather than calling handle_exit) keeps uvicorn from re-raising
    # SIGTERM after shutdown, so the process exits 0.
    server = getattr(previous, "__self__", None)
    if server is not None and hasattr(server, "should_exit"):
        server.should_exit = True
    elif callable(previous):
        previous(signal.SIGTERM, None)
    else:  # not under uvicorn: fall back to the default action
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)


class SigtermHook:
    """Installs the drain handler for SIGTERM; restores the previous one on uninstall."""

    def __init__(self, drain: DrainController) -> None:
        self.drain = drain
        self._previous: Any = None
        self._installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # e.g. uvicorn run in a thread by tests: signals are not ours to take
        loop = asyncio.get_running_loop()
        self._previous = signal.getsignal(signal.SIGTERM)

        def handler(signum: int, frame: Any) -> None:
            loop.call_soon_threadsafe(self.drain.begin,
                                      lambda: _ask_uvicorn_to_exit(self._previous))

        signal.signal(signal.SIGTERM, handler)
        self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False
