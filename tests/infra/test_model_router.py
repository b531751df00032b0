"""The Gateway path's model router under a real nginx: it reads `model` from the body into the
header the HTTPRoutes match, passes the path on for the endpoint picker, lists every model,
answers an unknown model with an OpenAI 404, and streams unbuffered."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from components.policies.balancing import LoadBalancingConfig
from components.policies.model_router import (
    HEALTH_PATH,
    MODEL_HEADER,
    PATH_HEADER,
    RouterPlan,
    not_found_body,
    router_conf,
)
from tests.infra.nginx_support import Nginx, free_port, request
from tests.infra.test_balancing import needs_nginx

MODELS = ("qwen2.5-7b", "Qwen/Qwen2.5-14B-Instruct")


class FakeGateway:
    """Stands in for NGINX Gateway Fabric: records the headers it gets; /stream streams."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.release = threading.Event()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                gateway.seen.append({k.lower(): v for k, v in self.headers.items()})
                if self.path.endswith("/stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self._chunk(b"data: first\n\n")
                    gateway.release.wait(timeout=5)
                    try:
                        self._chunk(b"data: [DONE]\n\n")
                        self.wfile.write(b"0\r\n\r\n")
                        self.wfile.flush()
                    except OSError:
                        pass  # the test hung up after the first event, as intended
                    return
                body = b"routed"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def router(tmp_path: Path) -> Iterator[tuple[int, int, FakeGateway]]:
    gateway = FakeGateway()
    listen, not_found = free_port(), free_port()
    plan = RouterPlan(models=MODELS, gateway_host="127.0.0.1", gateway_port=gateway.port,
                      policy=LoadBalancingConfig(), max_output_tokens=512, listen_port=listen,
                      not_found_port=not_found, writable_dir=str(tmp_path),
                      user="root" if os.geteuid() == 0 else None)
    proxy = Nginx(tmp_path, router_conf(plan), listen)
    # In the foreground, as the pod runs it (its command adds the same -g): stop() ends it.
    proxy.proc = subprocess.Popen(proxy.args("-g", "daemon off;"), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                if request(not_found, "GET", HEALTH_PATH, timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            assert proxy.proc.poll() is None, proxy.error_log()
            assert time.monotonic() < deadline, "router did not start"
            time.sleep(0.05)
        yield listen, not_found, gateway
    finally:
        proxy.stop()
        gateway.stop()


def _chat(model: str, **extra: object) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": 'say "model": "x"'}],
                       "model": model, "stream": False, **extra}).encode()


@needs_nginx
def test_the_body_s_model_becomes_the_header_the_routes_match(router):
    listen, _, gateway = router
    for model in MODELS:
        status, _, body = request(listen, "POST", "/v1/chat/completions", _chat(model),
                                  {"Content-Type": "application/json"})
        assert (status, body) == (200, b"routed")
    assert [seen[MODEL_HEADER.lower()] for seen in gateway.seen] == list(MODELS)
    # The endpoint picker learns the API from the path (NGINX Gateway Fabric does not send it).
    assert {seen[PATH_HEADER.lower()] for seen in gateway.seen} == {"/v1/chat/completions"}


@needs_nginx
def test_a_client_cannot_pick_another_model_by_header(router):
    listen, _, gateway = router
    request(listen, "POST", "/v1/completions", _chat(MODELS[0]), {MODEL_HEADER: MODELS[1]})
    assert gateway.seen[-1][MODEL_HEADER.lower()] == MODELS[0]


@needs_nginx
def test_v1_models_lists_every_model_of_the_stack(router):
    listen, _, gateway = router
    status, headers, body = request(listen, "GET", "/v1/models")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert [m["id"] for m in json.loads(body)["data"]] == list(MODELS)
    assert not gateway.seen


@needs_nginx
def test_an_unknown_model_gets_an_openai_404_naming_the_available_ones(router):
    _, not_found, _ = router
    # What the Gateway's catch-all route sends on: the router's own header, the model unknown.
    status, _, body = request(not_found, "POST", "/v1/chat/completions", _chat("gpt-4o"),
                              {MODEL_HEADER: "gpt-4o"})
    assert status == 404
    assert json.loads(body) == not_found_body(MODELS, "gpt-4o")
    # A name that is not safe to echo is not echoed.
    _, _, body = request(not_found, "POST", "/v1/completions", b"{}", {MODEL_HEADER: 'a"b'})
    assert json.loads(body) == not_found_body(MODELS, "(none)")


@needs_nginx
def test_only_the_api_is_served(router):
    listen, _, gateway = router
    status, _, body = request(listen, "GET", "/metrics")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    assert not gateway.seen


@needs_nginx
def test_streamed_tokens_pass_the_router_unbuffered(router):
    listen, _, gateway = router
    with socket.create_connection(("127.0.0.1", listen), timeout=5) as sock:
        body = _chat(MODELS[0], stream=True)
        sock.sendall(b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        deadline = time.monotonic() + 3
        while b"data: first" not in received and time.monotonic() < deadline:
            received += sock.recv(4096)
        # The first event arrived while the gateway still holds the rest of the stream.
        assert b"data: first" in received and not gateway.release.is_set()
        gateway.release.set()


@needs_nginx
def test_the_tls_variant_passes_nginx_t(tmp_path: Path):
    plan = RouterPlan(models=MODELS, gateway_host="127.0.0.1", gateway_port=80,
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


def test_served_names_the_router_cannot_carry_are_refused():
    with pytest.raises(ValueError, match="served names"):
        RouterPlan(models=("a$b",), gateway_host="g", gateway_port=80,
                   policy=LoadBalancingConfig(), max_output_tokens=512)

