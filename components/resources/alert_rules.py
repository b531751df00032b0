"""The alerting policy (components/policies/alerting.py) as a Prometheus Operator
`PrometheusRule`: the cluster rendering of the rules local mode loads into its Prometheus."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.policies.alerting import alert_policy, rule_groups

if TYPE_CHECKING:
    from components.config.stack import StackConfig


class LlmAlertRulesArgs(TypedDict):
    config: "StackConfig"
    namespace: pulumi.Input[str]
    labels: NotRequired[Mapping[str, str]]
    """Labels the Prometheus selects rules by, e.g. release: kube-prometheus-stack."""


class LlmAlertRules(pulumi.ComponentResource):
    """A Prometheus Operator PrometheusRule with the stack's recording rules and alerts."""

    def __init__(
        self, name: str, args: LlmAlertRulesArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("llm-serving:index:LlmAlertRules", name, None, opts)
        policy = alert_policy(args["config"], "cluster")
        k8s.apiextensions.CustomResource(
            f"{name}-rules",
            api_version="monitoring.coreos.com/v1",
            kind="PrometheusRule",
            metadata={"namespace": args["namespace"], "labels": dict(args.get("labels", {}))},
            spec={"groups": rule_groups(policy)},
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.register_outputs({})
