"""Fault drill: clients hang up mid-generation; their slots must be free within 2 s.

Every slot of every replica is filled with a long generation (``DrillModel.disconnect_tokens``,
several times longer than the bar) through nginx, then every client closes its connection. nginx
closes the upstream connection, the server sees the disconnect and cancels the generation. One
phase with non-streaming requests, one with streaming ones; then as many short requests as
there are slots must all succeed (the capacity is back).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from bench.faults.load import in_flight, wait_idle
from bench.faults.model import Check, Counts, DrillModel, DrillResult

PHASES = (("non-streaming", False), ("streaming", True))


@dataclass(frozen=True)
class DisconnectBounds:
    free_within_s: float = 2.0
    """The bar: every slot of a hung-up client is free this long after the hang-up."""


@dataclass(frozen=True)
class PhaseResult:
    phase: str
    clients: int
    admitted: int
    """Requests generating when the clients hung up (running, summed over the replicas)."""
    freed_after_s: float | None
    """Seconds from the hang-up until no replica had a request running or waiting."""


def disconnect_checks(phases: Sequence[PhaseResult], natural_s: float, followup_ok: int,
                      followups: int, bounds: DisconnectBounds) -> list[Check]:
    """The bar, per phase: all clients were generating, all slots free within the bound; the
    drill proves something only if a generation would have run well past the bound."""
    checks = [Check("generations outlast the bar", natural_s >= 2 * bounds.free_within_s,
                    f"a generation would last {natural_s:.1f} s (>= 2 x "
                    f"{bounds.free_within_s:g} s needed)")]
    for p in phases:
        checks.append(Check(f"{p.phase}: every client generating", p.admitted >= p.clients,
                            f"{p.admitted} of {p.clients} running at the hang-up"))
        freed = p.freed_after_s
        checks.append(Check(f"{p.phase}: slots free within {bounds.free_within_s:g} s",
                            freed is not None and freed <= bounds.free_within_s,
                            "never freed" if freed is None else f"freed after {freed:.2f} s"))
    checks.append(Check("capacity back", followups > 0 and followup_ok == followups,
                        f"{followup_ok} of {followups} follow-up requests succeeded"))
    return checks


def _open(port: int, body: dict[str, Any], api_key: str) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Authorization: Bearer " + api_key.encode() + b"\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    return sock


def _running(urls: Sequence[str]) -> int:
    return sum(in_flight(u) for u in urls)


def _phase(cluster: Any, model: DrillModel, name: str, stream: bool, clients: int,
           hold_s: float, timeout_s: float) -> PhaseResult:
    urls = cluster.replica_urls
    socks = []
    try:
        for i in range(clients):
            body = {"model": cluster.model_name, "max_tokens": model.disconnect_tokens,
                    "stream": stream,
                    "messages": [{"role": "user", "content": f"disconnect {name} {i}"}]}
            socks.append(_open(cluster.port, body, cluster.api_key))
        deadline = time.monotonic() + 10
        while _running(urls) < clients and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(hold_s)  # well into the generation
        admitted = _running(urls)
    finally:
        for sock in socks:
            sock.close()
    cut = time.monotonic()
    freed: float | None = None
    while time.monotonic() - cut < timeout_s:
        if _running(urls) == 0:
            freed = time.monotonic() - cut
            break
        time.sleep(0.02)
    return PhaseResult(name, clients, admitted, freed)


def _followups(cluster: Any, n: int) -> int:
    def one(i: int) -> bool:
        try:
            r = httpx.post(cluster.endpoint + "/chat/completions", timeout=30,
                           headers={"Authorization": f"Bearer {cluster.api_key}"},
                           json={"model": cluster.model_name, "max_tokens": 5,
                                 "messages": [{"role": "user", "content": f"after {i}"}]})
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    with ThreadPoolExecutor(min(n, 32)) as pool:
        return sum(pool.map(one, range(n)))


def drill_disconnect(cluster: Any, model: DrillModel, clients: int | None = None,
                     hold_s: float = 0.5,
                     bounds: DisconnectBounds = DisconnectBounds()) -> DrillResult:
    urls = cluster.replica_urls
    n = clients if clients is not None else len(urls) * model.slots
    natural = model.disconnect_generation_s
    t0 = time.monotonic()
    phases = []
    for name, stream in PHASES:
        wait_idle(urls)
        phases.append(_phase(cluster, model, name, stream, n, hold_s, timeout_s=natural + 5))
    wait_idle(urls)
    ok = _followups(cluster, n)
    checks = disconnect_checks(phases, natural, ok, n, bounds)
    counts = Counts(sent=2 * n + n, succeeded=ok, failed=n - ok, rejected=0)
    notes = [f"{n} clients ({model.slots} slots x {len(urls)} replicas) asked for "
             f"{model.disconnect_tokens} tokens each (about {natural:.1f} s of generation) "
             f"and hung up {hold_s:g} s after all were running"]
    notes += [f"{p.phase}: {p.admitted} generating at the hang-up; slots free after "
              + ("never" if p.freed_after_s is None else f"{p.freed_after_s:.2f} s")
              for p in phases]
    notes += [f"{'ok  ' if c.passed else 'MISS'} {c.name}: {c.detail}" for c in checks]
    return DrillResult("client disconnect", counts,
                       f"slots free within {bounds.free_within_s:g} s of the hang-up", checks,
                       notes, time.monotonic() - t0)
