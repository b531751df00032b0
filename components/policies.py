"""PodPolicies: what may disrupt the model pods and who may reach them."""

from __future__ import annotations

from typing import Any, Mapping, NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.config import StackConfig


class PodPoliciesArgs(TypedDict):
    config: StackConfig
    namespace: pulumi.Input[str]
    selector: Mapping[str, str]
    """Labels of the model pods."""
    port: int
    """The pods' API port (metrics are served on it too)."""
    ingress_namespace: NotRequired[str | None]
    """Namespace of the ingress controller, when traffic must come through it."""
    ingress_pod_labels: NotRequired[Mapping[str, str] | None]
    """Labels of the controller pods, when known (this stack installed it)."""
    labels: NotRequired[Mapping[str, str]]


def _from_namespace(namespace: str, pods: Mapping[str, str] | None = None) -> dict[str, Any]:
    peer: dict[str, Any] = {
        "namespace_selector": {"match_labels": {"kubernetes.io/metadata.name": namespace}}
    }
    if pods:
        peer["pod_selector"] = {"match_labels": dict(pods)}
    return peer


class PodPolicies(pulumi.ComponentResource):
    def __init__(
        self, name: str, args: PodPoliciesArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("llm-serving:index:PodPolicies", name, None, opts)
        cfg = args["config"]
        metadata = {"namespace": args["namespace"], "labels": dict(args.get("labels", {}))}
        selector = {"match_labels": dict(args["selector"])}
        if cfg.disruption_budget.enabled:
            k8s.policy.v1.PodDisruptionBudget(
                f"{name}-pdb",
                metadata=metadata,
                spec={
                    "selector": selector,
                    "max_unavailable": cfg.disruption_budget.max_unavailable,
                    # A pod that is still loading (not Ready) must not block a node
                    # drain: evicting it loses no requests.
                    "unhealthy_pod_eviction_policy": "AlwaysAllow",
                },
                opts=pulumi.ResourceOptions(parent=self),
            )
        if cfg.network_policy.enabled:
            self._network_policy(name, args, metadata, selector)
        self.register_outputs({})

    def _network_policy(
        self, name: str, args: PodPoliciesArgs, metadata: dict, selector: dict
    ) -> None:
        cfg = args["config"]
        port = [{"port": args["port"], "protocol": "TCP"}]
        rules: list[dict[str, Any]] = []
        ingress_namespace = args.get("ingress_namespace")
        if ingress_namespace:
            rules.append({
                "from": [_from_namespace(ingress_namespace, args.get("ingress_pod_labels"))],
                "ports": port,
            })
        else:
            # Through a LoadBalancer, clients arrive from anywhere (and often
            # SNATed to node addresses): allow the API port, nothing else.
            rules.append({"ports": port})
        monitoring = cfg.network_policy.monitoring_namespace
        if monitoring:
            rules.append({"from": [_from_namespace(monitoring)], "ports": port})
        k8s.networking.v1.NetworkPolicy(
            f"{name}-netpol",
            metadata=metadata,
            spec={"pod_selector": selector, "policy_types": ["Ingress"], "ingress": rules},
            opts=pulumi.ResourceOptions(parent=self),
        )
