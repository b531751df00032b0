"""session_hash_bounded and the body session key: renderings, and the real nginx's behaviour
at the bound (the facts in tests/contracts/data/nginx-1.22.1.json)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from components.policies import affinity
from components.policies.balancing import LoadBalancingConfig, ingress_annotations
from components.policies.nginx_conf import nginx_conf
from tests.contracts import facts
from tests.infra.nginx_support import Nginx, Upstream, free_port, nginx_runner, request
from tests.infra.test_balancing import needs_nginx, policy

TOKENS = 512
BOUNDED = {"method": "session_hash_bounded"}


def upstream_servers(conf: str, name: str) -> list[str]:
    block = conf.split(f"upstream {name} {{", 1)[1].split("}", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip().startswith("server ")]


# --- renderings -----------------------------------------------------------------------------


@pytest.mark.parametrize("factor, slots, instances, expected", [
    (1.0, 8, 1, 8), (1.5, 8, 1, 12), (1.0, 8, 2, 4), (1.25, 8, 3, 4), (0.1, 2, 4, 1),
])
def test_bound_is_factor_times_slots_shared_over_nginx_instances(factor, slots, instances,
                                                                 expected):
    p = policy(**BOUNDED, boundFactor=factor)
    assert affinity.max_conns(p, slots, instances) == expected


def test_bounded_needs_the_replica_slots_and_says_which_key():
    with pytest.raises(ValueError, match="model.maxConcurrency"):
        nginx_conf(policy(**BOUNDED), ["127.0.0.1:8000"], 8080, TOKENS)
    with pytest.raises(ValueError, match="model.maxConcurrency"):
        ingress_annotations(policy(**BOUNDED), TOKENS)


def test_bounded_conf_caps_every_server_and_spills_to_an_unbounded_least_conn_upstream():
    conf = nginx_conf(policy(**BOUNDED, boundFactor=1.5),
                      ["127.0.0.1:8000", "127.0.0.1:8001"], 8080, TOKENS, replica_slots=8)
    assert all(s.endswith("max_conns=12;") for s in upstream_servers(conf, "llm"))
    assert "hash $http_x_session_id consistent;" in conf
    spill = upstream_servers(conf, affinity.SPILL_UPSTREAM)
    assert len(spill) == 2 and not any("max_conns" in s for s in spill)
    assert "least_conn;" in conf.split(f"upstream {affinity.SPILL_UPSTREAM}", 1)[1]
    assert f"error_page 502 = {affinity.SPILL_LOCATION};" in conf
    # The spill location proxies like the main one (same timeouts, retries, buffering).
    main = conf.split("location /v1/ {", 1)[1].split("\n        }", 1)[0]
    spill_loc = conf.split(f"location {affinity.SPILL_LOCATION} {{", 1)[1].split("\n        }")[0]
    strip = lambda block: [ln for ln in block.splitlines()  # noqa: E731
                           if ln.strip().startswith("proxy_") and "proxy_pass" not in ln]
    assert strip(main) == strip(spill_loc) and strip(main)


@pytest.mark.parametrize("method", ["least_conn", "session_hash"])
def test_other_methods_have_no_bound_and_no_spill(method):
    conf = nginx_conf(policy(method=method), ["127.0.0.1:8000"], 8080, TOKENS, replica_slots=8)
    assert "max_conns" not in conf and affinity.SPILL_UPSTREAM not in conf
    assert "error_page 502" not in conf


def test_body_key_maps_the_first_bytes_and_keeps_the_body_in_memory():
    p = policy(method="session_hash", sessionKey="body", sessionBodyBytes=300)
    conf = nginx_conf(p, ["127.0.0.1:8000"], 8080, TOKENS)
    assert f"hash {affinity.BODY_KEY_VARIABLE} consistent;" in conf
    assert "{1,300}" in conf
    assert "client_body_buffer_size 1m;" in conf  # = client_max_body_size
    header = nginx_conf(policy(method="session_hash"), ["127.0.0.1:8000"], 8080, TOKENS)
    assert "$request_body" not in header


def test_cluster_renders_the_closest_form_and_names_the_gaps():
    p = policy(**BOUNDED, sessionKey="body", boundFactor=2)
    ann = ingress_annotations(p, TOKENS, replica_slots=8, controller_replicas=2)
    assert ann["nginx.org/lb-method"] == "hash $http_x_session_id consistent"
    assert ann["nginx.org/max-conns"] == "8"  # 2 x 8 slots over 2 controller pods
    assert facts.annotation_problems(ann, facts.pinned("nginx-ingress-controller")) == []
    gaps = affinity.cluster_gaps(p)
    assert any("sessionKey" in g and "body" in g for g in gaps)
    assert any("502" in g for g in gaps)
    assert affinity.cluster_gaps(policy(method="least_conn")) == []
    assert "nginx.org/max-conns" not in ingress_annotations(policy(), TOKENS)


@pytest.mark.parametrize("values, field", [
    ({"sessionKey": "cookie"}, "session_key"),
    ({"sessionBodyBytes": 8}, "session_body_bytes"),
    ({"boundFactor": 0}, "bound_factor"),
    ({"method": "bounded"}, "method"),
])
def test_bad_affinity_values_are_rejected(values, field):
    with pytest.raises(ValidationError) as err:
        LoadBalancingConfig.model_validate(values)
    assert field in str(err.value) or field.replace("_", "") in str(err.value).lower()


# --- the real nginx -----------------------------------------------------------------------


@pytest.fixture
def replicas() -> Iterator[list[Upstream]]:
    started = [Upstream(f"r{i}").start() for i in range(3)]
    try:
        yield started
    finally:
        for upstream in started:
            upstream.stop()


@pytest.fixture
def start_nginx(tmp_path) -> Iterator[Any]:
    with nginx_runner(tmp_path) as start:
        yield lambda p, addresses, slots=1: start(p, addresses, TOKENS, replica_slots=slots)


@needs_nginx
@pytest.mark.parametrize("key", ["header", "body"])
def test_rendered_bounded_conf_passes_nginx_t(tmp_path, key):
    conf = nginx_conf(policy(**BOUNDED, sessionKey=key), ["127.0.0.1:8000", "127.0.0.1:8001"],
                      free_port(), TOKENS, prefix=tmp_path, replica_slots=8)
    result = Nginx(tmp_path, conf, 0).check()
    assert result.returncode == 0, result.stderr


def _hold(port: int, session: str) -> tuple[http.client.HTTPConnection, int]:
    """Start a streaming request that the upstream holds open; return it and its status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/stream", body=b"{}", headers={"X-Session-ID": session})
    return conn, conn.getresponse().status


@needs_nginx
def test_at_the_bound_a_session_spills_along_the_ring_and_when_all_are_full_to_least_conn(
        replicas, start_nginx):
    proxy = start_nginx(policy(**BOUNDED, boundFactor=1.0, maxFails=0),
                        [r.address for r in replicas], slots=1)
    held = []
    try:
        for expected_busy in (1, 2, 3):  # each replica takes one (max_conns=1)
            conn, status = _hold(proxy.port, "hot")
            held.append(conn)
            assert status == 200
            assert sum(1 for r in replicas if r.hits) == expected_busy
        # Every replica is at its bound: nginx finds no live upstream (its 502) and the
        # spill location serves the request anyway.
        conn, status = _hold(proxy.port, "hot")
        held.append(conn)
        assert status == 200
        assert sum(r.hits for r in replicas) == 4
        assert "no live upstreams" in proxy.error_log()
    finally:
        for r in replicas:
            r.stream_release.set()
        for conn in held:
            conn.close()


@needs_nginx
def test_below_the_bound_a_session_stays_on_one_replica(replicas, start_nginx):
    proxy = start_nginx(policy(**BOUNDED), [r.address for r in replicas], slots=4)
    for session in ("s1", "s2", "s3", "s4", "s5"):
        answers = {request(proxy.port, "POST", "/v1/chat/completions", body=b"{}",
                           headers={"X-Session-ID": session})[2] for _ in range(4)}
        assert len(answers) == 1, (session, answers)


@needs_nginx
def test_body_key_follows_the_first_bytes_of_the_body(replicas, start_nginx):
    p = policy(method="session_hash", sessionKey="body", sessionBodyBytes=160)
    proxy = start_nginx(p, [r.address for r in replicas])
    seen = set()
    for chat in range(6):
        head = {"model": "m", "messages": [{"role": "system", "content": f"chat {chat} " * 30}]}
        answers = set()
        for turn in range(3):
            body = dict(head, messages=head["messages"] + [
                {"role": "user", "content": f"turn {turn} " * (50 * turn + 1)}])
            status, _, answer = request(proxy.port, "POST", "/v1/chat/completions",
                                        body=json.dumps(body).encode())
            assert status == 200
            answers.add(answer)
        assert len(answers) == 1, (chat, answers)  # every turn of a chat on one replica
        seen |= answers
    assert len(seen) >= 2  # different chats spread


@needs_nginx
def test_the_nginx_that_runs_local_mode_has_the_facts_this_relies_on():
    import re
    import subprocess

    from tests.infra.nginx_support import NGINX

    out = subprocess.run([NGINX, "-v"], capture_output=True, text=True, timeout=10).stderr
    version = re.search(r"nginx/(\d+\.\d+\.\d+)", out).group(1)
    data = facts.load("nginx", version)  # FileNotFoundError says what to record
    assert {"chashSkipsFullPeers", "allFullIs502"} <= set(data["facts"])


# --- the stack configuration ----------------------------------------------------------------


def _problems(raw: dict[str, Any]) -> list[str]:
    from components.config.parse import ConfigError, parse_stack_config

    with pytest.raises(ConfigError) as caught:
        parse_stack_config(raw)
    return caught.value.problems


def test_stack_config_names_what_the_bounded_method_and_the_body_key_need():
    from components.config.parse import parse_stack_config
    from components.config.rules import stack_warnings

    model = {"id": "Qwen/Qwen2.5-0.5B-Instruct"}
    problems = _problems({"model": model, "loadBalancing": BOUNDED})
    assert any(p.startswith("llm-serving:model.maxConcurrency:") for p in problems), problems
    body = {"method": "session_hash", "sessionKey": "body"}
    problems = _problems({"model": model, "loadBalancing": body, "ingress": {"enabled": True}})
    assert any(p.startswith("llm-serving:loadBalancing.sessionKey:") and "'header'" in p
               for p in problems), problems
    # Local mode and the LoadBalancer path take the body key; the bound warns with an ingress.
    parse_stack_config({"model": model, "loadBalancing": body})
    cfg = parse_stack_config({"model": dict(model, maxConcurrency=8), "loadBalancing": BOUNDED,
                              "ingress": {"enabled": True}})
    assert any("502" in w for w in stack_warnings(cfg))
    plain = parse_stack_config({"model": dict(model, maxConcurrency=8),
                                "ingress": {"enabled": True}})
    assert not any("502" in w for w in stack_warnings(plain))


def test_local_bound_is_shared_over_nginx_instances_like_the_controller_pods():
    p = policy(**BOUNDED, boundFactor=1.0)
    conf = nginx_conf(p, ["127.0.0.1:8000"], 8080, TOKENS, replica_slots=8, nginx_instances=2)
    ann = ingress_annotations(p, TOKENS, replica_slots=8, controller_replicas=2)
    assert upstream_servers(conf, "llm")[0].endswith(f"max_conns={ann['nginx.org/max-conns']};")
