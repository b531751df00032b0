"""The stack configuration model: parsed once, validated, frozen.

Every `llm-serving:*` key of a stack file maps to one field of `StackConfig`.
Defaults live here and nowhere else (mock tests never read Pulumi.yaml).
Errors name the stack key path, e.g. `llm-serving:model.maxOutputTokens`.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from typing import Annotated, Any, Literal, Mapping

import pulumi
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from components import affinity
from components.balancing import LoadBalancingConfig
from components.config_types import DnsLabel, NonEmptyStr
from components.engines import PROFILES, EngineLaunch, EngineName, EngineProfile
from components.pins import NIC_CHART_VERSION
from components.scaling import AutoscalingConfig
from components.sections import Section
from components.tls import CertManagerConfig

NAMESPACE = "llm-serving"
"""Pulumi config namespace (the project name)."""

SECRET_KEYS = ("apiKey", "hfToken")
"""Top-level keys that must be set with `pulumi config set --secret`."""

API_KEY_MIN_LENGTH = 32
"""Shortest operator-supplied `apiKey` accepted (generated keys have 48 characters)."""


class ConfigError(pulumi.RunError):
    """A stack configuration mistake. RunError: Pulumi prints it without a traceback."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            "invalid stack configuration:\n" + "\n".join(f"  - {p}" for p in problems)
        )


# --- field types with messages a user can act on ---------------------------------

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_CPU = re.compile(r"^(\d+(\.\d+)?|\d+m)$")
_MEMORY = re.compile(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")
_MEMORY_FACTORS = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
}


def _cpu(value: str) -> str:
    if not _CPU.match(value):
        raise ValueError("must be a Kubernetes CPU quantity such as '500m' or '2'")
    return value


def _memory(value: str) -> str:
    if not _MEMORY.match(value):
        raise ValueError("must be a Kubernetes memory quantity such as '512Mi' or '16Gi'")
    return value


def _labels(value: dict[str, str]) -> dict[str, str]:
    for key, val in value.items():
        if not _LABEL_KEY.match(key):
            raise ValueError(f"label key {key!r} is not a valid Kubernetes label key")
        if not _LABEL_VALUE.match(val):
            raise ValueError(
                f"label value {val!r} (key {key!r}) must be at most 63 characters of "
                "letters, digits, '-', '_' or '.', starting and ending alphanumeric"
            )
    return value


def _cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a CIDR range such as '203.0.113.0/24'") from None
    return value


def _api_path(value: str) -> str:
    if value != "/v1" and not value.startswith("/v1/"):
        raise ValueError("must be /v1 or a path below it: only the OpenAI API is published")
    return value


def cpu_cores(quantity: str) -> float:
    """'500m' -> 0.5, '2' -> 2.0."""
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def memory_bytes(quantity: str) -> float:
    """'16Gi' -> 17179869184.0."""
    match = re.match(r"^([\d.]+)(\D*)$", quantity)
    assert match, quantity  # guaranteed by _memory
    return float(match.group(1)) * _MEMORY_FACTORS[match.group(2)]


CpuQuantity = Annotated[str, AfterValidator(_cpu)]
MemoryQuantity = Annotated[str, AfterValidator(_memory)]
Labels = Annotated[dict[str, str], AfterValidator(_labels)]
Cidr = Annotated[str, AfterValidator(_cidr)]


# --- sections ---------------------------------------------------------------------


class ModelConfig(Section):
    id: NonEmptyStr
    """Hugging Face model id (org/name) or a path inside the image."""
    revision: NonEmptyStr = "main"
    """Hub revision: a branch, tag or commit; pin a commit in production."""
    served_name: NonEmptyStr | None = None
    """Name clients pass as `model`; defaults to `id`."""
    max_context_length: int = Field(4096, ge=16, le=1_048_576)
    """Prompt plus output tokens per request."""
    max_output_tokens: int = Field(512, ge=1, le=1_048_576)
    """Upper bound on `max_tokens` per request."""
    load_timeout_seconds: int = Field(900, ge=10, le=86_400)
    """Budget for downloading and loading the weights; the startup probe allows this long."""
    max_concurrency: int | None = Field(None, ge=1, le=4096)
    """Sequences one replica generates at once (server: LLM_MAX_CONCURRENCY, vLLM:
    --max-num-seqs); the engine's default when unset."""
    extra_args: tuple[str, ...] = ()
    """Extra engine command-line flags (vLLM), passed through verbatim."""

    @property
    def served(self) -> str:
        return self.served_name if self.served_name is not None else self.id


class ImageConfig(Section):
    build: bool = True
    """Build the engine's image from `context`; false runs `reference` instead."""
    reference: NonEmptyStr | None = None
    """Prebuilt image when `build` is false; defaults to the engine's official image."""
    context: NonEmptyStr = "server"
    """Build context, relative to the project directory."""
    dockerfile: NonEmptyStr | None = None
    """Dockerfile inside the context; defaults to the engine profile's."""
    registry: NonEmptyStr | None = None
    """Registry host and path prefix, e.g. ghcr.io/acme."""
    repository: NonEmptyStr = "llm-server"
    """Image repository under the registry."""
    tag: NonEmptyStr = "latest"
    """Tag to build; pods still run the pushed digest, so reusing a tag is safe."""
    platform: NonEmptyStr | None = None
    """Target platform, e.g. linux/amd64 (GPU nodes) when building on arm64."""
    push: bool = False
    """Push to the registry; false keeps the image in the local (minikube) daemon."""
    base_image: NonEmptyStr | None = None
    """Overrides the Dockerfile's BASE_IMAGE build argument."""

    @property
    def name(self) -> str:
        prefix = f"{self.registry.rstrip('/')}/" if self.registry else ""
        return f"{prefix}{self.repository}:{self.tag}"


class Resources(Section):
    cpu: CpuQuantity | None = None
    """CPU quantity, e.g. 500m or 4."""
    memory: MemoryQuantity | None = None
    """Memory quantity, e.g. 16Gi."""


class ResourcesConfig(Section):
    requests: Resources = Resources(cpu="1", memory="2Gi")
    """What the scheduler reserves per replica."""
    limits: Resources = Resources(memory="4Gi")
    """Hard caps per replica; no CPU limit by default (throttling hurts latency)."""


class Toleration(Section):
    key: NonEmptyStr | None = None
    """Taint key, e.g. nvidia.com/gpu."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Exists matches any value; Equal needs `value`."""
    value: str | None = None
    """Taint value for operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect; empty matches all effects."""
    toleration_seconds: int | None = Field(None, ge=0)
    """How long a NoExecute taint is tolerated."""


class GpuConfig(Section):
    count: int = Field(0, ge=0, le=16)
    """GPUs per replica (limits, and requests equal to them); 0 runs on CPU."""
    resource: Literal["nvidia.com/gpu", "amd.com/gpu"] = "nvidia.com/gpu"
    """Extended resource the vendor's device plugin advertises."""
    node_selector: dict[str, str] = {}
    """Node labels the pods require, e.g. nvidia.com/gpu.present: "true"."""
    tolerations: tuple[Toleration, ...] = ()
    """Taints of GPU node pools the pods may run on."""
    runtime_class_name: DnsLabel | None = None
    """RuntimeClass, e.g. nvidia where the GPU runtime is not the default."""
    shm_size: MemoryQuantity = "8Gi"
    """In-memory /dev/shm for the engine's worker processes (vLLM tensor parallel)."""


class ModelCacheConfig(Section):
    type: Literal["none", "pvc", "baked"] = "none"
    """none: download into a pod-local emptyDir at each start; pvc: a shared volume;
    baked: weights inside the image (requires image.build)."""
    size: MemoryQuantity = "20Gi"
    """Volume size (pvc) or emptyDir limit (none); fit the weights plus headroom."""
    storage_class: NonEmptyStr | None = None
    """StorageClass of the claim; the cluster default when unset."""
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"] = "ReadWriteOnce"
    """ReadWriteMany lets replicas on several nodes share one cache."""


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


class RolloutConfig(Section):
    drain_seconds: int = Field(60, ge=0, le=3600)
    """Time in-flight generations get to finish after SIGTERM."""
    pre_stop_seconds: int = Field(5, ge=0, le=300)
    """Pause before SIGTERM so endpoints and proxies stop sending new requests."""
    max_surge: int | None = Field(None, ge=0, le=100)
    """Extra pods a rollout starts before old ones stop; with 1 or more no ready replica is taken
    down. Default: 1 on CPU; 0 on GPUs, where a surge pod waits for a spare GPU that may not exist
    (set 1 when the cluster has one, or autoscales GPU nodes)."""
    accept_downtime: bool = False
    """Allow a rollout that takes the only ready replica down (one replica, no surge); refused
    otherwise, and warned about when allowed."""


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
    path: Annotated[NonEmptyStr, AfterValidator(_api_path)] = "/v1"
    """Path prefix routed to the model: /v1 or below it. Only the OpenAI API is published; the
    engines' other routes (vLLM's /tokenize, /invocations, /metrics...) get NGINX's 404."""
    tls_secret: DnsLabel | None = None
    """An existing Kubernetes TLS Secret (in the stack's namespace) for `host`."""
    cert_manager: CertManagerConfig = CertManagerConfig()
    """Get the certificate for `host` from cert-manager instead (components/tls.py). With
    either, plain HTTP is redirected to HTTPS and the endpoint is https://."""

    @property
    def tls_on(self) -> bool:
        return self.tls_secret is not None or self.cert_manager.enabled


class DisruptionBudgetConfig(Section):
    enabled: bool = True
    """A PodDisruptionBudget so node drains take model pods down one at a time."""
    max_unavailable: int = Field(1, ge=1)
    """Pods a voluntary disruption (drain, upgrade) may take down at once."""


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


class SloConfig(Section):
    ttft_p99_seconds: float = Field(2.0, gt=0, le=600)
    """Time-to-first-token objective: alert when the p99 stays above it."""
    refusal_ratio: float = Field(0.05, gt=0, le=1)
    """Alert when more than this fraction of requests is refused with 429 (engines that refuse)."""
    for_minutes: int = Field(5, ge=1, le=1440)
    """How long a condition must hold before its alert fires."""
    no_ready_for_minutes: int = Field(1, ge=1, le=1440)
    """How long the model may have no ready replica before that alert fires."""
    window_minutes: int = Field(5, ge=1, le=1440)
    """Range of the rate() windows behind request rates, percentiles and ratios."""


class MonitoringConfig(Section):
    service_monitor: bool = False
    """Create a ServiceMonitor (needs the Prometheus Operator's CRDs); with an installed ingress
    controller, also turn on and scrape the controller's metrics."""
    labels: Labels = {}
    """Labels your Prometheus selects ServiceMonitors and rules by, e.g. release: kube-prometheus-stack."""
    interval_seconds: int = Field(15, ge=1, le=3600)
    """Scrape interval."""
    rules: bool = False
    """Create a PrometheusRule: recording rules and SLO alerts (needs the Prometheus Operator's
    CRDs; the replica alerts read kube-state-metrics)."""
    dashboard: bool = False
    """Create a Grafana dashboard ConfigMap labelled for the kube-prometheus-stack sidecar."""
    dashboard_namespace: DnsLabel | None = None
    """Namespace of the dashboard ConfigMap (where the Grafana sidecar looks); unset: the stack's."""
    slo: SloConfig = SloConfig()
    """Alert thresholds; the queue-backlog alert uses autoscaling.targetWaitingPerReplica."""


class StackConfig(Section):
    engine: EngineName = "server"
    """server: this repository's CPU server image; vllm: the official vLLM image on GPUs."""
    model: ModelConfig
    """The model to serve."""
    image: ImageConfig = ImageConfig()
    """Which image the pods run, and how it is built."""
    replicas: int = Field(1, ge=0, le=1000)
    """Model-server pods."""
    resources: ResourcesConfig = ResourcesConfig()
    """CPU and memory per replica."""
    gpu: GpuConfig = GpuConfig()
    """GPUs per replica and where such pods may run."""
    model_cache: ModelCacheConfig = ModelCacheConfig()
    """Where the weights live between restarts."""
    service: ServiceConfig = ServiceConfig()
    """How clients reach the API."""
    rollout: RolloutConfig = RolloutConfig()
    """Draining: how a pod finishes its work when it is replaced."""
    load_balancing: LoadBalancingConfig = LoadBalancingConfig()
    """How NGINX spreads requests over replicas (ingress and local mode alike)."""
    ingress: IngressConfig = IngressConfig()
    """Optional NGINX ingress in front of the model."""
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    """Optional autoscaling on LLM signals."""
    disruption_budget: DisruptionBudgetConfig = DisruptionBudgetConfig()
    """Limits voluntary disruptions of the model pods."""
    network_policy: NetworkPolicyConfig = NetworkPolicyConfig()
    """Who may reach the model pods."""
    monitoring: MonitoringConfig = MonitoringConfig()
    """Prometheus Operator integration."""
    namespace: DnsLabel = "llm-serving"
    """Namespace the stack creates and deploys into."""
    labels: Labels = {}
    """Labels added to every object."""

    @property
    def profile(self) -> EngineProfile:
        return PROFILES[self.engine]

    @property
    def launch(self) -> EngineLaunch:
        """What the engine's command line and environment are built from."""
        model = self.model
        return EngineLaunch(
            model_id=model.id,
            revision=model.revision,
            served_name=model.served,
            max_context_length=model.max_context_length,
            max_output_tokens=model.max_output_tokens,
            max_concurrency=model.max_concurrency,
            extra_args=model.extra_args,
            drain_seconds=self.rollout.drain_seconds,
            gpu_count=self.gpu.count,
        )

    @property
    def service_type(self) -> str:
        if self.service.type is not None:
            return self.service.type
        return "ClusterIP" if self.ingress.enabled else "LoadBalancer"

    @property
    def scraped_by_prometheus(self) -> bool:
        """A Prometheus scrapes the pods: a ServiceMonitor, or KEDA's queue-depth query."""
        return self.monitoring.service_monitor or (
            self.autoscaling.enabled and self.profile.scale_signal == "queue")

    @property
    def network_policy_on(self) -> bool:
        """`networkPolicy.enabled`, or by default: on wherever it cannot cut the stack off."""
        if self.network_policy.enabled is not None:
            return self.network_policy.enabled
        return not (self.scraped_by_prometheus and self.network_policy.monitoring_namespace is None)

    @property
    def downloads_weights(self) -> bool:
        """The pods fetch weights from the hub at start (not baked into the image)."""
        return self.model_cache.type != "baked"

    @property
    def scale_down_window_seconds(self) -> int:
        window = self.autoscaling.scale_down_stabilization_seconds
        return self.model.load_timeout_seconds if window is None else window

    @property
    def rollout_max_surge(self) -> int:
        if self.rollout.max_surge is not None:
            return self.rollout.max_surge
        return 0 if self.gpu.count > 0 else 1

    @property
    def rollout_max_unavailable(self) -> int:
        """0 when surging (every ready replica keeps serving); else one pod at a time, as
        Kubernetes refuses maxSurge and maxUnavailable both 0."""
        return 0 if self.rollout_max_surge > 0 else 1

    @property
    def fewest_replicas(self) -> int:
        """Replicas the stack may be down to when a rollout starts."""
        return self.autoscaling.min_replicas if self.autoscaling.enabled else self.replicas

    @property
    def rollout_downtime(self) -> bool:
        """True when a rollout can take the ready replicas to zero."""
        fewest = self.fewest_replicas
        return fewest > 0 and fewest - self.rollout_max_unavailable < 1

    @property
    def startup_budget_seconds(self) -> int:
        return self.model.load_timeout_seconds

    @property
    def grace_period_seconds(self) -> int:
        """preStop pause + drain + a margin for the process to exit."""
        return self.rollout.pre_stop_seconds + self.rollout.drain_seconds + 10

    @property
    def progress_deadline_seconds(self) -> int:
        """Image pull (vLLM images are ~10 GB) plus the model load budget."""
        return max(600, self.model.load_timeout_seconds + 600)


class Secrets(BaseModel):
    """Secret stack values; Outputs so Pulumi keeps them encrypted end to end."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    api_key: pulumi.Output[str] | None = None
    hf_token: pulumi.Output[str] | None = None


# --- parsing ----------------------------------------------------------------------


def _decode(value: Any) -> Any:
    """Pulumi hands structured values over as JSON text; scalars stay text."""
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):  # nested too deep: left as text
            return value
    return value


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The camelCase keys allowed at the section that `loc` points into."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        field = next(
            (f for n, f in current.model_fields.items() if part in (n, f.alias)), None
        )
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        current = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)),
            None,
        )
        if current is None:
            # tuple[Toleration, ...] and similar: look one level deeper.
            for arg in args:
                inner = getattr(arg, "__args__", ())
                current = next(
                    (c for c in inner if isinstance(c, type) and issubclass(c, BaseModel)),
                    None,
                )
                if current:
                    break
    if not (isinstance(current, type) and issubclass(current, BaseModel)):
        return []
    return [f.alias or n for n, f in current.model_fields.items()]


def _key_path(loc: tuple[Any, ...]) -> str:
    path = f"{NAMESPACE}:"
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if i else "") + str(part)
    return path


def _describe(error: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(StackConfig, loc)
        if len(loc) == 1:
            allowed = sorted([*allowed, *SECRET_KEYS])
        return f"{_key_path(loc)}: unknown key; allowed keys here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{_key_path(loc)}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    return f"{_key_path(loc)}: {message} (got {error.get('input')!r})"


def _cross_check(cfg: StackConfig) -> list[str]:
    """Rules that span sections; each names the key to change."""
    problems = []
    profile = cfg.profile
    if cfg.gpu.count > 0 and not profile.uses_gpus:
        problems.append(
            f"{NAMESPACE}:gpu.count: engine '{cfg.engine}' runs on CPU only; "
            "set gpu.count to 0 or use engine 'vllm'"
        )
    if profile.uses_gpus and cfg.gpu.count == 0:
        problems.append(
            f"{NAMESPACE}:gpu.count: engine '{cfg.engine}' needs at least 1 GPU per replica"
        )
    if cfg.model_cache.type == "baked" and not cfg.image.build:
        problems.append(
            f"{NAMESPACE}:modelCache.type: 'baked' needs image.build: true "
            "(weights are baked at build time)"
        )
    if not cfg.image.build and cfg.image.reference is None and profile.prebuilt_image is None:
        problems.append(
            f"{NAMESPACE}:image.reference: engine '{cfg.engine}' has no published image; "
            "set image.reference or image.build: true"
        )
    if cfg.image.push and not cfg.image.build:
        problems.append(f"{NAMESPACE}:image.push: only a built image can be pushed")
    if cfg.model.max_output_tokens >= cfg.model.max_context_length:
        problems.append(
            f"{NAMESPACE}:model.maxOutputTokens: must be below model.maxContextLength "
            f"({cfg.model.max_context_length}) to leave room for the prompt"
        )
    for section in ("cpu", "memory"):
        request = getattr(cfg.resources.requests, section)
        limit = getattr(cfg.resources.limits, section)
        if request and limit:
            parse = cpu_cores if section == "cpu" else memory_bytes
            if parse(request) > parse(limit):
                problems.append(
                    f"{NAMESPACE}:resources.requests.{section}: {request} exceeds "
                    f"resources.limits.{section} ({limit})"
                )
    scaling = cfg.autoscaling
    if scaling.enabled:
        if scaling.max_replicas < scaling.min_replicas:
            problems.append(
                f"{NAMESPACE}:autoscaling.maxReplicas: must be at least autoscaling.minReplicas "
                f"({scaling.min_replicas})"
            )
        if cfg.scale_down_window_seconds < cfg.model.load_timeout_seconds:
            problems.append(
                f"{NAMESPACE}:autoscaling.scaleDownStabilizationSeconds: must be at least "
                f"model.loadTimeoutSeconds ({cfg.model.load_timeout_seconds}) so a loading pod "
                "is never scaled away"
            )
        scrape = cfg.monitoring.interval_seconds
        if 0 < scaling.running_average_seconds < 2 * scrape:
            problems.append(
                f"{NAMESPACE}:autoscaling.runningAverageSeconds: {scaling.running_average_seconds}"
                f" is under two scrape intervals (monitoring.intervalSeconds {scrape}), so the "
                f"average would often hold one sample; use 0 (the instant value) or at least "
                f"{2 * scrape}"
            )
        if profile.scale_signal == "queue" and scaling.prometheus_url is None:
            problems.append(
                f"{NAMESPACE}:autoscaling.prometheusUrl: required for engine '{cfg.engine}', "
                "which scales on queue depth read from Prometheus"
            )
        if profile.scale_signal == "cpu" and cfg.resources.requests.cpu is None:
            problems.append(
                f"{NAMESPACE}:resources.requests.cpu: CPU autoscaling measures utilisation "
                "against the request; set one"
            )
    if cfg.rollout_downtime and not cfg.rollout.accept_downtime:
        replicas_key = "autoscaling.minReplicas" if scaling.enabled else "replicas"
        problems.append(
            f"{NAMESPACE}:rollout.maxSurge: a rollout would take the only ready replica down "
            f"({replicas_key} {cfg.fewest_replicas}, rollout.maxSurge {cfg.rollout_max_surge}); "
            f"set {replicas_key} to 2 or more, rollout.maxSurge to 1 (needs room for one more "
            "pod, a spare GPU on GPU stacks), or rollout.acceptDowntime: true"
        )
    if cfg.ingress.tls_secret is not None and cfg.ingress.host is None:
        problems.append(f"{NAMESPACE}:ingress.tlsSecret: needs ingress.host (the certificate's name)")
    lb = cfg.load_balancing
    if lb.bounded and cfg.model.max_concurrency is None:
        problems.append(
            f"{NAMESPACE}:model.maxConcurrency: required with loadBalancing.method "
            "session_hash_bounded, whose bound is loadBalancing.boundFactor x the replica's slots"
        )
    if cfg.ingress.enabled and lb.session_key == "body" \
            and lb.method in ("session_hash", "session_hash_bounded"):
        problems.append(
            f"{NAMESPACE}:loadBalancing.sessionKey: 'body' cannot be expressed by the NGINX "
            "Ingress Controller (a key from the request body needs a snippet); with "
            "ingress.enabled use 'header' (the Ingress hashes loadBalancing.sessionHeader)"
        )
    if cfg.ingress.tls_secret is not None and cfg.ingress.cert_manager.enabled:
        problems.append(f"{NAMESPACE}:ingress.tlsSecret: set either ingress.tlsSecret (an "
                        "existing Secret) or ingress.certManager.enabled, not both")
    if cfg.ingress.cert_manager.enabled and cfg.ingress.host is None:
        problems.append(f"{NAMESPACE}:ingress.certManager.enabled: needs ingress.host (the "
                        "certificate's name)")
    if cfg.service.source_ranges and cfg.service_type != "LoadBalancer":
        hint = ("; the ingress controller is the entry point: set "
                "ingress.controller.sourceRanges instead") if cfg.ingress.enabled else ""
        problems.append(
            f"{NAMESPACE}:service.sourceRanges: only applies to service.type LoadBalancer{hint}"
        )
    for i, tol in enumerate(cfg.gpu.tolerations):
        where = f"{NAMESPACE}:gpu.tolerations[{i}]"
        if tol.operator == "Exists" and tol.value:
            problems.append(f"{where}.value: must be empty when operator is 'Exists'")
        if tol.operator == "Equal" and tol.key is None:
            problems.append(f"{where}.key: required when operator is 'Equal'")
        if tol.toleration_seconds is not None and tol.effect != "NoExecute":
            problems.append(
                f"{where}.tolerationSeconds: only allowed with effect 'NoExecute'"
            )
    return problems


def stack_warnings(cfg: StackConfig) -> list[str]:
    """Settings that are allowed but that an operator should see at every preview."""
    warnings = []
    if cfg.rollout_downtime:  # only reachable with rollout.acceptDowntime
        warnings.append(
            f"{NAMESPACE}:rollout.acceptDowntime: every rollout takes the only ready replica down "
            f"for the preStop pause and a full model load (up to model.loadTimeoutSeconds = "
            f"{cfg.model.load_timeout_seconds} s); requests fail meanwhile"
        )
    ingress = cfg.ingress
    if ingress.enabled and cfg.load_balancing.bounded:
        warnings += [f"{NAMESPACE}:{gap}" for gap in affinity.cluster_gaps(cfg.load_balancing)
                     if gap.startswith("loadBalancing.method")]
    if ingress.enabled and not ingress.tls_on:
        warnings.append(
            f"{NAMESPACE}:ingress: no TLS; the API key crosses the network in clear. Set "
            "ingress.host with ingress.certManager.enabled or ingress.tlsSecret"
        )
    if ingress.enabled and not ingress.controller.install and ingress.host is None:
        warnings.append(
            f"{NAMESPACE}:ingress.host: unset with an existing controller; NGINX Ingress "
            "Controller rejects host-less Ingresses unless it runs 5.5+ with "
            "-allow-empty-ingress-host (chart value controller.allowEmptyIngressHost); "
            "set ingress.host otherwise"
        )
    return warnings


def parse_stack_config(raw: Mapping[str, Any]) -> StackConfig:
    """Validate the non-secret `llm-serving:*` values (keys without the namespace).

    Raises ConfigError listing every problem, each naming its key.
    """
    data = {key: _decode(value) for key, value in raw.items() if key not in SECRET_KEYS}
    try:
        cfg = StackConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError([_describe(e) for e in err.errors()]) from None
    problems = _cross_check(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def _namespace_keys() -> dict[str, Any]:
    """Every `llm-serving:*` config value the engine handed to this program."""
    values = {**pulumi.runtime.config.get_config_env(), **pulumi.runtime.config.CONFIG.get()}
    prefix = f"{NAMESPACE}:"
    return {k.removeprefix(prefix): v for k, v in values.items() if k.startswith(prefix)}


def _is_secret(full_key: str) -> bool:
    # The engine reports secret keys either through the runtime or, for some
    # language-host versions, through PULUMI_CONFIG_SECRET_KEYS only.
    runtime_config = pulumi.runtime.config
    return runtime_config.is_config_secret(full_key) or (
        full_key in runtime_config.get_config_secret_keys_env()
    )


def _api_key_problems(key: Any) -> list[str]:
    """A guessable key is no key: refuse short ones (the message never shows the value)."""
    if key is None:
        return []
    length = len(str(key).strip())
    if length >= API_KEY_MIN_LENGTH:
        return []
    return [
        f"{NAMESPACE}:apiKey: must be at least {API_KEY_MIN_LENGTH} characters (got {length}); "
        "generate one with `openssl rand -hex 32`, or unset apiKey to have one generated"
    ]


def load_stack_config() -> tuple[StackConfig, Secrets]:
    """Read and validate this stack's configuration, once, from Pulumi."""
    raw = _namespace_keys()
    problems = [
        f"{NAMESPACE}:{key}: holds a secret; set it with "
        f"`pulumi config set --secret {key} ...`"
        for key in SECRET_KEYS
        if key in raw and not _is_secret(f"{NAMESPACE}:{key}")
    ]
    problems.extend(_api_key_problems(raw.get("apiKey")))
    try:
        cfg = parse_stack_config(raw)
    except ConfigError as err:
        problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    config = pulumi.Config(NAMESPACE)
    return cfg, Secrets(
        api_key=config.get_secret("apiKey"), hf_token=config.get_secret("hfToken")
    )


def ceil_div(total: int, step: int) -> int:
    return math.ceil(total / step)
