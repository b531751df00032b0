"""NginxIngress: the F5 NGINX Ingress Controller in front of the model, with the
load-balancing policy rendered as its `nginx.org/*` annotations."""

from __future__ import annotations

from typing import Any, Mapping, NotRequired, Sequence, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.config.exposure import CONTROLLER_SERVICE_SUFFIX, ControllerConfig
from components.pins import NIC_CHART
from components.policies.monitoring import merge_values
from components.policies.pod_security import pod_security_labels
from components.policies.tls import mergeable_annotations
from components.resources.service import external_address


class IngressRoute(TypedDict):
    """One path prefix of the Ingress and the model Service behind it."""

    path: str
    service_name: pulumi.Input[str]
    service_port: int
    rewrite: NotRequired[str | None]
    """Replace `path` with this prefix on the way to the pods (`nginx.org/rewrites`): a model
    served at /coder/v1 gets /v1/... requests."""


class NginxIngressArgs(TypedDict):
    namespace: pulumi.Input[str]
    """Namespace of the model Services and of the Ingress."""
    routes: Sequence[IngressRoute]
    """Path prefixes and their model Services; the first is the stack's endpoint. The
    controller cannot read the request body, so several models get a path each."""
    class_name: str
    """IngressClass name; the controller this component installs owns it."""
    controller: ControllerConfig
    """Install the controller (Helm) or use one that already serves `class_name`."""
    annotations: Mapping[str, str]
    """Controller annotations from the load-balancing policy (`nginx.org/*`)."""
    host: NotRequired[str | None]
    tls_secret: NotRequired[str | None]
    """TLS Secret for `host` (existing, or the one cert-manager fills); plain HTTP is then
    redirected to HTTPS."""
    mergeable: NotRequired[bool]
    """Split into a master Ingress (the host, its TLS and redirect) and a minion (the paths, their
    rewrites and the policy's annotations), so cert-manager's HTTP-01 solver can add its own minion for the
    host without editing ours (components/policies/tls.py). Needs `host`."""
    depends_on: NotRequired[Sequence[pulumi.Resource]]
    """What the Ingress waits for besides the controller (e.g. the ClusterIssuer)."""
    labels: NotRequired[Mapping[str, str]]
    extra_values: NotRequired[Mapping[str, Any]]
    """More chart values, merged over the component's own (e.g. the controller's metrics
    endpoint and ServiceMonitor, components/policies/monitoring.py)."""


def controller_values(
    class_name: str, release: str, cfg: ControllerConfig, watch_namespaces: Any, hostless: bool
) -> dict[str, Any]:
    """Helm values for the nginx-ingress chart; names are fixed so other objects can find them.

    Every key is one the pinned chart reads (tests/contracts checks them: Helm itself would
    accept a misspelt key silently, the chart's schema allows unknown keys).
    """
    controller: dict[str, Any] = {
        "replicaCount": cfg.replicas,
        "ingressClass": {"name": class_name, "create": True, "setAsDefaultIngress": False},
        # The model's namespace and the controller's own (comma-separated): the controller
        # sees Services only in watched namespaces, and it must see its own LoadBalancer
        # Service (-external-service) to publish the Ingress's address, which `pulumi up`
        # waits for. Nothing else in the cluster can be published through it.
        "watchNamespace": watch_namespaces,
        # Writes status.loadBalancer on the Ingress from that Service (the chart's default,
        # pinned here because the Ingress await depends on it).
        "reportIngressStatus": {"enable": True},
        "enableSnippets": False,
        "resources": cfg.resources.model_dump(exclude_none=True),
        "service": {"type": "LoadBalancer", "annotations": dict(cfg.service_annotations)},
    }
    if cfg.source_ranges:
        # The cloud load balancer admits only these client addresses.
        controller["service"]["loadBalancerSourceRanges"] = list(cfg.source_ranges)
    if hostless:
        # The controller rejects a rule without a host unless told otherwise (5.5+).
        controller["allowEmptyIngressHost"] = True
    return {
        "fullnameOverride": release,
        "serviceNameOverride": f"{release}{CONTROLLER_SERVICE_SUFFIX}",
        "controller": controller,
    }


def controller_pod_labels(release: str) -> dict[str, str]:
    """The chart's selector labels for the controller pods."""
    return {"app.kubernetes.io/name": "nginx-ingress", "app.kubernetes.io/instance": release}


def rewrites_annotation(routes: Sequence[IngressRoute]) -> pulumi.Output[str] | None:
    """`nginx.org/rewrites` for the routes that rewrite their path: `serviceName=<svc>
    rewrite=<prefix>`, `;`-separated (nginx/kubernetes-ingress@v5.5.4:
    internal/configs/parsing_helpers.go, ParseRewriteList). The controller then proxies with
    `proxy_pass http://<upstream><prefix>`, which swaps the location's path for the prefix."""
    rewritten = [r for r in routes if r.get("rewrite")]
    if not rewritten:
        return None
    parts = [pulumi.Output.concat("serviceName=", r["service_name"], " rewrite=", r["rewrite"])
             for r in rewritten]
    return pulumi.Output.all(*parts).apply(";".join)


class NginxIngress(pulumi.ComponentResource):
    endpoint: pulumi.Output[str]
    """Base URL of the API through the controller (ends in /v1): the first route's."""
    base_url: pulumi.Output[str]
    """scheme://host (or address) of the controller, without a path."""
    controller_namespace: str
    release_name: str

    def __init__(
        self, name: str, args: NginxIngressArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("llm-serving:index:NginxIngress", name, None, opts)
        host, tls_secret = args.get("host"), args.get("tls_secret")
        if tls_secret and not host:
            raise ValueError("NginxIngress: 'tls_secret' needs 'host', the name on the certificate")
        routes = list(args["routes"])
        paths = [r["path"] for r in routes]
        if not routes or len(set(paths)) != len(paths):
            raise ValueError(f"NginxIngress: 'routes' needs one or more distinct paths, got {paths}")
        bad = [k for k in args["annotations"] if not k.startswith("nginx.org/")]
        if bad:
            raise ValueError(
                f"NginxIngress: annotations {bad} are not nginx.org/* annotations; "
                "the F5 NGINX Ingress Controller would silently ignore them"
            )
        mergeable = args.get("mergeable", False)
        if mergeable and not host:
            raise ValueError("NginxIngress: 'mergeable' needs 'host': a master Ingress holds one")
        controller = args["controller"]
        self.controller_namespace = controller.namespace
        self.release_name = f"{args['class_name']}"
        labels = dict(args.get("labels", {}))

        depends: list[pulumi.Resource] = list(args.get("depends_on", []))
        release = None
        if controller.install:
            release = self._install_controller(name, args, labels)
            depends.append(release)

        host_rule = {"host": host} if host else {}
        spec: dict[str, Any] = {
            "ingress_class_name": args["class_name"],
            "rules": [{
                **host_rule,
                "http": {"paths": [{
                    "path": route["path"],
                    "path_type": "Prefix",
                    "backend": {"service": {
                        "name": route["service_name"],
                        "port": {"number": route["service_port"]},
                    }},
                } for route in routes]},
            }],
        }
        # The model paths and their rewrites go on the one Ingress, or on the minion when the
        # host is split (the controller denies nginx.org/rewrites on a master and takes the
        # paths from minions only: tests/contracts/data/nginx-ingress-controller-5.5.4.json).
        annotations: dict[str, Any] = dict(args["annotations"])
        rewrites = rewrites_annotation(routes)
        if rewrites is not None:
            annotations["nginx.org/rewrites"] = rewrites
        tls_annotations: dict[str, str] = {}
        tls_spec = []
        if tls_secret:
            tls_spec = [{"hosts": [host], "secret_name": tls_secret}]
            # The controller's default, pinned: with TLS on, every plain-HTTP request gets a
            # redirect to HTTPS, so a bearer key is never answered over plain HTTP.
            tls_annotations["nginx.org/ssl-redirect"] = "True"
        metadata = {"namespace": args["namespace"], "labels": labels}
        if not mergeable:
            k8s.networking.v1.Ingress(
                f"{name}-ingress",
                metadata={**metadata, "annotations": {**annotations, **tls_annotations}},
                spec={**spec, **({"tls": tls_spec} if tls_spec else {})},
                # The IngressClass comes with the controller release.
                opts=pulumi.ResourceOptions(parent=self, depends_on=depends),
            )
        else:
            master = k8s.networking.v1.Ingress(
                f"{name}-host",
                metadata={**metadata, "annotations": {
                    **tls_annotations, **mergeable_annotations("master"),
                    # Not awaited: while a single Ingress of an older render still holds the
                    # host (it becomes the minion next), the controller reports no status on the
                    # master, and the minion, which waits for one, would never be updated.
                    "pulumi.com/skipAwait": "true",
                }},
                spec={"ingress_class_name": args["class_name"], "rules": [host_rule],
                      **({"tls": tls_spec} if tls_spec else {})},
                opts=pulumi.ResourceOptions(parent=self, depends_on=depends),
            )
            # The minion keeps the Ingress's name: it routes the API, as the single Ingress did;
            # the controller reports its status once it is merged into the master.
            k8s.networking.v1.Ingress(
                f"{name}-ingress",
                metadata={**metadata,
                          "annotations": {**annotations, **mergeable_annotations("minion")}},
                spec=spec,
                opts=pulumi.ResourceOptions(parent=self, depends_on=[*depends, master]),
            )

        if host:
            scheme = "https" if tls_secret else "http"
            self.base_url = pulumi.Output.from_input(f"{scheme}://{host}")
        elif release is not None:
            # Read the controller's LoadBalancer Service the chart created, by the
            # name we fixed in its values.
            service = k8s.core.v1.Service.get(
                f"{name}-controller-svc",
                pulumi.Output.concat(
                    release.status.namespace, "/", f"{self.release_name}{CONTROLLER_SERVICE_SUFFIX}"
                ),
                opts=pulumi.ResourceOptions(parent=self, depends_on=[release]),
            )
            self.base_url = service.status.apply(
                lambda status: f"http://{external_address(status) or 'pending'}"
            )
        else:
            # An existing controller: its address is not ours to know.
            self.base_url = pulumi.Output.from_input(
                f"(address of the existing '{args['class_name']}' controller)"
            )
        self.endpoint = self.base_url.apply(lambda base: f"{base}/v1")
        self.register_outputs({"endpoint": self.endpoint, "base_url": self.base_url})

    def _install_controller(
        self, name: str, args: NginxIngressArgs, labels: Mapping[str, str]
    ) -> k8s.helm.v3.Release:
        controller = args["controller"]
        namespace = k8s.core.v1.Namespace(
            f"{name}-controller-ns",
            # The chart's default pod and container security contexts meet `restricted`
            # (tests/contracts/data/nginx-ingress-controller-5.5.4.json, podSecurity).
            metadata={"name": controller.namespace,
                      "labels": {**labels, **pod_security_labels("restricted")}},
            opts=pulumi.ResourceOptions(parent=self),
        )
        return k8s.helm.v3.Release(
            f"{name}-controller",
            name=self.release_name,
            chart=NIC_CHART,
            version=controller.chart_version,
            namespace=namespace.metadata.name,
            values=merge_values(
                controller_values(
                    args["class_name"],
                    self.release_name,
                    controller,
                    pulumi.Output.concat(args["namespace"], ",", controller.namespace),
                    hostless=not args.get("host"),
                ),
                args.get("extra_values", {}),
            ),
            # Wait for the controller's pods and LoadBalancer before the Ingress.
            skip_await=False,
            opts=pulumi.ResourceOptions(parent=self),
        )
