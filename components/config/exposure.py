"""Stack configuration sections of how clients reach the model: the Service, the ingress
controller and the network policy (assembled in components/config/stack.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from components.config.sections import Section
from components.config.types import Cidr, DnsLabel, NonEmptyStr, api_path, model_path
from components.config.workload import Resources, ResourcesConfig
from components.pins import NGF_VERSION, NIC_CHART_VERSION
from components.policies.tls import CertManagerConfig


class ServiceConfig(Section):
    type: Literal["LoadBalancer", "ClusterIP", "NodePort"] | None = None
    """LoadBalancer gives one external address (minikube: run `minikube tunnel`); the default,
    unless the ingress is on: then ClusterIP, as the controller is the entry point."""
    port: int = Field(80, ge=1, le=65535)
    """Port the Service listens on."""
    annotations: dict[str, str] = {}
    """Cloud load-balancer annotations, passed through."""
    source_ranges: tuple[Cidr, ...] = ()
    """Client CIDRs allowed through a LoadBalancer; empty allows all."""


DNS_LABEL_MAX = 63
HELM_RELEASE_NAME_MAX = 53
"""Helm refuses longer release names (its name check, which the provider applies)."""
CONTROLLER_SERVICE_SUFFIX = "-controller"
"""The controller Service is named <release>-controller; the chart truncates names at 63."""


def _release_name(value: str) -> str:
    longest = min(HELM_RELEASE_NAME_MAX, DNS_LABEL_MAX - len(CONTROLLER_SERVICE_SUFFIX))
    if len(value) > longest:
        raise ValueError(
            f"must be at most {longest} characters: it is also the controller's Helm release "
            f"name (at most {HELM_RELEASE_NAME_MAX}) and, with '{CONTROLLER_SERVICE_SUFFIX}', "
            f"its Service name (at most {DNS_LABEL_MAX})"
        )
    return value


class ControllerConfig(Section):
    install: bool = True
    """Install the F5 NGINX Ingress Controller with Helm; false uses one that already runs."""
    namespace: DnsLabel = "nginx-ingress"
    """Namespace of the controller (created when installing)."""
    chart_version: Literal[NIC_CHART_VERSION] = NIC_CHART_VERSION  # type: ignore[valid-type]
    """Version of the nginx-ingress chart (oci://ghcr.io/nginx/charts/nginx-ingress): only the
    version whose controller's rules were checked (components/pins.py, tests/contracts)."""
    replicas: int = Field(2, ge=1, le=100)
    """Controller pods."""
    resources: ResourcesConfig = ResourcesConfig(
        requests=Resources(cpu="250m", memory="256Mi"), limits=Resources(memory="512Mi")
    )
    """CPU and memory per controller pod."""
    service_annotations: dict[str, str] = {}
    """Cloud load-balancer annotations on the controller's LoadBalancer Service."""
    source_ranges: tuple[Cidr, ...] = ()
    """Client CIDRs the controller's LoadBalancer admits (chart value
    controller.service.loadBalancerSourceRanges); empty admits every address."""


class IngressConfig(Section):
    enabled: bool = False
    """Put the F5 NGINX Ingress Controller in front of the model, with the loadBalancing policy."""
    class_name: Annotated[DnsLabel, AfterValidator(_release_name)] = "llm-nginx"
    """IngressClass of this stack's controller; its own, so it cannot clash with another controller.
    Also the controller's Helm release name, and with `-controller` its Service name, hence at
    most 52 characters."""
    controller: ControllerConfig = ControllerConfig()
    """The controller release (or the existing controller)."""
    host: NonEmptyStr | None = None
    """Host name clients use, e.g. llm.example.com. Unset answers on any host: the installed
    controller (5.5+) is started with allowEmptyIngressHost; an existing one must allow it too."""
    path: Annotated[NonEmptyStr, AfterValidator(api_path)] = "/v1"
    """Path prefix routed to the (first) model: /v1 or below it. Only the OpenAI API is
    published; the engines' other routes (vLLM's /tokenize, /invocations, /metrics...) get
    NGINX's 404."""
    model_paths: dict[str, Annotated[str, AfterValidator(model_path)]] = {}
    """Path prefix of each other model, by served name, e.g. {coder: /coder/v1}: the controller
    cannot read the request body, so each model gets its own base URL, rewritten to /v1 on the
    way to its pods. Default /<name>/v1 (the model's Kubernetes name)."""
    tls_secret: DnsLabel | None = None
    """An existing Kubernetes TLS Secret (in the stack's namespace) for `host`."""
    cert_manager: CertManagerConfig = CertManagerConfig()
    """Get the certificate for `host` from cert-manager instead (components/policies/tls.py). With
    either, plain HTTP is redirected to HTTPS and the endpoint is https://."""

    @property
    def tls_on(self) -> bool:
        return self.tls_secret is not None or self.cert_manager.enabled


GATEWAY_NAME = "inference"
"""Name of the stack's Gateway; NGINX Gateway Fabric names its data-plane Service
`<Gateway>-<GatewayClass>` (at most 63 characters before it hashes the name)."""


def _gateway_class(value: str) -> str:
    longest = DNS_LABEL_MAX - len(GATEWAY_NAME) - 1
    if len(value) > longest:
        raise ValueError(
            f"must be at most {longest} characters: the data-plane Service is named "
            f"'{GATEWAY_NAME}-<className>', at most {DNS_LABEL_MAX}")
    return value


class GatewayControllerConfig(Section):
    install: bool = True
    """Install NGINX Gateway Fabric (Helm) and the Gateway API and Inference Extension CRDs;
    false uses ones that already run (with the inference extension on)."""
    namespace: DnsLabel = "nginx-gateway"
    """Namespace of NGINX Gateway Fabric's control plane (created when installing)."""
    chart_version: Literal[NGF_VERSION] = NGF_VERSION  # type: ignore[valid-type]
    """Version of the nginx-gateway-fabric chart (oci://ghcr.io/nginx/charts/nginx-gateway-fabric):
    only the version whose rules were checked (components/pins.py, tests/contracts)."""


class ModelRouterConfig(Section):
    replicas: int = Field(2, ge=1, le=100)
    """Router pods: the public entry point that reads each request's `model` field."""
    resources: ResourcesConfig = ResourcesConfig(
        requests=Resources(cpu="250m", memory="128Mi"), limits=Resources(memory="256Mi")
    )
    """CPU and memory per router pod."""
    service_annotations: dict[str, str] = {}
    """Cloud load-balancer annotations on the router's LoadBalancer Service."""
    source_ranges: tuple[Cidr, ...] = ()
    """Client CIDRs the router's LoadBalancer admits; empty admits every address."""


class EndpointPickerConfig(Section):
    replicas: int = Field(1, ge=1, le=10)
    """Endpoint-picker pods per model; more than one turns on leader election (only the leader
    is Ready)."""
    resources: ResourcesConfig | None = None
    """CPU and memory per endpoint-picker pod; unset keeps the chart's (requests 4 CPU, 8Gi)."""


class GatewayConfig(Section):
    enabled: bool = False
    """Serve through NGINX Gateway Fabric with the Gateway API Inference Extension: per model an
    InferencePool whose endpoint picker chooses a replica from its queue, KV-cache use and
    prefix cache, routed by the request's `model` field (docs/gateway.md). vLLM only."""
    class_name: Annotated[DnsLabel, AfterValidator(_gateway_class)] = "llm-nginx"
    """GatewayClass the controller installs and the stack's Gateway uses (also the controller's
    Helm release name)."""
    replicas: int = Field(2, ge=1, le=100)
    """NGINX data-plane pods of the Gateway (NGINX Gateway Fabric runs them)."""
    controller: GatewayControllerConfig = GatewayControllerConfig()
    """The NGINX Gateway Fabric release (or the existing one)."""
    router: ModelRouterConfig = ModelRouterConfig()
    """The model router in front of the Gateway: NGINX Gateway Fabric cannot read the request
    body, so the router copies its `model` field into the header the routes match on."""
    endpoint_picker: EndpointPickerConfig = EndpointPickerConfig()
    """Each model's endpoint picker (the inferencepool chart)."""
    host: NonEmptyStr | None = None
    """Host name clients use, e.g. llm.example.com (the certificate's name); the endpoint is then
    https://<host>/v1 rather than the router's address."""
    tls_secret: DnsLabel | None = None
    """An existing kubernetes.io/tls Secret (in the stack's namespace) the router serves HTTPS
    with; plain HTTP is then redirected."""


class NetworkPolicyConfig(Section):
    enabled: bool | None = None
    """Only the ingress controller (or, without it, the LoadBalancer path) reaches the model port,
    and the pods reach only DNS and (when they download weights) HTTPS. Unset: on, unless a
    Prometheus must scrape the pods and `monitoringNamespace` does not say from where."""
    monitoring_namespace: DnsLabel | None = None
    """Namespace whose pods may scrape metrics (they share the API port)."""
    restrict_egress: bool = True
    """Limit what the pods reach: DNS, the model hub over 443 when weights are downloaded (never
    link-local or cloud metadata addresses), nothing at all with baked weights."""
