"""Measured capacity: the cluster's sustained request rate at saturation.

Closed loop, straight to the replicas: ``slots`` streams per replica (its LLM_MAX_CONCURRENCY),
each sending the next request of the workload as soon as its previous one ends, so every slot
is always busy and nothing queues. Over a window after a warm-up we count the tokens that
arrive; by the renewal-reward theorem the request rate a saturated slot sustains is its token
rate divided by the mean tokens per request, so

    capacity (requests/s) = tokens/s at saturation / mean output tokens of the workload.

Counting tokens (every stream contributes, long ones included) rather than completions avoids
the bias of a short window against long requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import httpx

from bench.client import SseParser, is_content, request_body
from bench.trace import Request


async def _worker(client: httpx.AsyncClient, url: str, model: str, pool: Sequence[Request],
                  start: int, step: int, window: tuple[float, float], headers: dict[str, str],
                  counts: list[int], salt: str) -> None:
    i = start
    while time.monotonic() < window[1]:
        req = pool[i % len(pool)]
        i += step
        parser = SseParser()
        try:
            async with client.stream("POST", url, json=request_body(req, model, salt),
                                     headers=headers) as r:
                if r.status_code != 200:
                    counts[1] += 1
                    await r.aread()
                    await asyncio.sleep(0.05)
                    continue
                async for data in r.aiter_raw():
                    now = time.monotonic()
                    n = sum(1 for p in parser.feed(data) if is_content(p))
                    if window[0] <= now < window[1]:
                        counts[0] += n
                    if now >= window[1]:
                        break
        except httpx.HTTPError:
            counts[1] += 1
            await asyncio.sleep(0.05)


async def measure(replica_urls: Sequence[str], model: str, api_key: str | None,
                  pool: Sequence[Request], slots: int, warmup: float, duration: float,
                  salt: str = "cap") -> tuple[float, float, int]:
    """Return (capacity requests/s, tokens/s at saturation, errors)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    mean_tokens = sum(r.max_tokens for r in pool) / len(pool)
    t0 = time.monotonic()
    window = (t0 + warmup, t0 + warmup + duration)
    counts = [0, 0]
    n = len(replica_urls) * slots
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120, connect=10)) as c:
        await asyncio.gather(*[
            _worker(c, f"{url}/v1/chat/completions", model, pool, k, n, window, headers,
                    counts, salt)
            for k, url in enumerate(u for u in replica_urls for _ in range(slots))
        ])
    tokens_per_s = counts[0] / duration
    return tokens_per_s / mean_tokens, tokens_per_s, counts[1]
