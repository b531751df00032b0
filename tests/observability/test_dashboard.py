"""The dashboard: valid for the Grafana Foundation SDK's schema, shipped for the
Grafana sidecar, and made of the stack's own numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from grafana_foundation_sdk.models.dashboard import Dashboard

from components.config.parse import parse_stack_config
from components.policies.dashboard import SIDECAR_LABEL, build_dashboard, dashboard_uid
from components.policies.monitoring import CONTROLLER_LATENCY_METRIC
from tools import offline

GPU = {"engine": "vllm", "gpu": {"count": 1}, "model": {"id": "m/x"}, "namespace": "llm-prod",
       "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6, "targetWaitingPerReplica": 4,
                       "prometheusUrl": "http://p:9090"},
       "monitoring": {"serviceMonitor": True, "dashboard": True,
                      "slo": {"ttftP99Seconds": 1.25}}}


def _panels(board: dict) -> dict[str, dict]:
    return {p["title"]: p for p in board["panels"] if p["type"] != "row"}


@pytest.mark.parametrize("raw", [{"model": {"id": "m/x"}}, GPU], ids=["server", "vllm"])
def test_dashboard_round_trips_through_the_sdk_model(raw: dict) -> None:
    board = build_dashboard(parse_stack_config(raw))
    # The SDK's generated model reads every key we wrote and writes the same JSON
    # back: nothing outside its schema, nothing of the wrong shape.
    parsed = Dashboard.from_json(board)
    again = json.loads(json.dumps(parsed.to_json(), default=lambda o: o.to_json()))
    assert again["panels"] == board["panels"] and again["templating"] == board["templating"]
    assert board["uid"] == dashboard_uid(parse_stack_config(raw)) and len(board["uid"]) <= 40
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["type"] in {"row", "timeseries", "stat"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["refId"] and target["expr"]


def test_panels_carry_the_thresholds_of_the_stack() -> None:
    panels = _panels(build_dashboard(parse_stack_config(GPU)))
    ttft = panels["Time to first token"]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert ttft[-1]["value"] == 1.25
    queue = panels["Queue per replica"]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert queue[-1]["value"] == 4
    replicas = panels["Replicas"]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert replicas[-1]["value"] == 6
    assert all('namespace="llm-prod"' in t["expr"] for t in panels["Time to first token"]["targets"])


def test_engine_specific_panels_follow_the_profile() -> None:
    server = _panels(build_dashboard(parse_stack_config({"model": {"id": "m/x"}})))
    vllm = _panels(build_dashboard(parse_stack_config(GPU)))
    assert "Refused requests/s" in server and "Refused requests/s" not in vllm
    assert "KV-cache use" in vllm and "KV-cache use" not in server
    assert "Inter-token latency" in vllm and "Inter-token latency" not in server


def test_controller_latency_panel_only_when_its_metrics_are_on() -> None:
    without = build_dashboard(parse_stack_config(GPU))
    with_ingress = build_dashboard(parse_stack_config({**GPU, "ingress": {"enabled": True}}))
    text = json.dumps(with_ingress)
    assert CONTROLLER_LATENCY_METRIC in text and CONTROLLER_LATENCY_METRIC not in json.dumps(without)
    assert 'resource_namespace=\\"llm-prod\\"' in text


def test_prod_render_ships_rule_and_dashboard_schema_checked() -> None:
    run = offline.run_program(*offline.read_stack_file(offline.PROJECT_DIR / "Pulumi.prod.yaml"))
    manifests = [offline.to_manifest(r) for r in run.resources if offline.is_kubernetes_object(r)]
    [rule] = [m for m in manifests if m["kind"] == "PrometheusRule"]
    [configmap] = [m for m in manifests if m["kind"] == "ConfigMap"
                   if m["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert offline.schema_problems(rule) == [] and offline.schema_problems(configmap) == []
    assert rule["metadata"]["namespace"] == "llm-prod"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["labels"].items() >= SIDECAR_LABEL.items()
    [body] = configmap["data"].values()
    assert json.loads(body)["uid"] == "llm-serving-llm-prod"
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert {"LlmTtftP99AboveSlo", "LlmQueueBacklog", "LlmReplicasAtMax", "LlmNoReadyReplica"} <= alerts


def test_prometheus_rule_schema_catches_a_broken_rule() -> None:
    bad = {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
        "metadata": {"name": "r", "namespace": "n"},
        "spec": {"groups": [{"name": "g", "rules": [
            {"alert": "A", "record": "b", "expr": "up"},  # both: invalid
            {"alert": "C", "expr": "up", "for": "five minutes"},
        ]}]},
    }
    problems = offline.schema_problems(bad)
    assert any("rules.0" in p for p in problems) and any("rules.1.for" in p for p in problems)


def test_monitoring_off_creates_neither(tmp_path: Path) -> None:
    run = offline.run_program({"llm-serving:model": json.dumps({"id": "m/x"})}, [])
    kinds = {offline.to_manifest(r)["kind"] for r in run.resources if offline.is_kubernetes_object(r)}
    assert "PrometheusRule" not in kinds and "ConfigMap" not in kinds
