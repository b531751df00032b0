"""Helpers for the server tests: ports, readiness, metrics parsing, in-thread uvicorn."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

REPO = Path(__file__).resolve().parents[2]

# Fast sim: tests exercise behaviour, not latency.
FAST_SIM = dict(sim_prefill_base_ms=1.0, sim_prefill_ms_per_token=0.0, sim_decode_base_ms=2.0,
                sim_decode_ms_per_seq=0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, poll: float = 0.01) -> float:
    """Wait until ``cond()``, asking every ``poll`` s; return the seconds it took (fails
    after ``timeout``)."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"condition not reached in {timeout}s"
        time.sleep(poll)
    return time.monotonic() - t0


def wait_ready(base_url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        try:
            if httpx.get(base_url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{base_url} not ready after {timeout}s")


@dataclass
class RunningServer:
    base_url: str
    app: Any

    @property
    def state(self) -> Any:
        return self.app.state.llm

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.base_url + "/metrics").text
        return parse_metric(text, name, labels)


def parse_metric(text: str, name: str, labels: str = "") -> float:
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    raise KeyError(key)


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Run ``app`` with a real uvicorn server on 127.0.0.1 in a background thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout=5)
        sock.close()


@contextlib.contextmanager
def tiny_transformers_server(model_dir: Path, max_concurrency: int) -> Iterator[RunningServer]:
    """The transformers engine on the tiny test model (tests/server/tiny_model.py), served in
    a thread with ``max_concurrency`` slots."""
    from server import create_app, from_env

    settings = from_env({}, engine="transformers", model=str(model_dir),
                        served_model_name="tiny-llama", max_model_len=256, max_tokens=64,
                        max_concurrency=max_concurrency)
    app = create_app(settings)
    with serve_in_thread(app) as base:
        yield RunningServer(base, app)
