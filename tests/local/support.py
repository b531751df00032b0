"""Helpers for the local-mode tests: ports, per-replica request counts, process checks."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterable
from pathlib import Path

import httpx

from local.procs import alive, port_in_use

FAST_SIM = {
    "LLM_SIM_PREFILL_BASE_MS": "1", "LLM_SIM_PREFILL_MS_PER_TOKEN": "0",
    "LLM_SIM_DECODE_BASE_MS": "1", "LLM_SIM_DECODE_MS_PER_SEQ": "0",
    "LLM_DRAIN_SECONDS": "2",
}
"""Fast generation and a short drain: the tests exercise routing, not latency."""


def free_port_range(count: int) -> int:
    """A first port such that `count` consecutive ports are free on 127.0.0.1."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        base = rng.randrange(20_000, 60_000 - count)
        if not any(port_in_use(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports found")


def served(replica_url: str) -> int:
    """Requests a replica finished (the count of its end-to-end latency histogram)."""
    text = httpx.get(replica_url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("llm_e2e_request_latency_seconds_count "):
            return int(float(line.split()[-1]))
    raise AssertionError(f"no e2e count in {replica_url}/metrics")


def chat(endpoint: str, api_key: str, *, headers: dict[str, str] | None = None,
         max_tokens: int = 1) -> httpx.Response:
    """One non-streaming chat completion through `endpoint`."""
    return httpx.post(
        endpoint + "/chat/completions", timeout=10,
        headers={"Authorization": f"Bearer {api_key}", **(headers or {})},
        json={"model": "sim-llm", "max_tokens": max_tokens,
              "messages": [{"role": "user", "content": "hi"}]},
    )


def assert_gone(pids: Iterable[int], timeout: float = 10.0) -> None:
    """Every PID has exited (or is a zombie awaiting its reaper)."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if alive(pid)], "processes survived the stop"


def processes_with(marker: str) -> list[int]:
    """PIDs whose command line contains `marker` (used only to assert nothing leaked)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            line = raw.replace(b"\0", b" ").decode(errors="replace") + " "
            if marker in line and alive(int(entry)):
                found.append(int(entry))
    return found
