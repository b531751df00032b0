"""Prometheus metrics, one CollectorRegistry per app (tests build several apps).

The metric names are a contract with the autoscaler rules; do not rename them.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# `*_created` series double the output for no use here (process-wide switch).
disable_created_metrics()

REJECT_REASONS = ("overload", "draining", "auth", "invalid", "too_large")

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5,
                 10, 20, 30, 60)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 300, 600)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, running: Callable[[], float], waiting: Callable[[], float]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests_running = Gauge(
            "llm_requests_running", "Sequences currently being generated.", registry=r
        )
        self.requests_running.set_function(running)
        self.requests_waiting = Gauge(
            "llm_requests_waiting", "Requests queued for a generation slot.", registry=r
        )
        self.requests_waiting.set_function(waiting)
        self.time_to_first_token = Histogram(
            "llm_time_to_first_token_seconds",
            "Time from request arrival to the first generated token.",
            buckets=_TTFT_BUCKETS, registry=r,
        )
        self.e2e_latency = Histogram(
            "llm_e2e_request_latency_seconds",
            "Time from request arrival to the last generated token.",
            buckets=_E2E_BUCKETS, registry=r,
        )
        self.generation_tokens = Counter(
            "llm_generation_tokens", "Generated (completion) tokens.", registry=r
        )
        self.prompt_tokens = Counter(
            "llm_prompt_tokens", "Prompt tokens of admitted requests.", registry=r
        )
        self.requests_rejected = Counter(
            "llm_requests_rejected", "Requests refused, by reason.", ["reason"], registry=r
        )
        for reason in REJECT_REASONS:
            self.requests_rejected.labels(reason=reason)  # export zeros from the start

    def reject(self, reason: str) -> None:
        self.requests_rejected.labels(reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
