"""/health and /ready through the model's life; lazy imports; `python -m server`."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import httpx
from starlette.testclient import TestClient

from server import create_app, from_env
from server.engines.sim import SimEngine

from .support import FAST_SIM, REPO, free_port, wait_ready


class SlowLoadingEngine(SimEngine):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.release = asyncio.Event()

    async def load(self) -> None:
        await self.release.wait()
        await super().load()


def test_ready_only_after_load_and_requests_wait_for_it() -> None:
    settings = from_env({}, **FAST_SIM)
    engine = SlowLoadingEngine(settings)
    with TestClient(create_app(settings, engine=engine)) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/ready").json() == {"status": "loading"}
        assert c.get("/ready").status_code == 503
        resp = c.post("/v1/completions", json={"model": "sim-llm", "prompt": "x"})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "model_not_ready"
        c.portal.call(engine.release.set)
        deadline = time.monotonic() + 5
        while c.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        ok = c.post("/v1/completions", json={"model": "sim-llm", "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200


def test_failed_load_is_reported_by_health_and_ready(tmp_path) -> None:
    settings = from_env({}, engine="transformers", model=str(tmp_path / "missing"))
    with TestClient(create_app(settings)) as c:
        deadline = time.monotonic() + 60
        while c.get("/health").status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        health = c.get("/health").json()
        assert health == {"status": "error"}  # the cause is logged, never shown unauthenticated
        assert c.get("/ready").json() == {"status": "error"}


def test_sim_server_never_imports_torch() -> None:
    code = ("import sys, server; server.app; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr


def test_python_m_server_serves_and_drains_to_exit_0() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env={"PATH": "/usr/bin:/bin", "LLM_SERVED_MODEL_NAME": "m1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, timeout=30, proc=proc)
        assert httpx.get(base + "/v1/models").json()["data"][0]["id"] == "m1"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
