"""Metrics move as requests run and finish."""

from __future__ import annotations

import threading

import httpx

from server import create_app, from_env

from .support import parse_metric

NAMES = ("llm_requests_running", "llm_requests_waiting", "llm_time_to_first_token_seconds",
         "llm_e2e_request_latency_seconds", "llm_generation_tokens_total",
         "llm_prompt_tokens_total", "llm_requests_rejected_total")


def test_metric_names_and_types_exist() -> None:
    text = create_app(from_env({})).state.llm.metrics.render().decode()
    types = {line.split()[2]: line.split()[3] for line in text.splitlines()
             if line.startswith("# TYPE")}
    assert types["llm_requests_running"] == "gauge"
    assert types["llm_requests_waiting"] == "gauge"
    assert types["llm_time_to_first_token_seconds"] == "histogram"
    assert types["llm_e2e_request_latency_seconds"] == "histogram"
    assert types["llm_generation_tokens_total"] == "counter"
    assert types["llm_prompt_tokens_total"] == "counter"
    assert types["llm_requests_rejected_total"] == "counter"
    for reason in ("overload", "draining", "auth", "invalid", "too_large"):
        assert f'llm_requests_rejected_total{{reason="{reason}"}} 0.0' in text


def test_two_apps_have_separate_registries() -> None:
    a, b = create_app(from_env({})), create_app(from_env({}))
    a.state.llm.metrics.generation_tokens.inc(5)
    text_b = b.state.llm.metrics.render().decode()
    assert parse_metric(text_b, "llm_generation_tokens_total") == 0


def test_metrics_follow_a_request(sim_server) -> None:
    srv = sim_server(sim_decode_base_ms=30.0)
    snap = lambda: httpx.get(srv.base_url + "/metrics").text  # noqa: E731
    before = snap()
    body = {"model": "sim-llm", "messages": [{"role": "user", "content": "one two three"}],
            "max_tokens": 20, "stream": True}
    first_token = threading.Event()
    done = threading.Event()
    result: dict = {}

    def run() -> None:
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if '"content":" ' in line:
                    first_token.set()
                if '"usage"' in line:
                    result["line"] = line
        done.set()

    t = threading.Thread(target=run)
    t.start()
    assert first_token.wait(5)
    during = snap()
    assert parse_metric(during, "llm_requests_running") == 1
    assert parse_metric(during, "llm_time_to_first_token_seconds_count") == \
        parse_metric(before, "llm_time_to_first_token_seconds_count") + 1
    assert parse_metric(during, "llm_e2e_request_latency_seconds_count") == \
        parse_metric(before, "llm_e2e_request_latency_seconds_count")
    assert done.wait(10)
    t.join()
    after = snap()
    prompt_tokens = len(srv.state.engine.encode_chat(body["messages"]))
    assert parse_metric(after, "llm_requests_running") == 0
    assert parse_metric(after, "llm_generation_tokens_total") == \
        parse_metric(before, "llm_generation_tokens_total") + 20
    assert parse_metric(after, "llm_prompt_tokens_total") == \
        parse_metric(before, "llm_prompt_tokens_total") + prompt_tokens
    assert parse_metric(after, "llm_e2e_request_latency_seconds_count") == \
        parse_metric(before, "llm_e2e_request_latency_seconds_count") + 1
    # 20 tokens at >= 30 ms per decode step: e2e sum grew by at least 19 steps
    grown = parse_metric(after, "llm_e2e_request_latency_seconds_sum") - \
        parse_metric(before, "llm_e2e_request_latency_seconds_sum")
    assert grown >= 19 * 0.030
    assert '"completion_tokens":20' in result["line"]
