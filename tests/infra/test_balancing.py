"""The load-balancing policy: derived values, both renderings, and nginx itself running them."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from components.policies.balancing import (
    SNIPPET_ANNOTATIONS,
    UPSTREAM_SERVER_KEEPALIVE_SECONDS,
    LoadBalancingConfig,
    ingress_annotations,
    read_timeout_seconds,
    send_timeout_seconds,
)
from components.policies.nginx_conf import nginx_conf
from tests.contracts import facts
from tests.infra.nginx_support import NGINX, Nginx, Upstream, free_port, nginx_runner, request

METHODS = ("round_robin", "least_conn", "random_two_least_conn", "session_hash")
TOKENS = 512

# As root, nginx workers run as `nobody` and cannot write into the private 0700 tmp prefix.
AS_ROOT_USER = "root" if os.geteuid() == 0 else None

# Skipped on a laptop without nginx; never in CI, where .ci/run installs it and
# a missing binary must fail loudly instead of passing as skipped.
needs_nginx = pytest.mark.skipif(
    NGINX is None and not os.environ.get("CI"),
    reason="nginx binary not installed (apt-get install nginx-light)",
)


def policy(**values: Any) -> LoadBalancingConfig:
    return LoadBalancingConfig.model_validate(values)


def upstream_block(conf: str) -> str:
    return conf.split("upstream llm {", 1)[1].split("}", 1)[0]


def main_location(conf: str) -> str:
    return conf.split("location /v1/ {", 1)[1].split("}", 1)[0]


# --- derived values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, per_token, floor, expected",
    [
        (512, 0.1, 60, 60),      # 51.2 s of budget: the floor wins
        (4096, 0.1, 60, 410),    # 409.6 s, rounded up
        (600, 0.1, 60, 60),      # exactly 60, not 61 from floating-point noise
        (2000, 0.05, 30, 100),
        (1, 0.1, 1, 1),
    ],
)
def test_timeouts_are_tokens_times_budget_with_a_floor(tokens, per_token, floor, expected):
    p = policy(perTokenSeconds=per_token, timeoutFloorSeconds=floor)
    assert read_timeout_seconds(p, tokens) == expected
    assert send_timeout_seconds(p, tokens) == expected
    annotations = ingress_annotations(p, tokens)
    assert annotations["nginx.org/proxy-read-timeout"] == f"{expected}s"
    assert annotations["nginx.org/proxy-send-timeout"] == f"{expected}s"
    location = main_location(nginx_conf(p, ["127.0.0.1:8000"], 8080, tokens))
    assert f"proxy_read_timeout {expected}s;" in location
    assert f"proxy_send_timeout {expected}s;" in location


# --- the two renderings agree ---------------------------------------------------------------


@pytest.mark.parametrize(
    "method, annotation, directive",
    [
        ("round_robin", "round_robin", None),
        ("least_conn", "least_conn", "least_conn;"),
        ("random_two_least_conn", "random two least_conn", "random two least_conn;"),
        ("session_hash", "hash $http_x_session_id consistent",
         "hash $http_x_session_id consistent;"),
    ],
)
def test_each_method_renders_the_controller_value_and_the_nginx_directive(
    method, annotation, directive
):
    p = policy(method=method)
    assert ingress_annotations(p, TOKENS)["nginx.org/lb-method"] == annotation
    block = upstream_block(nginx_conf(p, ["127.0.0.1:8000", "127.0.0.1:8001"], 8080, TOKENS))
    methods = ("least_conn", "random", "hash", "ip_hash")
    if directive is None:
        assert not any(line.strip().startswith(methods) for line in block.splitlines())
    else:
        assert f"        {directive}\n" in block
        # nginx requires the method before `keepalive` in the upstream block.
        assert block.index(directive) < block.index("keepalive ")
    assert "zone llm_upstream 64k;" in block


def test_session_hash_uses_the_configured_header():
    p = policy(method="session_hash", sessionHeader="X-Conversation-Id")
    assert ingress_annotations(p, TOKENS)["nginx.org/lb-method"] == (
        "hash $http_x_conversation_id consistent"
    )
    assert "hash $http_x_conversation_id consistent;" in nginx_conf(
        p, ["127.0.0.1:8000"], 8080, TOKENS
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rate_limit", [None, {"requestsPerSecond": 5, "burst": 10}])
def test_annotations_are_controller_keys_without_snippets(method, rate_limit):
    annotations = ingress_annotations(policy(method=method, rateLimit=rate_limit), TOKENS)
    for key, value in annotations.items():
        assert key.startswith("nginx.org/"), key
        assert isinstance(value, str) and value and "\n" not in value and ";" not in value
    assert not SNIPPET_ANNOTATIONS & annotations.keys()
    # Each is read, and its value accepted, by the pinned controller (tests/contracts).
    assert facts.annotation_problems(annotations, facts.pinned("nginx-ingress-controller")) == []
    assert SNIPPET_ANNOTATIONS <= set(facts.pinned("nginx-ingress-controller")["annotations"])


def test_buffering_is_off_in_both_renderings():
    p = policy()
    assert ingress_annotations(p, TOKENS)["nginx.org/proxy-buffering"] == "False"
    location = main_location(nginx_conf(p, ["127.0.0.1:8000"], 8080, TOKENS))
    assert "proxy_buffering off;" in location
    assert "proxy_ignore_headers X-Accel-Buffering;" in location
    assert "proxy_cache off;" in location


def test_retries_never_include_timeouts_and_are_the_same_in_both():
    p = policy(retryTries=3, retryWindowSeconds=7)
    annotations = ingress_annotations(p, TOKENS)
    location = main_location(nginx_conf(p, ["127.0.0.1:8000"], 8080, TOKENS))
    conditions = annotations["nginx.org/proxy-next-upstream"]
    assert set(conditions.split()) == {"error", "http_502", "http_503", "non_idempotent"}
    assert f"proxy_next_upstream {conditions};" in location
    assert "timeout" not in conditions.split()
    assert annotations["nginx.org/proxy-next-upstream-tries"] == "3"
    assert "proxy_next_upstream_tries 3;" in location
    assert annotations["nginx.org/proxy-next-upstream-timeout"] == "7s"
    assert "proxy_next_upstream_timeout 7s;" in location
    # Unbuffered request bodies cannot be retried once sending began: keep them buffered.
    assert "proxy_request_buffering on;" in location


def test_upstream_keepalive_and_passive_health_settings():
    p = policy(keepaliveConnections=16, keepaliveTimeoutSeconds=3, maxFails=2,
               failTimeoutSeconds=20, clientMaxBodySize="2m", connectTimeoutSeconds=4)
    annotations = ingress_annotations(p, TOKENS)
    assert annotations["nginx.org/keepalive"] == "16"
    assert annotations["nginx.org/max-fails"] == "2"
    assert annotations["nginx.org/fail-timeout"] == "20s"
    assert annotations["nginx.org/client-max-body-size"] == "2m"
    assert annotations["nginx.org/proxy-connect-timeout"] == "4s"
    conf = nginx_conf(p, ["127.0.0.1:8000", "127.0.0.1:8001"], 8080, TOKENS)
    block = upstream_block(conf)
    assert "server 127.0.0.1:8000 max_fails=2 fail_timeout=20s;" in block
    assert "server 127.0.0.1:8001 max_fails=2 fail_timeout=20s;" in block
    assert "keepalive 16;" in block and "keepalive_timeout 3s;" in block
    assert "client_max_body_size 2m;" in conf
    location = main_location(conf)
    assert "proxy_http_version 1.1;" in location and 'proxy_set_header Connection "";' in location
    assert "proxy_connect_timeout 4s;" in location
    no_reuse = upstream_block(nginx_conf(policy(keepaliveConnections=0), ["127.0.0.1:8000"],
                                         8080, TOKENS))
    assert "keepalive" not in no_reuse


def test_rate_limit_renders_in_both_or_neither():
    assert not any("limit-req" in k for k in ingress_annotations(policy(), TOKENS))
    assert "limit_req" not in nginx_conf(policy(), ["127.0.0.1:8000"], 8080, TOKENS)
    p = policy(rateLimit={"requestsPerSecond": 5, "burst": 10})
    annotations = ingress_annotations(p, TOKENS)
    assert annotations["nginx.org/limit-req-rate"] == "5r/s"
    assert annotations["nginx.org/limit-req-burst"] == "10"
    assert annotations["nginx.org/limit-req-key"] == "${binary_remote_addr}"
    conf = nginx_conf(p, ["127.0.0.1:8000"], 8080, TOKENS)
    assert "limit_req_zone $binary_remote_addr zone=llm_rate:10m rate=5r/s;" in conf
    assert "limit_req zone=llm_rate burst=10 nodelay;" in main_location(conf)
    health = conf.split("location = /nginx-health {", 1)[1].split("}", 1)[0]
    assert "limit_req" not in health


def test_every_writable_path_is_inside_the_prefix(tmp_path):
    conf = nginx_conf(policy(), ["127.0.0.1:8000"], 8080, TOKENS, prefix=tmp_path)
    for directive in ("pid", "error_log", "access_log", "client_body_temp_path",
                      "proxy_temp_path", "fastcgi_temp_path", "uwsgi_temp_path",
                      "scgi_temp_path"):
        [line] = [l.strip() for l in conf.splitlines()
                  if l.strip().startswith(directive + " ") and not l.strip().endswith(" off;")]
        assert line.split()[1].startswith(str(tmp_path) + "/"), line
    assert "daemon off;" in conf and "listen 127.0.0.1:8080;" in conf


# --- validation: bad values fail with messages naming the field ------------------------------


@pytest.mark.parametrize(
    "values, field, hint",
    [
        ({"keepaliveTimeoutSeconds": UPSTREAM_SERVER_KEEPALIVE_SECONDS},
         "keepaliveTimeoutSeconds", "must be below the upstream servers' own keep-alive"),
        ({"keepaliveTimeoutSeconds": 30}, "keepaliveTimeoutSeconds", "1 to 4"),
        ({"sessionHeader": "X_Session_ID"}, "sessionHeader", "letters, digits"),
        ({"sessionHeader": "X-Session;include /etc/passwd"}, "sessionHeader", "header name"),
        ({"sessionHeader": "X Session"}, "sessionHeader", "header name"),
        ({"clientMaxBodySize": "1g"}, "clientMaxBodySize", "'512k' or '1m'"),
        ({"clientMaxBodySize": "1m; allow all"}, "clientMaxBodySize", "nginx size"),
        ({"method": "ip_hash"}, "method", "'random_two_least_conn'"),
        ({"method": "random two least_conn"}, "method", "'session_hash'"),
        ({"retryTries": 0}, "retryTries", "greater than or equal to 1"),
        ({"perTokenSeconds": 0}, "perTokenSeconds", "greater than 0"),
        ({"rateLimit": {"requestsPerSecond": 0}}, "rateLimit", "greater than or equal to 1"),
        ({"keepalive": 4}, "keepalive", "Extra inputs are not permitted"),
    ],
)
def test_bad_values_fail_naming_the_field_and_what_is_allowed(values, field, hint):
    with pytest.raises(ValidationError) as caught:
        policy(**values)
    [error] = caught.value.errors()
    assert error["loc"][0] == field
    assert hint in error["msg"]


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1:8000;include /etc/passwd", "127.0.0.1:8000 backup", "127.0.0.1",
     "127.0.0.1:0", "127.0.0.1:70000", "bad_host:80", "[nothex]:80", "a b:80", "${x}:80"],
)
def test_upstream_addresses_are_validated(address):
    with pytest.raises(ValueError, match="upstream address"):
        nginx_conf(policy(), [address], 8080, TOKENS)


def test_valid_upstream_forms_and_unsafe_paths():
    conf = nginx_conf(policy(), ["10.0.0.7:8000", "[::1]:8001", "llm-0.llm.svc:8000"],
                      "127.0.0.1:9000", TOKENS)
    assert "server [::1]:8001 " in conf and "server llm-0.llm.svc:8000 " in conf
    with pytest.raises(ValueError, match="at least one upstream"):
        nginx_conf(policy(), [], 8080, TOKENS)
    with pytest.raises(ValueError, match="prefix"):
        nginx_conf(policy(), ["127.0.0.1:8000"], 8080, TOKENS, prefix=Path("/tmp/a b;"))
    with pytest.raises(ValueError, match="listen"):
        nginx_conf(policy(), ["127.0.0.1:8000"], 0, TOKENS)


# --- the real nginx -----------------------------------------------------------------------


@needs_nginx
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rate_limit", [None, {"requestsPerSecond": 5, "burst": 10}])
def test_rendered_conf_passes_nginx_t(tmp_path, method, rate_limit):
    conf = nginx_conf(policy(method=method, rateLimit=rate_limit),
                      ["127.0.0.1:8000", "127.0.0.1:8001"], free_port(), TOKENS, prefix=tmp_path)
    result = Nginx(tmp_path, conf, 0).check()
    assert result.returncode == 0, result.stderr


@pytest.fixture
def upstreams() -> Iterator[dict[str, Upstream]]:
    started: dict[str, Upstream] = {}
    try:
        for name, mode in (("a", "ok"), ("b", "ok"), ("draining", "draining"), ("slow", "slow")):
            started[name] = Upstream(name, mode).start()
        yield started
    finally:
        for upstream in started.values():
            upstream.stop()


@pytest.fixture
def run_nginx(tmp_path) -> Iterator[Any]:
    with nginx_runner(tmp_path) as start:
        yield start


@needs_nginx
def test_first_event_arrives_before_the_upstream_finishes(upstreams, run_nginx):
    a = upstreams["a"]
    proxy = run_nginx(policy(), [a.address])
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/stream HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}")
        received = b""
        deadline = time.monotonic() + 5
        while b"data: first" not in received and time.monotonic() < deadline:
            received += sock.recv(4096)
        assert b"data: first" in received, received
        # Buffering off: the first event is through nginx while the upstream still holds the
        # rest of the stream.
        assert not a.stream_finished.is_set()
        a.stream_release.set()
        while b"[DONE]" not in received and time.monotonic() < deadline:
            received += sock.recv(4096)
    assert b"text/event-stream" in received and b"data: [DONE]" in received


@needs_nginx
def test_nginx_does_not_read_ahead_of_a_slow_client(upstreams, run_nginx):
    """What buffering off means: nginx relays at the client's pace instead of spooling the
    whole response (a first event arrives early even with buffering on, so that alone
    proves nothing)."""
    a = upstreams["a"]
    proxy = run_nginx(policy(), [a.address])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.settimeout(5)
    try:
        sock.connect(("127.0.0.1", proxy.port))
        sock.sendall(b"GET /v1/big HTTP/1.1\r\nHost: t\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        # The client now reads nothing; with buffering on nginx would take all 48 MiB.
        assert not a.big_finished.wait(timeout=1.5)
    finally:
        sock.close()


@needs_nginx
def test_a_post_whose_body_arrives_late_still_leaves_a_draining_replica(upstreams, run_nginx):
    """Request bodies stay buffered: unbuffered, nginx cannot retry once the body went out."""
    draining, a = upstreams["draining"], upstreams["a"]
    proxy = run_nginx(policy(method="round_robin", maxFails=0), [draining.address, a.address])
    for _ in range(4):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"prompt\":")
            time.sleep(0.1)
            sock.sendall(b' "x"}')
            received = b""
            while chunk := sock.recv(4096):
                received += chunk
        assert received.startswith(b"HTTP/1.1 200"), received[:60]
        assert received.endswith(b"a")
    assert draining.hits >= 2


@needs_nginx
def test_refused_and_draining_replicas_are_skipped(upstreams, run_nginx):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    draining = upstreams["draining"]
    proxy = run_nginx(policy(method="round_robin", retryTries=3),
                      [dead, draining.address, upstreams["a"].address])
    for _ in range(6):
        status, _, body = request(proxy.port, "POST", "/v1/chat/completions", body=b'{"x": 1}',
                                  headers={"Content-Type": "application/json"})
        assert (status, body) == (200, b"a")
    assert draining.hits >= 1  # it was tried, answered 503, and the POST moved on
    # A body past client_body_buffer_size goes through the private client_body_temp_path.
    big = b'{"prompt": "' + b"x" * 200_000 + b'"}'
    assert request(proxy.port, "POST", "/v1/completions", body=big)[0] == 200
    too_big = b"x" * (1024 * 1024 + 1)
    assert request(proxy.port, "POST", "/v1/completions", body=too_big)[0] == 413


@needs_nginx
def test_a_slow_generation_is_never_replayed_on_another_replica(upstreams, run_nginx):
    slow, b = upstreams["slow"], upstreams["b"]
    # A 1 s read timeout, so the slow replica (3 s) times out quickly.
    p = policy(method="round_robin", timeoutFloorSeconds=1, perTokenSeconds=0.001, retryTries=2)
    proxy = run_nginx(p, [slow.address, b.address], tokens=10)
    status, _, _ = request(proxy.port, "POST", "/v1/completions", body=b"{}")
    assert status == 504
    assert (slow.hits, b.hits) == (1, 0)


@needs_nginx
def test_session_hash_pins_a_session_to_one_replica(upstreams, run_nginx):
    a, b = upstreams["a"], upstreams["b"]
    proxy = run_nginx(policy(method="session_hash"), [a.address, b.address])
    for session in ("s1", "s2", "s3", "s4"):
        answers = {request(proxy.port, "POST", "/v1/chat/completions", body=b"{}",
                           headers={"X-Session-ID": session})[2] for _ in range(3)}
        assert len(answers) == 1, (session, answers)
