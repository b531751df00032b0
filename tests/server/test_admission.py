"""Bounded concurrency and queue: 429 with Retry-After beyond them; metrics follow."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.admission import Aborted, AdmissionController, Overloaded

from .support import wait_for

BODY = {"model": "sim-llm", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "max_tokens": 15}


def _stream(base: str) -> tuple[int, int]:
    """Run one streaming request; return (status, number of content chunks)."""
    n = 0
    with httpx.stream("POST", base + "/v1/chat/completions", json=BODY, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content":" ' in line:
                n += 1
        return r.status_code, n


def test_overload_gets_429_with_retry_after(sim_server) -> None:
    srv = sim_server(max_concurrency=1, max_queue=1, retry_after_seconds=3,
                     sim_decode_base_ms=40.0)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_stream, srv.base_url)
        wait_for(lambda: srv.metric("llm_requests_running") == 1, poll=0.02)
        second = pool.submit(_stream, srv.base_url)
        wait_for(lambda: srv.metric("llm_requests_waiting") == 1, poll=0.02)

        third = httpx.post(srv.base_url + "/v1/chat/completions", json=BODY)
        assert third.status_code == 429
        assert third.headers["retry-after"] == "3"
        err = third.json()["error"]
        assert err["code"] == "server_overloaded" and err["message"]
        assert srv.metric("llm_requests_rejected_total", 'reason="overload"') == 1

        # the running and the queued request both complete in full
        assert first.result() == (200, 15)
        assert second.result() == (200, 15)
    assert srv.metric("llm_requests_running") == 0
    assert srv.metric("llm_requests_waiting") == 0
    # capacity is back
    assert httpx.post(srv.base_url + "/v1/chat/completions", json=BODY).status_code == 200


async def _hold(ac: AdmissionController, order: list[int], i: int, gate: asyncio.Event) -> None:
    async with ac.slot():
        order.append(i)
        await gate.wait()


def test_controller_fifo_bound_and_cancellation() -> None:
    async def main() -> None:
        ac = AdmissionController(max_running=1, max_waiting=2)
        gate = asyncio.Event()
        order: list[int] = []
        t0 = asyncio.create_task(_hold(ac, order, 0, gate))
        await asyncio.sleep(0)
        t1 = asyncio.create_task(_hold(ac, order, 1, gate))
        t2 = asyncio.create_task(_hold(ac, order, 2, gate))
        await asyncio.sleep(0)
        assert (ac.running, ac.waiting) == (1, 2)
        with pytest.raises(Overloaded):
            async with ac.slot():
                pass
        t1.cancel()  # a cancelled waiter leaves the queue and does not leak a slot
        await asyncio.sleep(0)
        assert (ac.running, ac.waiting) == (1, 1)
        gate.set()
        await asyncio.gather(t0, t2)
        assert order == [0, 2]
        assert (ac.running, ac.waiting) == (0, 0)

    asyncio.run(main())


def test_abort_waiting_fails_queued_requests() -> None:
    async def main() -> None:
        ac = AdmissionController(max_running=1, max_waiting=5)
        gate = asyncio.Event()
        order: list[int] = []
        holder = asyncio.create_task(_hold(ac, order, 0, gate))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(_hold(ac, order, 1, gate))
        await asyncio.sleep(0)
        ac.abort_waiting()
        with pytest.raises(Aborted):
            await waiter
        gate.set()
        await holder
        assert ac.running == 0 and order == [0]

    asyncio.run(main())


def test_client_disconnect_frees_the_slot(sim_server) -> None:
    srv = sim_server(max_concurrency=1, max_queue=0, sim_decode_base_ms=20.0)
    body = {**BODY, "max_tokens": 250}  # ~5 s if read to the end
    with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # keep the iterator: dropping it closes the connection
        while '"content":" ' not in next(lines):
            pass
        assert srv.metric("llm_requests_running") == 1
        assert srv.state.engine.active_sequences == 1
    # the connection is closed mid-stream: the slot must come back without waiting 5 s
    wait_for(lambda: srv.metric("llm_requests_running") == 0, timeout=3, poll=0.02)
    assert srv.state.engine.active_sequences == 0
    ok = httpx.post(srv.base_url + "/v1/chat/completions", json={**BODY, "stream": False})
    assert ok.status_code == 200
