"""API key on /v1/*; health, ready and metrics stay open."""

from __future__ import annotations

import httpx
import openai
import pytest

from server.auth import bearer_ok


def test_bearer_ok() -> None:
    assert bearer_ok(b"Bearer s3cret", b"s3cret")
    assert bearer_ok(b"bearer s3cret", b"s3cret")
    assert not bearer_ok(b"Bearer s3cre", b"s3cret")
    assert not bearer_ok(b"Basic s3cret", b"s3cret")
    assert not bearer_ok(b"s3cret", b"s3cret")
    assert not bearer_ok(None, b"s3cret")


def test_api_key_required_on_v1(sim_server) -> None:
    srv = sim_server(api_key="s3cret")
    base = srv.base_url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                             ("POST", "/v1/completions")):
            resp = httpx.request(method, base + path, headers=headers, json={})
            assert resp.status_code == 401, (headers, path)
            assert resp.json()["error"]["code"] == "invalid_api_key"
            assert resp.json()["error"]["type"] == "invalid_request_error"
    assert srv.metric("llm_requests_rejected_total", 'reason="auth"') == 9
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(base + path).status_code == 200

    good = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
    assert good.chat.completions.create(model="sim-llm", max_tokens=2, messages=[
        {"role": "user", "content": "hi"}]).usage.completion_tokens == 2
    bad = openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_no_key_configured_means_open(sim_server) -> None:
    srv = sim_server()
    assert httpx.get(srv.base_url + "/v1/models").status_code == 200
