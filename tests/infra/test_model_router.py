"""What only the Gateway path's rendering of the routing policy does, under a real nginx: the
served name in the header the HTTPRoutes match (whatever the body's spelling or the client's own
header), the path for the endpoint picker, the catch-all route's 404, only the API served, and
its TLS variant. The routing cases both renderings share are in test_model_routing.py."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from components.policies.balancing import LoadBalancingConfig
from components.policies.model_routing import (
    MODEL_HEADER,
    PATH_HEADER,
    ModelRoutes,
    RouterPlan,
    error_body,
    router_conf,
    unknown_model_message,
)
from tests.infra.nginx_support import Nginx, request
from tests.infra.test_model_routing import NAMES, model_router, needs_nginx


def _chat(model: str, **extra: object) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": 'say "model": "x"'}],
                       "model": model, "stream": False, **extra}).encode()


@needs_nginx
def test_the_header_carries_the_served_name_the_routes_match(tmp_path: Path):
    with model_router(tmp_path) as (proxy, _, gateway):
        bodies = [_chat(NAMES[0]), _chat(NAMES[1]),
                  b'{"model":"team\\/alpha-chat"}',          # another spelling of NAMES[0]
                  b'{"model":"\\u0062eta:v2.1"}',             # ... of NAMES[1]
                  b'{"messages":[]}']                         # no model: the first model
        for body in bodies:
            status, _, _ = request(proxy.port, "POST", "/v1/chat/completions", body,
                                   {"Content-Type": "application/json"})
            assert status == 200
        assert [seen[MODEL_HEADER.lower()] for seen in gateway.seen] == [
            NAMES[0], NAMES[1], NAMES[0], NAMES[1], NAMES[0]]
        # The endpoint picker learns the API from the path (NGINX Gateway Fabric does not send
        # it).
        assert {seen[PATH_HEADER.lower()] for seen in gateway.seen} == {"/v1/chat/completions"}


@needs_nginx
def test_a_client_cannot_pick_another_model_by_header(tmp_path: Path):
    with model_router(tmp_path) as (proxy, _, gateway):
        request(proxy.port, "POST", "/v1/completions", _chat(NAMES[0]), {MODEL_HEADER: NAMES[1]})
        # An unknown model is answered by the router, whatever the header says.
        status, _, _ = request(proxy.port, "POST", "/v1/completions", _chat("gpt-4o"),
                               {MODEL_HEADER: NAMES[1]})
        assert status == 404
        assert [seen[MODEL_HEADER.lower()] for seen in gateway.seen] == [NAMES[0]]


@needs_nginx
def test_the_catch_all_route_gets_the_same_404(tmp_path: Path):
    """What the Gateway's catch-all HTTPRoute sends on (a header no model's route matched) is
    answered with the policy's 404, naming the header's model when it is a name."""
    routes = ModelRoutes(NAMES)
    with model_router(tmp_path) as (_, not_found, _):
        status, headers, body = request(not_found, "POST", "/v1/chat/completions",
                                        _chat("gpt-4o"), {MODEL_HEADER: "gpt-4o"})
        assert status == 404 and headers["Content-Type"] == "application/json"
        assert body.decode() == error_body(unknown_model_message(routes, "gpt-4o"),
                                           "invalid_request_error", "model", "model_not_found")
        # A header that is not a name is not echoed.
        _, _, body = request(not_found, "POST", "/v1/completions", b"{}", {MODEL_HEADER: 'a"b'})
        assert json.loads(body)["error"]["message"].startswith("The model `(none)` does not")


@needs_nginx
def test_only_the_api_is_served(tmp_path: Path):
    with model_router(tmp_path) as (proxy, _, gateway):
        status, _, body = request(proxy.port, "GET", "/metrics")
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
        assert not gateway.seen


@needs_nginx
def test_the_tls_variant_passes_nginx_t(tmp_path: Path):
    plan = RouterPlan(models=NAMES, gateway_host="127.0.0.1", gateway_port=80,
                      policy=LoadBalancingConfig.model_validate(
                          {"rateLimit": {"requestsPerSecond": 5, "burst": 10}}),
                      max_output_tokens=2048, tls=True, writable_dir=str(tmp_path),
                      user="root" if os.geteuid() == 0 else None)
    conf = router_conf(plan).replace("/etc/llm-router/tls", str(tmp_path))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=llm.example.com", "-keyout", str(tmp_path / "tls.key"),
                    "-out", str(tmp_path / "tls.crt")], capture_output=True, check=True, timeout=30)
    result = Nginx(tmp_path, conf, 0).check()
    assert result.returncode == 0, result.stderr
    assert "limit_req zone=llm_clients burst=10 nodelay;" in conf
    assert "proxy_read_timeout 205s;" in conf


@pytest.mark.parametrize("models", [("a$b", "c"), ("-a", "b"), ("a" * 129, "b"), ("a", "a"), ()])
def test_served_names_the_router_cannot_carry_are_refused(models):
    with pytest.raises(ValueError, match="served model name|at least one"):
        RouterPlan(models=models, gateway_host="g", gateway_port=80,
                   policy=LoadBalancingConfig(), max_output_tokens=512)
