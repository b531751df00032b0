"""promtool unit tests for the rendered rules: for every alert, input series that
make it fire, then resolve.

Each case is one promtool test group: a firing phase of `for + window + 3`
minutes, then a healthy phase long enough for every rate window and the 5 min
lookback to forget the firing phase. The alert must be firing at the end of the
first phase and gone at the end of the second. Series are built from the
engine profile's metric names, so the same cases test both engines' rules.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from components.policies.alerting import AlertPolicy, alerting_rules, recorded

STEP_MINUTES = 1
LOOKBACK_MINUTES = 5
"""Prometheus keeps showing a series' last sample this long after it stops."""


def _labels(policy: AlertPolicy, **extra: str) -> str:
    pairs = list(policy.scope) + sorted(extra.items())
    return "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"


def _replica_labels(policy: AlertPolicy) -> str:
    """kube-state-metrics series of the model's Deployment (one model of several: the scope
    its replica counts read; otherwise any Deployment of the namespace)."""
    if policy.replica_scope is not None:
        return "{" + ",".join(f'{k}="{v}"' for k, v in policy.replica_scope) + "}"
    return _labels(policy, deployment="model")


class Phases:
    """Sample strings over a firing phase of `a` steps and a healthy phase of `b` steps."""

    def __init__(self, policy: AlertPolicy) -> None:
        for_m = math.ceil(policy.for_seconds / 60)
        window_m = math.ceil(policy.window_seconds / 60)
        self.a = for_m + window_m + 3
        self.b = max(window_m, LOOKBACK_MINUTES) + 3

    def gauge(self, firing: float, healthy: float) -> str:
        return f"{firing:g}x{self.a - 1} {healthy:g}x{self.b}"

    def counter(self, firing_step: float, healthy_step: float) -> str:
        at_switch = firing_step * (self.a - 1)
        return f"0+{firing_step:g}x{self.a - 1} {at_switch + healthy_step:g}+{healthy_step:g}x{self.b - 1}"

    def until_switch(self, value: float) -> str:
        """A series that stops after the firing phase (a replica that went away)."""
        return f"{value:g}x{self.a - 1} _x{self.b}"

    @property
    def fire_at(self) -> str:
        return f"{self.a - 1}m"

    @property
    def resolve_at(self) -> str:
        return f"{self.a + self.b - 1}m"


Series = list[dict[str, str]]


def _ttft(policy: AlertPolicy, ph: Phases) -> Series:
    slo, name = policy.ttft_p99_seconds, policy.profile.ttft_histogram
    low, high = slo / 2, slo * 2
    # Firing: every first token lands in (slo/2, 2*slo], p99 ~ 1.98*slo.
    # Healthy: all at or under slo/2, p99 < slo.
    return [
        {"series": f"{name}_bucket{_labels(policy, le=f'{low:g}')}", "values": ph.counter(0, 10)},
        {"series": f"{name}_bucket{_labels(policy, le=f'{high:g}')}", "values": ph.counter(10, 10)},
        {"series": f"{name}_bucket{_labels(policy, le='+Inf')}", "values": ph.counter(10, 10)},
    ]


def _backlog(policy: AlertPolicy, ph: Phases) -> Series:
    name = policy.profile.waiting_metric
    return [
        {"series": f"{name}{_labels(policy, instance=i)}", "values": ph.gauge(policy.backlog_per_replica + 1, 0)}
        for i in ("replica-a", "replica-b")
    ]


def _no_ready(policy: AlertPolicy, ph: Phases) -> Series:
    if policy.target == "cluster":
        return [{
            "series": f"kube_deployment_status_replicas_available{_replica_labels(policy)}",
            "values": ph.gauge(0, 2),
        }]
    return [
        {"series": f"up{_labels(policy, instance=i)}", "values": ph.gauge(0, 1)}
        for i in ("replica-a", "replica-b")
    ]


def _at_max(policy: AlertPolicy, ph: Phases) -> Series:
    assert policy.max_replicas is not None
    if policy.target == "cluster":
        return [{
            "series": f"kube_deployment_spec_replicas{_replica_labels(policy)}",
            "values": ph.gauge(policy.max_replicas, 1),
        }]
    series = [{"series": f"up{_labels(policy, instance='replica-0')}", "values": ph.gauge(1, 1)}]
    series += [
        {"series": f"up{_labels(policy, instance=f'replica-{i}')}", "values": ph.until_switch(1)}
        for i in range(1, policy.max_replicas)
    ]
    return series


def _refusals(policy: AlertPolicy, ph: Phases) -> Series:
    ref = policy.profile.refused
    assert ref is not None
    finished = f"{policy.profile.e2e_histogram}_count"
    # Firing: half of the answers are 429s. Healthy: none.
    return [
        {"series": f"{ref.name}{_labels(policy, **dict(ref.match))}", "values": ph.counter(10, 0)},
        {"series": f"{finished}{_labels(policy)}", "values": ph.counter(10, 10)},
    ]


SCENARIOS: dict[str, Callable[[AlertPolicy, Phases], Series]] = {
    "LlmTtftP99AboveSlo": _ttft,
    "LlmQueueBacklog": _backlog,
    "LlmNoReadyReplica": _no_ready,
    "LlmReplicasAtMax": _at_max,
    "LlmRefusalRatioHigh": _refusals,
}


def _expected(rule: dict[str, Any], policy: AlertPolicy) -> dict[str, Any]:
    return {
        "exp_labels": {**dict(policy.scope), **rule["labels"]},
        "exp_annotations": rule["annotations"],
    }


def promtool_tests(policy: AlertPolicy, rule_file: str) -> dict[str, Any]:
    """A promtool test file with one group per alert of the policy.

    Raises KeyError for an alert without a scenario: every alert must be tested.
    """
    groups = []
    for rule in alerting_rules(policy):
        name = rule["alert"]
        ph = Phases(policy)
        group: dict[str, Any] = {
            "name": name,
            "interval": f"{STEP_MINUTES}m",
            "input_series": SCENARIOS[name](policy, ph),
            "alert_rule_test": [
                {"eval_time": ph.fire_at, "alertname": name, "exp_alerts": [_expected(rule, policy)]},
                {"eval_time": ph.resolve_at, "alertname": name, "exp_alerts": []},
            ],
        }
        if name == "LlmQueueBacklog":
            # The recorded series the alert reads, checked on its own.
            group["promql_expr_test"] = [{
                "expr": recorded(policy, "waiting_per_replica", "avg"),
                "eval_time": ph.fire_at,
                "exp_samples": [{
                    "labels": f"llm_serving:waiting_per_replica:avg"
                              f"{_labels(policy, model=policy.model)}",
                    "value": policy.backlog_per_replica + 1,
                }],
            }]
        if name == "LlmRefusalRatioHigh":
            group["promql_expr_test"] = [{
                "expr": recorded(policy, "refused", "ratio"),
                "eval_time": ph.fire_at,
                "exp_samples": [{
                    "labels": f"llm_serving:refused:ratio{_labels(policy, model=policy.model)}",
                    "value": 0.5,
                }],
            }]
        groups.append(group)
    return {"rule_files": [rule_file], "evaluation_interval": f"{STEP_MINUTES}m", "tests": groups}
