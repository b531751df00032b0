"""What the engines and the controller export, from their own sources."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics

CONTRACTS = Path(__file__).resolve().parent.parent / "contracts" / "data"
VLLM_FACTS = CONTRACTS / "vllm-0.33.0.metrics.json"
CONTROLLER_FACTS = CONTRACTS / "nginx-ingress-controller-5.5.4.prometheus.json"
KUBE_STATE_METRICS_FACTS = CONTRACTS / "kube-state-metrics-2.20.0.json"

_NAME_BEFORE_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{")


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects (every selector here has braces)."""
    return set(_NAME_BEFORE_SELECTOR.findall(expr))


def _exposed(name: str, kind: str) -> set[str]:
    """Sample names prometheus_client exposes for one declared metric."""
    if kind == "counter":
        return {f"{name}_total"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return {name}


def vllm_samples() -> set[str]:
    facts = json.loads(VLLM_FACTS.read_text())
    return {s for name, kind in facts["metrics"].items() for s in _exposed(name, kind)}


def server_samples() -> set[str]:
    """Sample names the server's /metrics really renders (server/metrics.py)."""
    text = Metrics(running=lambda: 0, waiting=lambda: 0).render().decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def controller_samples() -> set[str]:
    facts = json.loads(CONTROLLER_FACTS.read_text())
    return {s for name, m in facts["metrics"].items() for s in _exposed(name, m["type"])}


def kube_state_metrics_samples() -> set[str]:
    """The kube_deployment_* series of the pinned kube-state-metrics (all gauges)."""
    return set(json.loads(KUBE_STATE_METRICS_FACTS.read_text())["metrics"])


def engine_samples(engine: str) -> set[str]:
    return server_samples() if engine == "server" else vllm_samples()
