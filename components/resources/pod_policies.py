"""PodPolicies: what may disrupt the model pods, who may reach them and what they may reach."""

from __future__ import annotations

from typing import Any, Mapping, NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.config.stack import StackConfig


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


DNS_NAMESPACE = "kube-system"
DNS_POD_LABELS = {"k8s-app": "kube-dns"}
"""Cluster DNS pods: CoreDNS and kube-dns both carry this label in kube-system."""

METADATA_EXCEPT_V4 = ("169.254.0.0/16",)
"""IPv4 link-local: every cloud's instance metadata service (169.254.169.254) and the like."""
METADATA_EXCEPT_V6 = ("fd00:ec2::254/128", "fe80::/10")
"""AWS's IPv6 instance metadata address, and IPv6 link-local."""


def _anywhere_but_metadata() -> list[dict[str, Any]]:
    return [
        {"ip_block": {"cidr": "0.0.0.0/0", "except": list(METADATA_EXCEPT_V4)}},
        {"ip_block": {"cidr": "::/0", "except": list(METADATA_EXCEPT_V6)}},
    ]


def egress_rules(downloads_weights: bool) -> list[dict[str, Any]]:
    """What the model pods may reach. Baked weights: nothing. Downloaded weights: DNS (the
    cluster's DNS pods, or a resolver outside the cluster) and HTTPS (the model hub and its
    CDN), never a link-local or cloud metadata address (the pods hold the hub token)."""
    if not downloads_weights:
        return []
    dns_ports = [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    cluster_dns = {"namespace_selector": {"match_labels": {
        "kubernetes.io/metadata.name": DNS_NAMESPACE}},
        "pod_selector": {"match_labels": dict(DNS_POD_LABELS)}}
    return [
        {"to": [cluster_dns, *_anywhere_but_metadata()], "ports": dns_ports},
        {"to": _anywhere_but_metadata(), "ports": [{"port": 443, "protocol": "TCP"}]},
    ]


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
        if cfg.network_policy_on:
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
        spec: dict[str, Any] = {"pod_selector": selector, "policy_types": ["Ingress"],
                                "ingress": rules}
        if cfg.network_policy.restrict_egress:
            # An empty list with the Egress type denies every connection the pods open.
            spec["policy_types"] = ["Ingress", "Egress"]
            spec["egress"] = egress_rules(cfg.downloads_weights)
        k8s.networking.v1.NetworkPolicy(
            f"{name}-netpol",
            metadata=metadata,
            spec=spec,
            opts=pulumi.ResourceOptions(parent=self),
        )
