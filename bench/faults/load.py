"""Fault drills: open-loop streaming load and replica introspection (/metrics, RSS)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.client import stream_one
from bench.faults.model import FaultRecord


# --- load --------------------------------------------------------------------------------------


async def _stream(client: httpx.AsyncClient, url: str, body: dict, headers: dict[str, str],
                  rec: FaultRecord) -> None:
    """bench.client.stream_one, plus the time the headers came and Retry-After."""

    def headers_arrived(response: httpx.Response) -> None:
        rec.responded = time.monotonic()
        rec.retry_after = response.headers.get("retry-after")

    await stream_one(client, url, body, headers, rec, on_response=headers_arrived)


@dataclass
class LoadRun:
    records: list[FaultRecord]
    action_result: Any = None
    action_error: BaseException | None = None
    action_started: float | None = None
    action_ended: float | None = None
    load_ended: float | None = None
    """When the last request was sent."""

    @property
    def action_done(self) -> bool:
        """The action ran to completion without error before the last request was sent."""
        return (self.action_error is None and self.action_ended is not None
                and self.load_ended is not None and self.action_ended <= self.load_ended)


async def run_load(url: str, model: str, api_key: str, *, rate: float, min_requests: int,
                   max_seconds: float, tokens: tuple[int, int], seed: int,
                   action: Callable[[], Any] | None = None, action_at: float = 0.0,
                   tail_seconds: float = 1.0, stop_early: Callable[[], bool] | None = None,
                   request_timeout: float = 30.0, grace: float = 30.0) -> LoadRun:
    """Open loop at `rate` requests/s (Poisson) to `url` until `min_requests` were sent *and*
    `action` (run in a thread from `action_at` seconds) is over plus `tail_seconds`; never
    longer than `max_seconds` of sending. Streams still open `grace` s later are cancelled."""
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"}
    run = LoadRun([])
    done = threading.Event()
    if action is None:
        done.set()

    def in_thread() -> None:
        run.action_started = time.monotonic()
        try:
            run.action_result = action()  # type: ignore[misc]
        except BaseException as exc:  # noqa: BLE001 - reported in the drill's result
            run.action_error = exc
        finally:
            run.action_ended = time.monotonic()
            done.set()

    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=128)
    timeout = httpx.Timeout(request_timeout, connect=5.0)
    tasks: list[asyncio.Task[None]] = []
    thread: threading.Thread | None = None
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        t0 = time.monotonic()
        next_at = t0
        i = 0
        while True:
            now = time.monotonic()
            if action is not None and thread is None and now - t0 >= action_at:
                thread = threading.Thread(target=in_thread, name="fault", daemon=True)
                thread.start()
            finished = (i >= min_requests and done.is_set()
                        and (run.action_ended is None
                             or now - run.action_ended >= tail_seconds))
            if finished or now - t0 >= max_seconds or (stop_early and stop_early()):
                break
            if now < next_at:
                await asyncio.sleep(min(next_at - now, 0.05))
                continue
            n = rng.randint(*tokens)
            body = {"model": model, "max_tokens": n, "stream": True, "seed": i,
                    "messages": [{"role": "user",
                                  "content": f"drill {seed} request {i}: say {n} words"}]}
            rec = FaultRecord(i, url, next_at)
            run.records.append(rec)
            tasks.append(asyncio.create_task(_stream(client, url, body, headers, rec)))
            i += 1
            next_at += rng.expovariate(rate)
        run.load_ended = time.monotonic()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    for rec in run.records:
        if rec.error is None and not rec.done:
            rec.error = "cancelled: still running after the grace period"
    if thread is not None:
        await asyncio.to_thread(thread.join, 120.0)
    return run


# --- replica introspection ------------------------------------------------------------------


def scrape(url: str, timeout: float = 2.0) -> dict[str, float]:
    """Unlabelled gauges/counters of a replica's /metrics (plus `llm_..._count` series)."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=timeout).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def served(url: str) -> float:
    """Requests that produced a first token on this replica since it started."""
    try:
        return scrape(url).get("llm_time_to_first_token_seconds_count", 0.0)
    except httpx.HTTPError:
        return 0.0


def in_flight(url: str) -> int:
    m = scrape(url, timeout=1.0)
    return int(m.get("llm_requests_running", 0) + m.get("llm_requests_waiting", 0))


def rss_bytes(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def wait_serving(url: str, timeout: float, since: float = 0.0) -> float:
    """Poll until the replica served more than `since` requests; return its count."""
    deadline = time.monotonic() + timeout
    n = served(url)
    while n <= since and time.monotonic() < deadline:
        time.sleep(0.2)
        n = served(url)
    return n


def wait_idle(urls: Sequence[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if sum(in_flight(u) for u in urls) == 0:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
