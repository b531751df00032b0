"""The cluster replica alerts read kube-state-metrics: pinned (components/pins.py), with the
metric names and labels of that version as facts, and installed by the stack on request
(`monitoring.kubeStateMetrics: install`) from the chart that ships it."""

from __future__ import annotations

import json

import pytest

from components.config.parse import parse_stack_config
from components.config.rules import stack_warnings
from components.pins import (
    KUBE_STATE_METRICS_CHART,
    KUBE_STATE_METRICS_CHART_VERSION,
    KUBE_STATE_METRICS_REPOSITORY,
    PINNED,
)
from components.policies.alerting import alert_policy, rule_groups
from tests.contracts import facts
from tools import offline

KSM = facts.pinned("kube-state-metrics")
CHART = json.loads((facts.DATA / f"kube-state-metrics-{PINNED['kube-state-metrics']}.chart.json")
                   .read_text())
SERVER = {"model": {"id": "m/x"}, "namespace": "llm-a",
          "autoscaling": {"enabled": True, "maxReplicas": 3},
          "monitoring": {"serviceMonitor": True, "rules": True,
                         "labels": {"release": "kube-prometheus-stack"}}}
VLLM = {**SERVER, "engine": "vllm", "gpu": {"count": 1},
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 4,
                        "prometheusUrl": "http://p:9090"}}


def _exprs(raw: dict) -> list[str]:
    policy = alert_policy(parse_stack_config(raw), "cluster")
    return [rule["expr"] for group in rule_groups(policy) for rule in group["rules"]]


@pytest.mark.parametrize("raw", [SERVER, VLLM], ids=["server", "vllm"])
def test_cluster_rules_read_only_metrics_and_labels_of_the_pinned_version(raw):
    exprs = _exprs(raw)
    read = [e for e in exprs if "kube_" in e]
    assert len(read) == 2  # available and desired replicas
    assert [p for e in exprs for p in facts.kube_state_metrics_problems(e, KSM)] == []


@pytest.mark.parametrize("expr, problem", [
    ('sum(kube_deployment_status_replicas_availble{namespace="a"})', "not exported"),
    ('sum(kube_deployment_spec_replicas{namespace="a",pod="x"})', "no label 'pod'"),
    ('sum(max by (pod) (kube_deployment_spec_replicas{namespace="a"}))', "grouped by 'pod'"),
])
def test_the_check_catches_a_metric_or_label_the_facts_do_not_list(expr, problem):
    [found] = facts.kube_state_metrics_problems(expr, KSM)
    assert problem in found


def test_the_chart_pin_ships_the_pinned_kube_state_metrics():
    assert CHART["chartVersion"] == KUBE_STATE_METRICS_CHART_VERSION
    assert CHART["chart"] == KUBE_STATE_METRICS_CHART == KSM["chart"]
    assert CHART["chartRepository"] == KUBE_STATE_METRICS_REPOSITORY
    assert CHART["version"] == KSM["version"] == PINNED["kube-state-metrics"]


def _release(run: offline.ProgramRun) -> dict:
    [release] = [r.inputs for r in run.resources if offline.is_helm_release(r)
                 and r.inputs["chart"] == KUBE_STATE_METRICS_CHART]
    return release


def test_install_renders_the_pinned_chart_with_values_it_reads():
    raw = {**SERVER, "monitoring": {**SERVER["monitoring"], "kubeStateMetrics": "install"}}
    run = offline.run_program({f"llm-serving:{k}": v if isinstance(v, str) else json.dumps(v)
                               for k, v in raw.items()})
    release = _release(run)
    assert release["version"] == KUBE_STATE_METRICS_CHART_VERSION
    assert release["repositoryOpts"]["repo"] == KUBE_STATE_METRICS_REPOSITORY
    values = release["values"]
    assert facts.chart_value_problems(values, CHART) == []
    # The chart's default would rename the series' namespace exported_namespace: the rules
    # select on it, so honorLabels is on.
    assert CHART["chartValues"]["values"]["prometheus.monitor.http.honorLabels"]["default"] is False
    monitor = values["prometheus"]["monitor"]
    assert monitor["enabled"] is True and monitor["http"]["honorLabels"] is True
    assert monitor["additionalLabels"] == {"release": "kube-prometheus-stack"}
    # Least privilege: Deployments only, in the stack's namespace only (a Role, not a
    # ClusterRole).
    assert values["collectors"] == ["deployments"] and values["namespaces"] == "llm-a"
    assert values["rbac"]["useClusterRole"] is False
    # Its namespace enforces the level the chart's pods meet by default.
    [namespace] = [offline.to_manifest(r) for r in run.resources
                   if r.type == "kubernetes:core/v1:Namespace"
                   and r.inputs["metadata"]["name"] == "kube-state-metrics"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert CHART["podSecurityStandard"].startswith("restricted")


@pytest.mark.parametrize("setting, warned", [(None, True), ("present", False),
                                             ("install", False)])
def test_rules_without_kube_state_metrics_warn_at_every_preview(setting, warned):
    monitoring = {**SERVER["monitoring"]}
    if setting is not None:
        monitoring["kubeStateMetrics"] = setting
    found = [w for w in stack_warnings(parse_stack_config({**SERVER, "monitoring": monitoring}))
             if w.startswith("llm-serving:monitoring.kubeStateMetrics: unset;")]
    assert bool(found) is warned
    if warned:
        assert "LlmNoReadyReplica" in found[0] and KSM["version"] in found[0]
    # No rules, nothing to warn about.
    quiet = {**SERVER, "monitoring": {"serviceMonitor": True}}
    assert not any("kubeStateMetrics" in w for w in stack_warnings(parse_stack_config(quiet)))


def test_prod_says_where_its_kube_state_metrics_comes_from():
    config, _ = offline.read_stack_file(offline.PROJECT_DIR / "Pulumi.prod.yaml")
    prod = parse_stack_config(offline.namespace_values(config))
    assert prod.monitoring.rules and prod.monitoring.kube_state_metrics == "present"
    assert CHART["kubePrometheusStack"]["note"].count("8.4.0") == 1
