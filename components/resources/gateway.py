"""The Gateway API inference path: NGINX Gateway Fabric with the Inference Extension, a Gateway,
the model router in front of it, and per model an InferencePool with its endpoint picker and an
HTTPRoute that matches the model's name.

    client -> model router (LoadBalancer) -> Gateway (NGINX Gateway Fabric, ClusterIP)
           -> HTTPRoute of the model (X-Gateway-Model-Name) -> InferencePool
           -> endpoint picker chooses the pod -> vLLM

Every chart value and CRD field rendered here is one the pinned versions read
(tests/contracts/data: nginx-gateway-fabric-2.6.7, gateway-api-1.5.1,
gateway-api-inference-extension-1.5.0, nginx-unprivileged-1.29.8; checked in
tests/contracts/test_gateway_stack.py). Why the router exists: components/policies/model_routing.py.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, NotRequired, Sequence, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.config.exposure import GATEWAY_NAME
from components.config.stack import StackConfig
from components.pins import (
    EPP_CHART,
    EPP_CHART_VERSION,
    GATEWAY_API_CRDS,
    INFERENCE_EXTENSION_CRDS,
    MODEL_ROUTER_IMAGE,
    NGF_CHART,
)
from components.policies.balancing import read_timeout_seconds, send_timeout_seconds
from components.policies.model_routing import (
    MODEL_HEADER,
    ROUTER_HEALTH_PATH,
    ROUTER_NOT_FOUND_PORT,
    ROUTER_PORT,
    ROUTER_TLS_DIR,
    ROUTER_TLS_PORT,
    ROUTER_WRITABLE_DIR,
    RouterPlan,
    router_conf,
)
from components.policies.pod_security import pod_security_labels
from components.resources.service import external_address

GATEWAY_GROUP = "gateway.networking.k8s.io"
POOL_GROUP = "inference.networking.k8s.io"
DATA_PLANE_PORT = 80
"""The Gateway's HTTP listener, and so its data-plane Service port."""
ROUTER_CONFIG_DIR = "/etc/llm-router"
ROUTER_UID = 101
"""The router image's user (tests/contracts/data/nginx-unprivileged-1.29.8.json)."""


def ngf_values(cfg: StackConfig) -> dict[str, Any]:
    """Values of the nginx-gateway-fabric chart (each one the pinned chart reads)."""
    gateway = cfg.gateway
    return {
        "nginxGateway": {
            "gatewayClassName": gateway.class_name,
            "gwAPIInferenceExtension": {
                "enable": True,
                # The endpoint picker serves self-signed TLS; the chart says keep verifying off
                # until it can mount certificates.
                "endpointPicker": {"disableTLS": False, "skipVerify": True},
            },
            # The controller would report product telemetry to F5 by default.
            "productTelemetry": {"enable": False},
        },
        "nginx": {
            "replicas": gateway.replicas,
            # The model router is the entry point; the Gateway stays inside the cluster.
            "service": {"type": "ClusterIP"},
        },
    }


def data_plane_service(cfg: StackConfig) -> str:
    """The Service NGINX Gateway Fabric creates for the Gateway (`<Gateway>-<GatewayClass>`,
    in the Gateway's namespace; the config keeps it under 63 characters, so never hashed)."""
    return f"{GATEWAY_NAME}-{cfg.gateway.class_name}"


def pool_name(cfg: StackConfig, index: int) -> str:
    """The InferencePool (and endpoint-picker release) of model `index`."""
    return f"llm-{cfg.models[index].kube_name}"


def epp_values(view: StackConfig, name: str, selector: Mapping[str, str]) -> dict[str, Any]:
    """Values of the inferencepool chart for one model (each one the pinned chart reads)."""
    picker = view.gateway.endpoint_picker
    extension: dict[str, Any] = {"replicas": picker.replicas}
    if picker.resources is not None:
        extension["resources"] = picker.resources.model_dump(exclude_none=True)
    monitoring = view.monitoring
    if monitoring.service_monitor:
        extension["monitoring"] = {
            "interval": f"{monitoring.interval_seconds}s",
            # The chart's ServiceMonitor, with a bearer token the picker checks; the token's
            # Secret is named per release (the chart's default name would collide).
            "prometheus": {"enabled": True, "auth": {"secretName": f"{name}-metrics-reader"},
                           "extraLabels": dict(monitoring.labels)},
        }
    return {
        "inferencePool": {
            "modelServers": {"matchLabels": dict(selector)},
            "targetPorts": [{"number": view.profile.port}],
            "modelServerType": "vllm",
        },
        "inferenceExtension": extension,
        # NGINX Gateway Fabric needs no provider objects; the route is ours (the chart's sets
        # rules[].timeouts, which the pinned controller ignores).
        "provider": {"name": "none"},
        "experimentalHttpRoute": {"enabled": False},
    }


def model_route_spec(cfg: StackConfig, index: int) -> dict[str, Any]:
    """The HTTPRoute of model `index`: the Gateway's /v1 with the model's header, to its pool."""
    return {
        "parentRefs": [{"name": GATEWAY_NAME}],
        "rules": [{
            "matches": [{
                "path": {"type": "PathPrefix", "value": "/v1"},
                "headers": [{"type": "Exact", "name": MODEL_HEADER,
                             "value": cfg.models[index].served}],
            }],
            "backendRefs": [{"group": POOL_GROUP, "kind": "InferencePool",
                             "name": pool_name(cfg, index)}],
        }],
    }


def proxy_settings_spec(view: StackConfig, route_name: pulumi.Input[str]) -> dict[str, Any]:
    """NGINX Gateway Fabric's ProxySettingsPolicy of a model's route: unbuffered (nginx buffers
    by default and would hold streamed tokens) and the loadBalancing timeouts."""
    lb, tokens = view.load_balancing, view.model.max_output_tokens
    return {
        "targetRefs": [{"group": GATEWAY_GROUP, "kind": "HTTPRoute", "name": route_name}],
        "buffering": {"disable": True},
        "timeout": {
            "connect": f"{lb.connect_timeout_seconds}s",
            "read": f"{read_timeout_seconds(lb, tokens)}s",
            "send": f"{send_timeout_seconds(lb, tokens)}s",
        },
    }


def _name(resource: k8s.apiextensions.CustomResource) -> pulumi.Output[str]:
    """A custom resource's name: a typed object in a real run, a plain dict under mocks."""
    return resource.metadata.apply(
        lambda meta: meta["name"] if isinstance(meta, dict) else meta.name)


def nginx_size(size: str) -> str:
    """An nginx size (`512k`, `1m`, `8M`, bytes) as NGINX Gateway Fabric's policies spell it
    (`^\\d{1,4}(k|m|g)?$`): lower-case unit, at most four digits."""
    factors = {"": 1, "k": 1024, "m": 1024 ** 2}
    number, unit = int(size.rstrip("kKmM")), size[-1].lower() if size[-1].isalpha() else ""
    total = number * factors[unit]
    for suffix, factor in (("g", 1024 ** 3), ("m", 1024 ** 2), ("k", 1024)):
        if total % factor == 0 and total // factor < 10_000:
            return f"{total // factor}{suffix}"
    return f"{-(-total // 1024)}k"


def client_settings_spec(cfg: StackConfig) -> dict[str, Any]:
    """NGINX Gateway Fabric's ClientSettingsPolicy of the Gateway: the largest request body, as
    at the router (the controller sets none, so nginx's 1m would apply)."""
    return {
        "targetRef": {"group": GATEWAY_GROUP, "kind": "Gateway", "name": GATEWAY_NAME},
        "body": {"maxSize": nginx_size(cfg.load_balancing.client_max_body_size)},
    }


class InferenceGatewayArgs(TypedDict):
    config: StackConfig
    namespace: pulumi.Input[str]
    """The stack's namespace: the Gateway, its data plane, the router and the pools live there."""
    labels: NotRequired[Mapping[str, str]]


class InferenceGateway(pulumi.ComponentResource):
    """NGINX Gateway Fabric (and the CRDs), the Gateway, and the model router in front of it."""

    endpoint: pulumi.Output[str]
    """Base URL of the API for every model (ends in /v1)."""
    ready: list[pulumi.Resource]
    """What an InferencePool release and an HTTPRoute must wait for (CRDs, controller, Gateway)."""
    pool_crds: list[pulumi.Resource]

    def __init__(self, name: str, args: InferenceGatewayArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-serving:index:InferenceGateway", name, None, opts)
        cfg = args["config"]
        if not cfg.gateway.enabled:
            raise ValueError("InferenceGateway: gateway.enabled is false; do not create one")
        labels = dict(args.get("labels", {}))
        installed: list[pulumi.Resource] = []
        self.pool_crds = []
        if cfg.gateway.controller.install:
            installed, self.pool_crds = self._install(name, cfg, labels)
        self.gateway = k8s.apiextensions.CustomResource(
            f"{name}-gateway",
            api_version=f"{GATEWAY_GROUP}/v1",
            kind="Gateway",
            # A fixed name: the controller names the data-plane Service after it.
            metadata={"name": GATEWAY_NAME, "namespace": args["namespace"], "labels": labels},
            spec={
                "gatewayClassName": cfg.gateway.class_name,
                "listeners": [{"name": "http", "port": DATA_PLANE_PORT, "protocol": "HTTP",
                               "allowedRoutes": {"namespaces": {"from": "Same"}}}],
            },
            opts=pulumi.ResourceOptions(parent=self, depends_on=installed),
        )
        self.ready = [*installed, self.gateway]
        k8s.apiextensions.CustomResource(
            f"{name}-client-settings",
            api_version="gateway.nginx.org/v1alpha1",
            kind="ClientSettingsPolicy",
            metadata={"namespace": args["namespace"], "labels": labels},
            spec=client_settings_spec(cfg),
            opts=pulumi.ResourceOptions(parent=self, depends_on=self.ready),
        )
        self.endpoint = self._router(name, cfg, args["namespace"], labels)
        self.register_outputs({"endpoint": self.endpoint})

    def _install(self, name: str, cfg: StackConfig, labels: Mapping[str, str]
                 ) -> tuple[list[pulumi.Resource], list[pulumi.Resource]]:
        """The Gateway API and Inference Extension CRDs (the pinned release manifests, applied
        as they are), and the controller."""
        child = pulumi.ResourceOptions(parent=self)
        gateway_crds = k8s.yaml.v2.ConfigFile(f"{name}-gateway-api-crds", file=GATEWAY_API_CRDS,
                                              opts=child)
        pool_crds = k8s.yaml.v2.ConfigFile(f"{name}-inference-crds", file=INFERENCE_EXTENSION_CRDS,
                                           opts=child)
        controller = cfg.gateway.controller
        namespace = k8s.core.v1.Namespace(
            f"{name}-controller-ns",
            # Control plane and certificate job meet `restricted`
            # (tests/contracts/data/nginx-gateway-fabric-2.6.7.json, podSecurity).
            metadata={"name": controller.namespace,
                      "labels": {**labels, **pod_security_labels("restricted")}},
            opts=child,
        )
        release = k8s.helm.v3.Release(
            f"{name}-controller",
            name=cfg.gateway.class_name,
            chart=NGF_CHART,
            version=controller.chart_version,
            namespace=namespace.metadata.name,
            values=ngf_values(cfg),
            skip_await=False,
            # The chart installs NGINX Gateway Fabric's own CRDs, not the Gateway API's.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[gateway_crds, pool_crds]),
        )
        return [gateway_crds, pool_crds, release], [pool_crds]

    def _router(self, name: str, cfg: StackConfig, namespace: pulumi.Input[str],
                labels: Mapping[str, str]) -> pulumi.Output[str]:
        gateway, lb = cfg.gateway, cfg.load_balancing
        tls = gateway.tls_secret is not None
        plan = RouterPlan(
            models=tuple(m.served for m in cfg.models),
            gateway_host=f"{data_plane_service(cfg)}.{cfg.namespace}.svc.cluster.local",
            gateway_port=DATA_PLANE_PORT,
            policy=lb,
            max_output_tokens=max(m.max_output_tokens for m in cfg.models),
            tls=tls,
        )
        conf = router_conf(plan)
        selector = {"app.kubernetes.io/name": "llm-router", "app.kubernetes.io/instance": name}
        pod_labels = {**labels, **selector, "app.kubernetes.io/component": "model-router"}
        metadata = {"namespace": namespace, "labels": pod_labels}
        config = k8s.core.v1.ConfigMap(
            f"{name}-router-config", metadata=metadata, data={"nginx.conf": conf},
            opts=pulumi.ResourceOptions(parent=self))
        volumes: list[dict[str, Any]] = [
            {"name": "config", "config_map": {"name": config.metadata.name}},
            {"name": "tmp", "empty_dir": {"size_limit": "256Mi"}},
        ]
        mounts: list[dict[str, Any]] = [
            {"name": "config", "mount_path": ROUTER_CONFIG_DIR, "read_only": True},
            {"name": "tmp", "mount_path": ROUTER_WRITABLE_DIR},
        ]
        ports = [{"name": "http", "container_port": ROUTER_PORT},
                 {"name": "not-found", "container_port": ROUTER_NOT_FOUND_PORT}]
        if tls:
            volumes.append({"name": "tls", "secret": {"secret_name": gateway.tls_secret}})
            mounts.append({"name": "tls", "mount_path": ROUTER_TLS_DIR, "read_only": True})
            ports.append({"name": "https", "container_port": ROUTER_TLS_PORT})
        probe = {"http_get": {"path": ROUTER_HEALTH_PATH, "port": "not-found"},
                 "period_seconds": 5}
        k8s.apps.v1.Deployment(
            f"{name}-router",
            metadata=metadata,
            spec={
                "replicas": gateway.router.replicas,
                "selector": {"match_labels": selector},
                "template": {
                    # A new config rolls the pods.
                    "metadata": {"labels": pod_labels, "annotations": {
                        "llm-serving/config-sha256": hashlib.sha256(conf.encode()).hexdigest()}},
                    "spec": {
                        "automount_service_account_token": False,
                        "security_context": {
                            "run_as_non_root": True, "run_as_user": ROUTER_UID,
                            "run_as_group": ROUTER_UID,
                            "seccomp_profile": {"type": "RuntimeDefault"}},
                        "containers": [{
                            "name": "router",
                            "image": MODEL_ROUTER_IMAGE,
                            # nginx itself: the image's entrypoint scripts edit /etc/nginx.
                            "command": ["nginx", "-c", f"{ROUTER_CONFIG_DIR}/nginx.conf",
                                        "-g", "daemon off;"],
                            "ports": ports,
                            "resources": gateway.router.resources.model_dump(exclude_none=True),
                            "readiness_probe": probe,
                            "liveness_probe": {**probe, "failure_threshold": 6},
                            "volume_mounts": mounts,
                            "security_context": {
                                "allow_privilege_escalation": False,
                                "capabilities": {"drop": ["ALL"]},
                                "read_only_root_filesystem": True,
                                "run_as_non_root": True,
                            },
                        }],
                        "volumes": volumes,
                    },
                },
            },
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.gateway]),
        )
        public_ports = [{"name": "http", "port": 80, "target_port": "http", "protocol": "TCP"}]
        if tls:
            public_ports.append({"name": "https", "port": 443, "target_port": "https",
                                 "protocol": "TCP"})
        spec: dict[str, Any] = {"type": "LoadBalancer", "selector": selector, "ports": public_ports}
        if gateway.router.source_ranges:
            spec["load_balancer_source_ranges"] = list(gateway.router.source_ranges)
        public = k8s.core.v1.Service(
            f"{name}-router-svc",
            metadata={**metadata, "annotations": dict(gateway.router.service_annotations)},
            spec=spec, opts=pulumi.ResourceOptions(parent=self))
        fallback = k8s.core.v1.Service(
            f"{name}-router-fallback",
            metadata=metadata,
            spec={"type": "ClusterIP", "selector": selector, "ports": [
                {"name": "not-found", "port": ROUTER_NOT_FOUND_PORT, "target_port": "not-found",
                 "protocol": "TCP"}]},
            opts=pulumi.ResourceOptions(parent=self))
        # Requests whose model no route matches reach the router's OpenAI-style 404.
        k8s.apiextensions.CustomResource(
            f"{name}-fallback-route",
            api_version=f"{GATEWAY_GROUP}/v1",
            kind="HTTPRoute",
            metadata={"namespace": namespace, "labels": labels},
            spec={"parentRefs": [{"name": GATEWAY_NAME}], "rules": [{
                "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                "backendRefs": [{"name": fallback.metadata.name, "port": ROUTER_NOT_FOUND_PORT}],
            }]},
            opts=pulumi.ResourceOptions(parent=self, depends_on=self.ready),
        )
        scheme = "https" if tls else "http"
        if gateway.host is not None:
            return pulumi.Output.from_input(f"{scheme}://{gateway.host}/v1")
        return public.status.apply(
            lambda status: f"{scheme}://{external_address(status) or 'pending'}/v1")


class InferencePoolRouteArgs(TypedDict):
    config: StackConfig
    """One model's view of the stack (`StackConfig.for_model`)."""
    namespace: pulumi.Input[str]
    selector: Mapping[str, str]
    """The model's pod labels (the InferencePool's selector)."""
    depends_on: Sequence[pulumi.Resource]
    """InferenceGateway.ready."""
    pool_crds: NotRequired[Sequence[pulumi.Resource]]
    labels: NotRequired[Mapping[str, str]]


class InferencePoolRoute(pulumi.ComponentResource):
    """One model on the Gateway: its InferencePool and endpoint picker (the upstream chart), the
    HTTPRoute that matches its name, and the route's proxy settings."""

    pool: str
    """The InferencePool's name (the picker's release name)."""

    def __init__(self, name: str, args: InferencePoolRouteArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-serving:index:InferencePoolRoute", name, None, opts)
        view = args["config"]
        pool = pool_name(view, 0)  # the view's only model
        labels = dict(args.get("labels", {}))
        release = k8s.helm.v3.Release(
            f"{name}-picker",
            name=pool,
            chart=EPP_CHART,
            version=EPP_CHART_VERSION,
            namespace=args["namespace"],
            values=epp_values(view, pool, args["selector"]),
            skip_await=False,
            opts=pulumi.ResourceOptions(parent=self,
                                        depends_on=list(args.get("pool_crds", []))),
        )
        route = k8s.apiextensions.CustomResource(
            f"{name}-route",
            api_version=f"{GATEWAY_GROUP}/v1",
            kind="HTTPRoute",
            metadata={"namespace": args["namespace"], "labels": labels},
            spec=model_route_spec(view, 0),
            opts=pulumi.ResourceOptions(parent=self,
                                        depends_on=[*args["depends_on"], release]),
        )
        k8s.apiextensions.CustomResource(
            f"{name}-proxy-settings",
            api_version="gateway.nginx.org/v1alpha1",
            kind="ProxySettingsPolicy",
            metadata={"namespace": args["namespace"], "labels": labels},
            spec=proxy_settings_spec(view, _name(route)),
            opts=pulumi.ResourceOptions(parent=self, depends_on=args["depends_on"]),
        )
        self.pool = pool
        self.register_outputs({})
