"""The alerting policy (components/policies/alerting.py) as a Prometheus Operator
`PrometheusRule`: the cluster rendering of the rules local mode loads into its Prometheus."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.policies.alerting import alert_policy, needs_deployment, rule_groups

if TYPE_CHECKING:
    from components.config.stack import StackConfig


class LlmAlertRulesArgs(TypedDict):
    config: "StackConfig"
    """The stack, or one model's view of it (`StackConfig.for_model`)."""
    namespace: pulumi.Input[str]
    deployment_name: NotRequired[pulumi.Input[str]]
    """The model's Deployment: scopes the replica counts to it (required where other
    Deployments share the namespace: several models, or the gateway's router)."""
    labels: NotRequired[Mapping[str, str]]
    """Labels the Prometheus selects rules by, e.g. release: kube-prometheus-stack."""


class LlmAlertRules(pulumi.ComponentResource):
    """A Prometheus Operator PrometheusRule with the stack's recording rules and alerts."""

    def __init__(
        self, name: str, args: LlmAlertRulesArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("llm-serving:index:LlmAlertRules", name, None, opts)
        cfg = args["config"]
        spec: pulumi.Input[dict]
        if "deployment_name" in args:
            spec = pulumi.Output.from_input(args["deployment_name"]).apply(
                lambda deployment: {"groups": rule_groups(
                    alert_policy(cfg, "cluster", deployment=deployment))})
        elif needs_deployment(cfg):
            raise ValueError("LlmAlertRules: a model whose namespace holds other Deployments "
                             "(several models, or the gateway's router) needs 'deployment_name'")
        else:
            spec = {"groups": rule_groups(alert_policy(cfg, "cluster"))}
        k8s.apiextensions.CustomResource(
            f"{name}-rules",
            api_version="monitoring.coreos.com/v1",
            kind="PrometheusRule",
            metadata={"namespace": args["namespace"], "labels": dict(args.get("labels", {}))},
            spec=spec,
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.register_outputs({})
