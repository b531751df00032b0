"""cert-manager for the ingress's certificate: installed with Helm on request (like KEDA), the
ACME HTTP-01 ClusterIssuer the stack can create, and the Certificate for the ingress host. What
the Ingress needs to use them, and why, is the TLS policy: components/policies/tls.py."""

from __future__ import annotations

from typing import Mapping, NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.pins import CERT_MANAGER_CHART, CERT_MANAGER_REPOSITORY
from components.policies.pod_security import pod_security_labels
from components.policies.tls import (
    CertManagerConfig,
    acme_issuer_spec,
    cert_manager_values,
    certificate,
    issuer_name,
    tls_secret_name,
)


class CertManagerArgs(TypedDict):
    config: CertManagerConfig
    class_name: str
    """IngressClass of this stack's controller (the HTTP-01 solver goes through it)."""
    namespace: pulumi.Input[str]
    """Namespace of the Ingress: the Certificate and its Secret go there."""
    host: str
    """The name on the certificate (ingress.host)."""
    labels: NotRequired[Mapping[str, str]]


class CertManager(pulumi.ComponentResource):
    """cert-manager (when `install`), the stack's ACME ClusterIssuer (unless an existing
    ClusterIssuer is named) and the Certificate for `host`. `ready` is what the Ingress should
    depend on."""

    ready: list[pulumi.Resource]

    def __init__(self, name: str, args: CertManagerArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-serving:index:CertManager", name, None, opts)
        cfg = args["config"]
        labels = dict(args.get("labels", {}))
        self.ready = []
        if cfg.install:
            namespace = k8s.core.v1.Namespace(
                f"{name}-ns",
                metadata={"name": cfg.namespace,
                          "labels": {**labels, **pod_security_labels("restricted")}},
                opts=pulumi.ResourceOptions(parent=self),
            )
            self.ready.append(k8s.helm.v3.Release(
                f"{name}-release",
                name="cert-manager",
                chart=CERT_MANAGER_CHART,
                version=cfg.chart_version,
                repository_opts={"repo": CERT_MANAGER_REPOSITORY},
                namespace=namespace.metadata.name,
                values=cert_manager_values(),
                # The webhook must answer before a ClusterIssuer can be created.
                skip_await=False,
                opts=pulumi.ResourceOptions(parent=self),
            ))
        if cfg.cluster_issuer is None:
            self.ready.append(k8s.apiextensions.CustomResource(
                f"{name}-issuer",
                api_version="cert-manager.io/v1",
                kind="ClusterIssuer",
                metadata={"name": issuer_name(args["class_name"], cfg), "labels": labels},
                spec=acme_issuer_spec(cfg, args["class_name"]),
                opts=pulumi.ResourceOptions(parent=self, depends_on=list(self.ready)),
            ))
        wanted = certificate(args["host"], args["class_name"], cfg)
        self.ready.append(k8s.apiextensions.CustomResource(
            f"{name}-certificate",
            api_version="cert-manager.io/v1",
            kind="Certificate",
            metadata={
                # Named as cert-manager's ingress-shim names the Certificate it made for stacks
                # rendered before the stack made its own (after the Secret): on such a cluster
                # the create fails and says so, where a second Certificate for the same Secret
                # would be skipped in silence while the old one kept editing the Ingress
                # (docs/reliability.md, "Certificates").
                "name": tls_secret_name(args["class_name"]),
                "namespace": args["namespace"],
                "labels": labels,
                "annotations": wanted["annotations"],
            },
            spec=wanted["spec"],
            opts=pulumi.ResourceOptions(parent=self, depends_on=list(self.ready)),
        ))
        self.register_outputs({})
