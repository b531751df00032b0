"""Abuse resistance against real uvicorn servers: a client that hangs up frees its slot at once,
deep JSON is a 400, and `/health` shows no internal detail to unauthenticated callers."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import pytest

from server.api.routes import MAX_JSON_DEPTH, json_depth_exceeds

from .support import RunningServer, parse_metric, wait_for, wait_ready

CHAT = "/v1/chat/completions"


def _open_request(base_url: str, body: dict[str, Any]) -> socket.socket:
    """Send a POST on a raw socket and return it without reading the answer."""
    host, port = base_url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\n"
                 b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    return sock


def _running(srv: RunningServer) -> int:
    return srv.state.admission.running


def _body(srv: RunningServer, max_tokens: int, stream: bool = False) -> dict[str, Any]:
    return {"model": srv.state.settings.model_name, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": "Tell me about load balancers."}]}


@pytest.mark.parametrize("stream", [False, True])
def test_disconnected_clients_free_their_slots_at_once_sim(sim_server, stream: bool) -> None:
    # 400 tokens at 50 ms per step: each generation would hold its slot for 20 s.
    srv = sim_server(max_concurrency=4, max_queue=4, sim_decode_base_ms=50.0, max_tokens=400)
    socks = [_open_request(srv.base_url, _body(srv, 400, stream)) for _ in range(4)]
    wait_for(lambda: _running(srv) == 4, timeout=5)
    time.sleep(0.2)  # mid-generation
    for s in socks:
        s.close()
    took = wait_for(lambda: _running(srv) == 0, timeout=2)
    assert took < 2
    # capacity is back: a new request is admitted and answered
    ok = httpx.post(srv.base_url + CHAT, json=_body(srv, 2), timeout=10)
    assert ok.status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_disconnected_client_frees_its_slot_transformers(hf_server, monkeypatch,
                                                         stream: bool) -> None:
    steps = hf_server.state.engine._loop
    real_decode = steps._forward_decode

    def slow_decode(*args: Any) -> Any:  # ~64 tokens x 50 ms: a 3 s generation
        time.sleep(0.05)
        return real_decode(*args)

    monkeypatch.setattr(steps, "_forward_decode", slow_decode)
    sock = _open_request(hf_server.base_url, _body(hf_server, 64, stream))
    wait_for(lambda: _running(hf_server) == 1 and steps.running == 1, timeout=5)
    time.sleep(0.2)
    sock.close()
    assert wait_for(lambda: _running(hf_server) == 0, timeout=1.5) < 1.5
    # ... and the engine dropped the sequence from its batch at the next step boundary
    assert wait_for(lambda: steps.running == 0, timeout=0.5) < 0.5


def test_client_that_stays_gets_the_whole_answer(sim_server) -> None:
    srv = sim_server(max_tokens=50)
    resp = httpx.post(srv.base_url + CHAT, json=_body(srv, 50), timeout=10)
    assert resp.status_code == 200
    assert resp.json()["usage"]["completion_tokens"] == 50


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1000, 100_000])
def test_deep_json_is_400_invalid_json(shared_sim, depth: int) -> None:
    for body in ("[" * depth + "]" * depth,
                 '{"model": "sim-llm", "messages": ' + "[" * depth + "]" * depth + "}",
                 '{"a":' * depth + "1" + "}" * depth):
        resp = httpx.post(shared_sim.base_url + CHAT, content=body,
                          headers={"content-type": "application/json"}, timeout=10)
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["code"] == "invalid_json" and str(MAX_JSON_DEPTH) in err["message"]
    assert "Traceback" not in resp.text
    metrics = httpx.get(shared_sim.base_url + "/metrics").text
    assert parse_metric(metrics, "llm_requests_rejected_total", 'reason="invalid"') >= 3


def test_json_depth_limit_counts_levels() -> None:
    def nest(n: int) -> object:
        node: object = 1
        for i in range(n):
            node = [node] if i % 2 else {"k": node}
        return node

    for n in (1, MAX_JSON_DEPTH):
        data = nest(n)
        assert not json_depth_exceeds(data, json.dumps(data).encode(), MAX_JSON_DEPTH)
    data = nest(MAX_JSON_DEPTH + 1)
    assert json_depth_exceeds(data, json.dumps(data).encode(), MAX_JSON_DEPTH)
    # realistic requests are far from the limit
    ok = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert not json_depth_exceeds(ok, b"[" * 100, MAX_JSON_DEPTH)


def test_health_hides_the_load_error_which_goes_to_the_log(server_process, tmp_path) -> None:
    missing = tmp_path / "secret-internal-path"
    sp = server_process({"LLM_ENGINE": "transformers", "LLM_MODEL": str(missing),
                         "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, wait=False)
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline
        try:
            resp = httpx.get(sp.base_url + "/health", timeout=1)
            if resp.status_code == 503:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    assert resp.json() == {"status": "error"}
    assert "secret-internal-path" not in resp.text
    assert "secret-internal-path" in sp.output()  # operators still find the cause
    with pytest.raises(TimeoutError):
        wait_ready(sp.base_url, timeout=0.2)
