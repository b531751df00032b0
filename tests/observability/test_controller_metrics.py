"""The ingress controller's metrics: chart values checked against the chart's
own keys (tests/contracts/data/nginx-ingress-controller-5.5.4.prometheus.json)."""

from __future__ import annotations

import json
from typing import Any

from components.config.parse import parse_stack_config
from components.policies.monitoring import (
    CONTROLLER_LATENCY_METRIC,
    CONTROLLER_METRICS_PORT,
    controller_metrics_enabled,
    controller_metrics_values,
    merge_values,
)
from components.resources.ingress import controller_values
from tests.observability.support import CONTROLLER_FACTS

FACTS = json.loads(CONTROLLER_FACTS.read_text())
ON = {"model": {"id": "m/x"}, "ingress": {"enabled": True},
      "monitoring": {"serviceMonitor": True, "labels": {"release": "kps"}, "intervalSeconds": 20}}
_TYPES = {"boolean": bool, "integer": int, "string": str, "object": dict, "array": list}


def _leaves(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys down to the chart's documented keys (objects the chart takes whole stop)."""
    out = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in FACTS["values"]:
            out.update(_leaves(value, path + "."))
        else:
            out[path] = value
    return out


def test_values_use_only_keys_the_chart_defines_with_their_types() -> None:
    values = controller_metrics_values(parse_stack_config(ON).monitoring)
    leaves = _leaves(values)
    assert leaves, "monitoring on must produce values"
    for key, value in leaves.items():
        assert key in FACTS["values"], f"chart 2.6.4 has no value {key}"
        assert isinstance(value, _TYPES[FACTS["values"][key]["type"]]), key


def test_values_turn_on_the_endpoint_latency_histogram_and_its_service_monitor() -> None:
    leaves = _leaves(controller_metrics_values(parse_stack_config(ON).monitoring))
    assert leaves["prometheus.create"] and leaves["prometheus.service.create"]
    assert leaves["prometheus.serviceMonitor.create"]
    assert leaves["controller.enableLatencyMetrics"]
    assert FACTS["metrics"][CONTROLLER_LATENCY_METRIC]["needs"] == "controller.enableLatencyMetrics"
    assert leaves["prometheus.port"] == CONTROLLER_METRICS_PORT == FACTS["values"]["prometheus.port"]["default"]
    # Prometheus selects the ServiceMonitor by the stack's monitoring labels and
    # scrapes the chart's named Service port at the stack's interval.
    assert leaves["prometheus.serviceMonitor.labels"] == {"release": "kps"}
    assert leaves["prometheus.serviceMonitor.endpoints"] == [
        {"port": FACTS["prometheus_service_port_name"], "interval": "20s"}
    ]


def test_nothing_when_monitoring_is_off() -> None:
    assert controller_metrics_values(parse_stack_config({"model": {"id": "m/x"}}).monitoring) == {}


def test_metrics_count_as_on_only_for_a_controller_the_stack_installs() -> None:
    assert controller_metrics_enabled(parse_stack_config(ON))
    no_ingress = {**ON, "ingress": {"enabled": False}}
    assert not controller_metrics_enabled(parse_stack_config(no_ingress))
    existing = {**ON, "ingress": {"enabled": True, "controller": {"install": False}}}
    assert not controller_metrics_enabled(parse_stack_config(existing))


def test_merging_into_the_controller_values_keeps_both() -> None:
    cfg = parse_stack_config(ON)
    base = controller_values("llm-nginx", "rel", cfg.ingress.controller, "ns,nginx-ingress",
                             hostless=True)
    merged = merge_values(base, controller_metrics_values(cfg.monitoring))
    assert merged["controller"]["enableLatencyMetrics"] is True
    assert merged["controller"]["ingressClass"] == base["controller"]["ingressClass"]
    assert merged["prometheus"]["create"] is True
    assert base["controller"].get("enableLatencyMetrics") is None  # inputs untouched


def test_the_prod_stack_installs_the_controller_with_its_metrics_on() -> None:
    """Wired, not only available: the release the stack renders carries the values."""
    from tests.contracts import facts
    from tools import offline

    config, secret_keys = offline.read_stack_file(offline.PROJECT_DIR / "Pulumi.prod.yaml")
    run = offline.run_program(config, secret_keys, stack="prod")
    [release] = [r for r in run.resources if r.type == "kubernetes:helm.sh/v3:Release"
                 and r.inputs["chart"].endswith("nginx-ingress")]
    values = release.inputs["values"]
    assert values["prometheus"]["serviceMonitor"]["create"] is True
    assert values["controller"]["enableLatencyMetrics"] is True
    assert facts.chart_value_problems(values, facts.pinned("nginx-ingress-controller")) == []
