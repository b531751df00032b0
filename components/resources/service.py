"""LlmService: the Service in front of the model pods, and the address clients use."""

from __future__ import annotations

from typing import Any, Literal, Mapping, NotRequired, Sequence, TypedDict

import pulumi
import pulumi_kubernetes as k8s


class LlmServiceArgs(TypedDict):
    namespace: pulumi.Input[str]
    selector: Mapping[str, str]
    """Pod labels to route to (LlmDeployment.selector)."""
    port: int
    """Port the Service listens on."""
    target_port: NotRequired[int | str]
    """Container port or its name; default the port named `http`."""
    type: NotRequired[Literal["LoadBalancer", "ClusterIP", "NodePort"]]
    """LoadBalancer by default: one external address, no ingress needed."""
    annotations: NotRequired[Mapping[str, str]]
    """Cloud load-balancer annotations."""
    source_ranges: NotRequired[Sequence[str]]
    """Client CIDRs a LoadBalancer admits; empty admits all."""
    labels: NotRequired[Mapping[str, str]]


def _field(obj: Any, snake: str, camel: str) -> Any:
    """Typed output objects in a real run; plain camelCase dicts when the engine
    cannot map the type (as under mocks). Read either."""
    if obj is None:
        return None
    if type(obj) is dict:  # noqa: E721 - typed outputs subclass dict; read those by attribute
        return obj.get(camel, obj.get(snake))
    return getattr(obj, snake, None)


def external_address(status: Any) -> str | None:
    """`ip` or `hostname` of the first load-balancer ingress (clouds differ)."""
    balancer = _field(status, "load_balancer", "loadBalancer")
    ingress = _field(balancer, "ingress", "ingress") or []
    if not ingress:
        return None
    return _field(ingress[0], "ip", "ip") or _field(ingress[0], "hostname", "hostname")


class LlmService(pulumi.ComponentResource):
    service_name: pulumi.Output[str]
    address: pulumi.Output[str]
    """External IP or hostname for a LoadBalancer; the cluster DNS name otherwise."""
    endpoint: pulumi.Output[str]
    """Base URL of the OpenAI-compatible API (ends in /v1)."""

    def __init__(
        self, name: str, args: LlmServiceArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("llm-serving:index:LlmService", name, None, opts)
        service_type = args.get("type", "LoadBalancer")
        if service_type not in ("LoadBalancer", "ClusterIP", "NodePort"):
            raise ValueError(
                f"LlmService: 'type' must be LoadBalancer, ClusterIP or NodePort, got {service_type!r}"
            )
        port = args["port"]
        if not 1 <= port <= 65535:
            raise ValueError(f"LlmService: 'port' must be 1-65535, got {port}")
        source_ranges = list(args.get("source_ranges", []))
        if source_ranges and service_type != "LoadBalancer":
            raise ValueError("LlmService: 'source_ranges' applies only to type LoadBalancer")

        spec: dict[str, Any] = {
            "type": service_type,
            "selector": dict(args["selector"]),
            "ports": [{
                "name": "http",
                "port": port,
                "target_port": args.get("target_port", "http"),
                "protocol": "TCP",
            }],
        }
        if source_ranges:
            spec["load_balancer_source_ranges"] = source_ranges
        service = k8s.core.v1.Service(
            f"{name}-svc",
            metadata={
                "namespace": args["namespace"],
                "labels": dict(args.get("labels", {})),
                "annotations": dict(args.get("annotations", {})),
            },
            spec=spec,
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.service_name = service.metadata.name
        cluster_dns = pulumi.Output.concat(
            service.metadata.name, ".", service.metadata.namespace, ".svc.cluster.local"
        )
        if service_type == "LoadBalancer":
            self.address = pulumi.Output.all(service.status, cluster_dns).apply(
                lambda parts: external_address(parts[0]) or parts[1]
            )
        else:
            self.address = cluster_dns
        self.endpoint = self.address.apply(
            lambda host: f"http://{host}/v1" if port == 80 else f"http://{host}:{port}/v1"
        )
        self.register_outputs({
            "service_name": self.service_name,
            "address": self.address,
            "endpoint": self.endpoint,
        })
