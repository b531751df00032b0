"""Fault drill: a connection flood and a slow client against local mode's nginx.

``clients`` connections (500 by default) each send one short non-streaming request at once:
every one must get an answer - 200, or 429 with Retry-After from a replica (admission) or from
nginx (its per-client connection cap) - and none may be reset or left unanswered. Then one
client sends its headers and a part of its body and stalls: nginx must close it within
``client_body_timeout`` (plus 2 s of slack) instead of holding the connection.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter
from typing import Any

from bench.faults.model import Check, Counts, DrillResult
from bench.stats import percentile
from components.policies.balancing import CLIENT_BODY_TIMEOUT_SECONDS


async def _one(port: int, api_key: str, model: str, i: int) -> tuple[str, float, bool]:
    """(outcome, seconds to the answer, Retry-After present) of one request on its own
    connection; outcome is the status code or what went wrong."""
    body = json.dumps({"model": model, "max_tokens": 5,
                       "messages": [{"role": "user", "content": f"flood {i}"}]}).encode()
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return f"connect {type(exc).__name__}", time.monotonic() - t0, False
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Connection: close\r\nAuthorization: Bearer " + api_key.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=60)
    except (OSError, TimeoutError) as exc:
        return type(exc).__name__, time.monotonic() - t0, False
    finally:
        writer.close()
    took = time.monotonic() - t0
    if not data.startswith(b"HTTP/1.1 "):
        return "closed without answer", took, False
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    return data.split(b" ", 2)[1].decode(), took, b"\r\nretry-after:" in head


def flood(port: int, api_key: str, model: str, clients: int) -> list[tuple[str, float, bool]]:
    async def run() -> list[tuple[str, float, bool]]:
        return list(await asyncio.gather(*(_one(port, api_key, model, i)
                                           for i in range(clients))))
    return asyncio.run(run())


def slow_body_held_for(port: int, limit_s: float) -> float:
    """Seconds nginx keeps a connection whose body stalls after a few bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit_s) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\":")
        t0 = time.monotonic()
        try:
            while sock.recv(4096):
                pass
        except (ConnectionResetError, TimeoutError):
            pass
        return time.monotonic() - t0


def flood_checks(outcomes: Counter[str], retry_after_missing: int, held_s: float,
                 body_timeout_s: float) -> list[Check]:
    answered = outcomes["200"] + outcomes["429"]
    others = {k: v for k, v in outcomes.items() if k not in ("200", "429")}
    return [
        Check("every connection answered", not others,
              f"{answered} answered 200/429; other outcomes: {others or 'none'}"),
        Check("some admitted", outcomes["200"] > 0, f"{outcomes['200']} got 200"),
        Check("Retry-After on every 429", retry_after_missing == 0,
              f"{retry_after_missing} of {outcomes['429']} lack it"),
        Check("slow body cut off", held_s <= body_timeout_s + 2,
              f"held {held_s:.1f} s (client_body_timeout {body_timeout_s:g} s)"),
    ]


def drill_flood(cluster: Any, clients: int = 500) -> DrillResult:
    t0 = time.monotonic()
    results = flood(cluster.port, cluster.api_key, cluster.model_name, clients)
    outcomes = Counter(r[0] for r in results)
    missing = sum(1 for status, _, retry in results if status == "429" and not retry)
    lat429 = [took for status, took, _ in results if status == "429"]
    lat200 = [took for status, took, _ in results if status == "200"]
    held = slow_body_held_for(cluster.port, CLIENT_BODY_TIMEOUT_SECONDS + 10)
    checks = flood_checks(outcomes, missing, held, CLIENT_BODY_TIMEOUT_SECONDS)
    counts = Counts(sent=clients, succeeded=outcomes["200"],
                    failed=clients - outcomes["200"] - outcomes["429"],
                    rejected=outcomes["429"])
    notes = [f"{clients} connections at once: " + ", ".join(
                 f"{k}: {v}" for k, v in sorted(outcomes.items())),
             (f"429 answered in p50 {percentile(lat429, 50) * 1e3:.0f} ms, p99 "
              f"{percentile(lat429, 99) * 1e3:.0f} ms; 200 in p50 "
              f"{percentile(lat200, 50):.2f} s, p99 {percentile(lat200, 99):.2f} s"),
             f"a client stalling its body was held {held:.1f} s"]
    notes += [f"{'ok  ' if c.passed else 'MISS'} {c.name}: {c.detail}" for c in checks]
    return DrillResult(f"connection flood ({clients})", counts,
                       "every connection answered 200/429 (none reset); slow body cut off",
                       checks, notes, time.monotonic() - t0)
