"""The stack configuration model: every `llm-serving:*` key of a stack file maps to one field
of `StackConfig`. Defaults live here and in the sections, nowhere else (mock tests never read
Pulumi.yaml). Parsing, with errors that name the stack key path (for example
`llm-serving:model.maxOutputTokens`), is components/config/parse.py; rules that span
sections are components/config/rules.py.
"""

from __future__ import annotations

from pydantic import Field, PrivateAttr, model_validator

from components.config.exposure import (
    GatewayConfig,
    IngressConfig,
    NetworkPolicyConfig,
    ServiceConfig,
)
from components.config.monitoring import MonitoringConfig
from components.config.sections import Section
from components.config.types import DnsLabel, Labels
from components.config.workload import (
    DisruptionBudgetConfig,
    GpuConfig,
    ImageConfig,
    ModelCacheConfig,
    ModelAutoscalingConfig,
    ModelConfig,
    ModelEntry,
    ResourcesConfig,
    RolloutConfig,
)
from components.engines import PROFILES, EngineLaunch, EngineName, EngineProfile
from components.policies.balancing import LoadBalancingConfig
from components.policies.scaling import AutoscalingConfig

__all__ = ["StackConfig"]


# --- the whole stack -------------------------------------------------------------


class StackConfig(Section):
    engine: EngineName = "server"
    """server: this repository's CPU server image; vllm: the official vLLM image on GPUs."""
    single_model: ModelConfig | None = Field(None, alias="model")
    """The model to serve (required unless `models` is set)."""
    model_list: tuple[ModelEntry, ...] | None = Field(None, alias="models", min_length=1,
                                                      max_length=16)
    """Several models behind one endpoint, instead of `model`: each entry takes the `model` keys
    plus its own replicas, GPU count, resources and autoscaling bounds. The first keeps the
    object names (and, on the Ingress path, `ingress.path`) a single-model stack has."""
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
    gateway: GatewayConfig = GatewayConfig()
    """Optional Gateway API inference path in front of the models (instead of `ingress`)."""
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

    _model_index: int | None = PrivateAttr(None)
    """Set on a per-model view (`for_model`): which entry of `models` it is."""
    _model_count: int | None = PrivateAttr(None)
    _model_key: str = PrivateAttr("model")
    _overrides: frozenset[str] = PrivateAttr(frozenset())

    @model_validator(mode="after")
    def _one_model_section(self) -> StackConfig:
        if self.single_model is not None and self.model_list is not None:
            raise ValueError("model, models: set either model (one model) or models (a list), "
                             "not both")
        if self.single_model is None and self.model_list is None:
            raise ValueError("model: required key is missing (or set models, a list of models)")
        return self

    # --- the models -----------------------------------------------------------------------

    @property
    def models(self) -> tuple[ModelEntry, ...]:
        """Every model the stack serves, in order; a `model` section is a list of one."""
        if self.model_list is not None:
            return self.model_list
        assert self.single_model is not None  # _one_model_section
        return (ModelEntry.of(self.single_model),)

    @property
    def model(self) -> ModelConfig:
        """The first model (the only one on a single-model stack, or on a per-model view)."""
        if self.single_model is not None:
            return self.single_model
        assert self.model_list is not None
        return self.model_list[0]

    @property
    def model_count(self) -> int:
        """Models of the stack (a per-model view remembers its stack's)."""
        return self._model_count if self._model_count is not None else len(self.models)

    @property
    def model_index(self) -> int:
        """Position of this view's model in `models` (0 on a stack)."""
        return self._model_index or 0

    @property
    def scoped_by_model(self) -> bool:
        """A per-model view of a stack with several models: its metrics queries must select its
        own model's series (engines.MODEL_LABEL), as the models share the namespace."""
        return self._model_index is not None and self.model_count > 1

    @property
    def kube_name(self) -> str:
        """The Kubernetes name of this view's model (`models[i].name` or derived)."""
        return ModelEntry.of(self.model).kube_name

    def for_model(self, index: int) -> StackConfig:
        """The stack as one of its models sees it: that model as `model`, and its own replicas,
        GPU count, resources and autoscaling bounds in place of the stack's. Every per-model
        object is built from such a view; `key()` names the stack key a value came from."""
        entry = self.models[index]
        update: dict[str, object] = {"single_model": entry, "model_list": None}
        overrides = set()
        if entry.replicas is not None:
            update["replicas"] = entry.replicas
            overrides.add("replicas")
        if entry.gpu is not None:
            update["gpu"] = self.gpu.model_copy(update={"count": entry.gpu.count})
            overrides.add("gpu.count")
        if entry.resources is not None:
            update["resources"] = entry.resources
            overrides.add("resources")
        if entry.autoscaling is not None:
            bounds = entry.autoscaling.model_dump(exclude_none=True)
            update["autoscaling"] = self.autoscaling.model_copy(update=bounds)
            overrides |= {f"autoscaling.{ModelAutoscalingConfig.model_fields[k].alias or k}"
                          for k in bounds}
        view = self.model_copy(update=update)
        view._model_index = index
        view._model_count = len(self.models)
        view._model_key = "model" if self.model_list is None else f"models[{index}]"
        view._overrides = frozenset(overrides)
        return view

    def model_views(self) -> tuple[StackConfig, ...]:
        """`for_model` of every model, in order."""
        return tuple(self.for_model(i) for i in range(len(self.models)))

    def key(self, path: str) -> str:
        """The stack key a setting of this configuration is read from: on a per-model view of a
        `models` stack, `model.maxOutputTokens` is `models[1].maxOutputTokens`, and `replicas`
        is `models[1].replicas` where that model overrides it."""
        if path == "model" or path.startswith("model."):
            return self._model_key + path[len("model"):]
        for overridden in self._overrides:
            if path == overridden or path.startswith(overridden + "."):
                return f"{self._model_key}.{path}"
        return path

    def ingress_path(self, index: int) -> str:
        """The Ingress path prefix of model `index`: `ingress.path` for the first; for the
        others `ingress.modelPaths[<served name>]`, default /<kube name>/v1."""
        if index == 0:
            return self.ingress.path
        entry = self.models[index]
        return self.ingress.model_paths.get(entry.served, f"/{entry.kube_name}/v1")

    # --- derived values ---------------------------------------------------------------------

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
    def routed(self) -> bool:
        """A router is the entry point (the Ingress or the Gateway), not the model Service."""
        return self.ingress.enabled or self.gateway.enabled

    @property
    def service_type(self) -> str:
        if self.service.type is not None:
            return self.service.type
        return "ClusterIP" if self.routed else "LoadBalancer"

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
