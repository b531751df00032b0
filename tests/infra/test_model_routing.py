"""Routing by the body's `model` (components/policies/model_routing.py): the multi-model
nginx.conf, and a real nginx choosing the same model as the server's JSON parser would, in both
renderings of the policy: local mode's nginx.conf (an upstream per model) and the Gateway path's
model router (the Gateway behind it, the model named in a header). The same routing cases run
against both; what only one of them does is tested on its own (the router's header, path and
catch-all server: test_model_router.py)."""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from components.policies import model_routing as routing
from components.policies.balancing import LoadBalancingConfig
from components.policies.nginx_conf import nginx_conf
from tests.contracts import facts
from tests.infra.nginx_support import (
    NGINX,
    FakeGateway,
    Nginx,
    Upstream,
    free_port,
    nginx_runner,
    request,
)

needs_nginx = pytest.mark.skipif(
    NGINX is None and not os.environ.get("CI"),
    reason="nginx binary not installed (apt-get install nginx-light)",
)
TOKENS = 512
NAMES = ("team/alpha-chat", "beta:v2.1")
MAX_SERVER_DEPTH = 32
"""server/api/routes.py MAX_JSON_DEPTH: the server refuses deeper bodies."""


def policy(**values: Any) -> LoadBalancingConfig:
    return LoadBalancingConfig.model_validate(values)


def two_models(port: int = 8000) -> dict[str, list[str]]:
    return {NAMES[0]: [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"],
            NAMES[1]: [f"127.0.0.1:{port + 2}"]}


# --- rendering --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["round_robin", "least_conn", "session_hash_bounded"])
def test_one_model_renders_exactly_the_single_model_conf(method):
    p = policy(method=method)
    addresses = ["127.0.0.1:8000", "127.0.0.1:8001"]
    single = nginx_conf(p, addresses, 8080, TOKENS, replica_slots=4)
    assert nginx_conf(p, {"any-name": addresses}, 8080, TOKENS, replica_slots=4) == single
    assert "$llm_route" not in single and "mirror" not in single


def test_each_model_gets_an_upstream_with_the_policys_method():
    conf = nginx_conf(policy(method="random_two_least_conn"), two_models(), 8080, TOKENS)
    for index, servers in enumerate(two_models().values()):
        block = conf.split(f"upstream {routing.upstream_name(index)} {{", 1)[1].split("}", 1)[0]
        assert "random two least_conn;" in block
        assert [line.split()[1] for line in block.splitlines() if "server " in line] == servers
    # The body must stay in memory for $request_body, and is read before proxy_pass.
    assert "client_body_buffer_size 1m;" in conf
    api = conf.split("location /v1/ {", 1)[1].split("\n        }", 1)[0]
    assert "mirror /_llm_read_body;" in api and "proxy_pass http://$llm_route;" in api
    assert "proxy_buffering off;" in api


@pytest.mark.parametrize("upstreams, message", [
    ({"a": ["127.0.0.1:8000"], "b": ["127.0.0.1:8000"]}, "upstream addresses repeat"),
    ({"a": ["127.0.0.1:8000"], "b": []}, "model 'b' needs a list of at least one"),
    ({"a": ["127.0.0.1:8000"], "b c": ["127.0.0.1:8001"]}, "served model name 'b c'"),
    ({"a": ["127.0.0.1:8000"], "$x": ["127.0.0.1:8001"]}, "served model name '\\$x'"),
    ({"a": ["127.0.0.1:8000"], "b" * 129: ["127.0.0.1:8001"]}, "served model name 'bbb"),
])
def test_bad_models_are_refused_naming_the_model(upstreams, message):
    with pytest.raises(ValueError, match=message):
        nginx_conf(policy(), upstreams, 8080, TOKENS)


@needs_nginx
@pytest.mark.parametrize("method, rate", [
    ("least_conn", None), ("session_hash", None), ("session_hash_bounded", None),
    ("round_robin", {"requestsPerSecond": 10, "burst": 5}),
])
def test_multi_model_conf_passes_nginx_t(tmp_path, method, rate):
    conf = nginx_conf(policy(method=method, rateLimit=rate, sessionKey="body"), two_models(),
                      free_port(), TOKENS, prefix=tmp_path, replica_slots=4)
    result = Nginx(tmp_path, conf, 0).check()
    assert result.returncode == 0, result.stderr


def test_the_nginx_facts_routing_relies_on_are_recorded():
    nginx = facts.load("nginx", "1.22.1")
    for fact in ("proxyPassVariablesBeforeBody", "mirrorReadsBodyFirst", "bodyReadOnce",
                 "mapRegexErrorIsDefault", "namedCapturesAreVariables", "tryFilesAfterAccess",
                 "authRequestStatuses", "parameterBufferIs4096", "quotedStringEscapes",
                 "pcreJitOffByDefault", "allFullIs502", "requestBodyVariable"):
        assert nginx["facts"][fact] and nginx["sources"][fact].startswith("nginx/nginx@")
    # The router's image (nginx.org's 1.29.8 package) has the mirror module and the same order.
    router = facts.load("nginx-unprivileged", "1.29.8")["routing"]
    for fact in ("mirrorModuleBuilt", "proxyPassVariablesBeforeBody", "mirrorReadsBodyFirst",
                 "proxyHeadersAfterBody", "mapValueCached"):
        assert router[fact]["value"] and "nginx/nginx@release-1.29.8:" in router[fact]["source"]
    pcre2 = facts.load("pcre2", "10.42")
    assert "LIMIT_HEAP" in pcre2["facts"]["patternLimits"]
    assert routing.model_member_pattern().startswith(f"(*LIMIT_HEAP={routing.BODY_HEAP_KIB})")


# --- a real nginx routing -------------------------------------------------------------------


@pytest.fixture
def replicas() -> Iterator[dict[str, Upstream]]:
    started = {name: Upstream(name).start() for name in ("a1", "a2", "b1")}
    try:
        yield started
    finally:
        for upstream in started.values():
            upstream.stop()


@dataclass
class Rendering:
    """One rendering of the routing policy running under a real nginx, with fake models behind
    it that answer "a1"/"a2" (the first model) or "b1" (the second)."""

    name: str
    port: int
    hits: Callable[[], int]
    """Requests that reached any model so far."""
    stream_release: threading.Event
    stream_finished: threading.Event
    """Of the second model's streamed answer (its /v1/stream)."""


@pytest.fixture
def router(tmp_path, replicas) -> Iterator[Nginx]:
    """Local mode's rendering, two replicas for the first model and one for the second."""
    with nginx_runner(tmp_path) as start:
        yield start(policy(method="round_robin"), {
            NAMES[0]: [replicas["a1"].address, replicas["a2"].address],
            NAMES[1]: [replicas["b1"].address]})


@contextmanager
def model_router(tmp_path: Path, routes: tuple[str, ...] = NAMES,
                 ) -> Iterator[tuple[Nginx, int, FakeGateway]]:
    """The Gateway path's rendering (router_conf) under a real nginx, as its pod runs it (in
    the foreground, its own -g), in front of a fake Gateway routing by the header: (nginx, the
    catch-all server's port, the gateway)."""
    gateway = FakeGateway({routes[0]: "a1", routes[1]: "b1"})
    listen, not_found = free_port(), free_port()
    plan = routing.RouterPlan(
        models=routes, gateway_host="127.0.0.1", gateway_port=gateway.port,
        policy=policy(), max_output_tokens=TOKENS, listen_port=listen,
        not_found_port=not_found, writable_dir=str(tmp_path),
        user="root" if os.geteuid() == 0 else None)
    proxy = Nginx(tmp_path, routing.router_conf(plan), listen)
    try:
        proxy.start("-g", "daemon off;", health_path=routing.ROUTER_HEALTH_PATH,
                    health_port=not_found)
        yield proxy, not_found, gateway
    finally:
        proxy.stop()
        gateway.stop()


@pytest.fixture(params=["local", "router"])
def rendering(request, tmp_path, replicas) -> Iterator[Rendering]:
    if request.param == "local":
        with nginx_runner(tmp_path) as start:
            proxy = start(policy(method="round_robin"), {
                NAMES[0]: [replicas["a1"].address, replicas["a2"].address],
                NAMES[1]: [replicas["b1"].address]})
            b = replicas["b1"]
            yield Rendering("local", proxy.port,
                            lambda: sum(r.hits for r in replicas.values()),
                            b.stream_release, b.stream_finished)
    else:
        with model_router(tmp_path) as (proxy, _, gateway):
            yield Rendering("router", proxy.port, lambda: len(gateway.seen),
                            gateway.stream_release, gateway.stream_finished)


def expected_route(body: bytes) -> str:
    """Where the server's own parser (json.loads, last duplicate key wins) says a body goes:
    a served model's replicas ("a"/"b"), "404", or the first model ("a") when there is no
    string model to route by."""
    try:
        data = json.loads(body)
    except ValueError:
        return "a"
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, str):
        return "a"
    if model in NAMES:
        return "ab"[NAMES.index(model)]
    return "404"


def routed(port: int, body: bytes, conn: http.client.HTTPConnection | None = None) -> str:
    """Which replica group answered `body` ("a", "b") or "404"; on `conn` when given (kept
    alive), else on a fresh connection."""
    if conn is None:
        status, _, answer = request(port, "POST", "/v1/chat/completions", body=body,
                                    headers={"Content-Type": "application/json"})
    else:
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        status, answer = response.status, response.read()
    if status == 404:
        error = json.loads(answer)["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model"
        return "404"
    assert status == 200, (status, answer)
    return answer.decode()[0]  # "a1"/"a2" -> "a", "b1" -> "b"


EDGE_CASES = [
    b'{"model":"team/alpha-chat"}',
    b'{"model":"beta:v2.1"}',
    b'{"model":"team\\/alpha-chat"}',                       # escaped solidus
    b'{"model":"\\u0062eta\\u003Av2\\u002e1"}',             # \u escapes, either hex case
    b'{"mod\\u0065l":"beta:v2.1"}',                         # an escaped key
    b' \r\n\t{ "model"\n:\t"beta:v2.1" }\n',                 # JSON whitespace everywhere
    b'{"messages":[{"content":"{\\"model\\":\\"beta:v2.1\\"}"}],"model":"team/alpha-chat"}',
    b'{"x":{"model":"beta:v2.1"},"model":"team/alpha-chat"}',  # nested keys do not count
    b'{"tools":[{"model":"beta:v2.1"}]}',                    # only nested: no model
    b'{"model":"team/alpha-chat","model":"beta:v2.1"}',      # the last duplicate wins
    b'{"model":"beta:v2.1","model":5}',                      # ... even when not a string
    b'{"model":"beta:v2.1","stream":true,"n":NaN,"t":-Infinity,"x":[1e-7,-0.5,{}]}',
    b'{"model":"BETA:V2.1"}',                                 # names are case-sensitive
    b'{"model":"beta:v2.1 "}', b'{"model":""}', b'{"model":"a\\"b"}',
    b'{"model":null}', b'{"model":["beta:v2.1"]}', b'{}', b'[]', b'"beta:v2.1"', b'',
    b'not json', b'{"model":"beta:v2.1",}', b'{"model":"beta:v2.1"', b'{"model" "beta"}',
    b'{"model":"beta:v2.1"}x', b'{"model":"beta:v2.1"}{}', b'{"model":"bet\x01a"}',
    b'{"model":"beta:v2.1","a":"\\x"}', b'{"model":"beta:v2.1","a":01}',
    '{"model":"beta:v2.1","c":"é∂"}'.encode(),
]


@needs_nginx
def test_edge_cases_route_as_the_servers_parser_reads_them(rendering):
    wrong = [(body, routed(rendering.port, body), expected_route(body)) for body in EDGE_CASES]
    assert [w for w in wrong if w[1] != w[2]] == []


def _random_json(rng: random.Random, depth: int) -> str:
    """JSON text with random whitespace, key order, escapes and duplicate keys."""
    def ws() -> str:
        return rng.choice(["", "", " ", "\n  ", "\t", " \r\n"])

    def string(text: str) -> str:
        out = []
        for char in text:
            roll = rng.random()
            if char in '"\\' or ord(char) < 0x20:
                out.append(json.dumps(char)[1:-1])
            elif roll < 0.15:
                out.append(f"\\u{ord(char):04{'x' if rng.random() < 0.5 else 'X'}}")
            elif char == "/" and roll < 0.5:
                out.append("\\/")
            else:
                out.append(char)
        return '"' + "".join(out) + '"'

    words = [*NAMES, "model", "messages", "content", 'say "model": x', "\\", "\n", "gpt-4o",
             "tëst", "team/alpha-chat ", "beta:v2"]

    def value(level: int) -> str:
        kind = rng.choice(["s", "s", "n", "lit", "arr", "obj"] if level < depth else ["s", "n"])
        if kind == "s":
            return string(rng.choice(words))
        if kind == "n":
            return rng.choice(["0", "-1", "3.25", "1e5", "-2.5E-3", "NaN", "Infinity"])
        if kind == "lit":
            return rng.choice(["true", "false", "null"])
        if kind == "arr":
            return "[" + ws() + ("," + ws()).join(value(level + 1)
                                                  for _ in range(rng.randrange(4))) + ws() + "]"
        return obj(level + 1)

    def obj(level: int) -> str:
        members = []
        for _ in range(rng.randrange(5)):
            key = rng.choice(["model", "model", "messages", "max_tokens", "modelx", "Model"])
            members.append(ws() + string(key) + ws() + ":" + ws() + value(level) + ws())
        return "{" + ",".join(members) + "}"

    return ws() + obj(0) + ws()


@needs_nginx
def test_random_bodies_route_as_the_servers_parser_reads_them(rendering):
    rng = random.Random(19)
    bodies = [_random_json(rng, depth=rng.randrange(1, 6)).encode() for _ in range(400)]
    assert len({expected_route(b) for b in bodies}) == 3  # every outcome is exercised
    conn = http.client.HTTPConnection("127.0.0.1", rendering.port, timeout=5)
    try:
        wrong = [(b, routed(rendering.port, b, conn), expected_route(b)) for b in bodies]
    finally:
        conn.close()
    assert [w for w in wrong if w[1] != w[2]] == []


@needs_nginx
def test_deep_and_large_bodies(rendering):
    def nested(depth: int) -> bytes:
        return b'{"a":' + b"[" * depth + b"]" * depth + b',"model":"beta:v2.1"}'

    # As deep as the server accepts (the top-level object is level 1): routed by the model.
    assert routed(rendering.port, nested(MAX_SERVER_DEPTH - 1)) == "b"
    # Far deeper: the match gives up within its heap cap and the first model's replicas get it
    # (the server refuses such a body).
    started = time.monotonic()
    assert routed(rendering.port, nested(100_000)) == "a"
    assert time.monotonic() - started < 2
    big = b'{"messages":[' + b",".join([b'{"role":"user","content":"' + b"x\\n" * 300 + b'"}']
                                        * 900) + b'],"model":"beta:v2.1"}'
    assert 500_000 < len(big) < 1_000_000
    assert routed(rendering.port, big) == "b"


@needs_nginx
def test_the_404_names_every_model_and_the_one_asked_for(rendering):
    status, headers, answer = request(rendering.port, "POST", "/v1/chat/completions",
                                      body=b'{"model": "gpt-\\u0035"}')
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert json.loads(answer) == {"error": {
        "message": "The model `gpt-5` does not exist; this endpoint serves "
                   "`team/alpha-chat`, `beta:v2.1`.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}
    assert rendering.hits() == 0


@needs_nginx
def test_models_lists_every_model(rendering):
    status, headers, answer = request(rendering.port, "GET", "/v1/models")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert [card["id"] for card in json.loads(answer)["data"]] == list(NAMES)
    # Local mode asks the first model's replicas to check the key (one request); the router
    # answers at once.
    assert rendering.hits() == (1 if rendering.name == "local" else 0)


@needs_nginx
def test_models_needs_a_key_the_first_models_replicas_accept(router, replicas):
    for upstream in (replicas["a1"], replicas["a2"]):
        upstream.mode = "no_key"
    status, _, answer = request(router.port, "GET", "/v1/models")
    assert status == 401 and json.loads(answer)["error"]["code"] == "invalid_api_key"
    assert replicas["b1"].hits == 0


@needs_nginx
def test_a_routed_stream_is_relayed_as_it_comes(rendering):
    body = b'{"stream": true, "model": "beta:v2.1"}'
    with socket.create_connection(("127.0.0.1", rendering.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/stream HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        received = b""
        deadline = time.monotonic() + 5
        while b"data: first" not in received and time.monotonic() < deadline:
            received += sock.recv(4096)
        assert b"data: first" in received, received
        # The first event is through while the model still holds the rest of the stream.
        assert not rendering.stream_finished.is_set()
        rendering.stream_release.set()
        while b"[DONE]" not in received and time.monotonic() < deadline:
            received += sock.recv(4096)
    assert b"data: [DONE]" in received and rendering.hits() == 1


@needs_nginx
def test_a_body_that_arrives_after_its_headers_is_routed_by_it(rendering):
    """The route is chosen once the whole body is read, not when the headers are: a client (or
    a slow network) that sends the body later still reaches the model it names."""
    body = b'{"messages": [], "model": "beta:v2.1"}'
    with socket.create_connection(("127.0.0.1", rendering.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nConnection: close"
                     b"\r\nContent-Length: %d\r\n\r\n" % len(body))
        time.sleep(0.3)
        sock.sendall(body[:10])
        time.sleep(0.2)
        sock.sendall(body[10:])
        received = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received
    assert received.endswith(b"b1")


@needs_nginx
def test_a_bounded_model_spills_over_its_own_replicas_only(tmp_path, replicas):
    alpha, beta_1, beta_2 = replicas["a1"], replicas["a2"], replicas["b1"]
    held: list[tuple[http.client.HTTPConnection, http.client.HTTPResponse]] = []
    with nginx_runner(tmp_path) as start:
        proxy = start(policy(method="session_hash_bounded", boundFactor=1.0, maxFails=0),
                      {NAMES[0]: [alpha.address], NAMES[1]: [beta_1.address, beta_2.address]},
                      replica_slots=1)
        try:
            for _ in range(3):  # two at their bound, the third spills (least_conn, unbounded)
                conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
                conn.request("POST", "/v1/stream", body=b'{"model":"beta:v2.1"}',
                             headers={"X-Session-ID": "hot"})
                held.append((conn, conn.getresponse()))
                assert held[-1][1].status == 200
            assert (alpha.hits, beta_1.hits + beta_2.hits) == (0, 3)
            assert "no live upstreams" in proxy.error_log()
        finally:
            for upstream in replicas.values():
                upstream.stream_release.set()
            for conn, response in held:
                response.read()  # the streams end before their connections close
                conn.close()


def test_the_longest_served_name_fits_one_nginx_parameter():
    longest = "a" + "/" * (routing.SERVED_NAME_MAX - 1)  # '/' has the most spellings
    routes = routing.ModelRoutes((longest, "b"))
    assert routing.value_map(routes, "$x", ("u0", "u1"), "unknown", "u0")
    with pytest.raises(ValueError, match="served model name"):
        routing.ModelRoutes((longest + "/", "b"))


def test_json_string_pattern_matches_every_spelling_and_nothing_else():
    import re

    pattern = re.compile(r'\A"' + routing.json_string_pattern("a/b:1") + r'"\Z')
    for spelling in ('"a/b:1"', '"a\\/b:1"', '"\\u0061/b\\u003a1"', '"\\u0061\\u002F\\u0062:1"'):
        assert pattern.match(spelling) and json.loads(spelling) == "a/b:1"
    for other in ('"a/b:2"', '"A/b:1"', '"a//b:1"', '"a\\\\/b:1"', '"a/b:1 "'):
        assert not pattern.match(other)
