"""The stack configuration model: parsed once, validated, frozen.

Every `llm-serving:*` key of a stack file maps to one field of `StackConfig`.
Defaults live here and nowhere else (mock tests never read Pulumi.yaml).
Errors name the stack key path, e.g. `llm-serving:model.maxOutputTokens`.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import pulumi
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from components.balancing import LoadBalancingConfig
from components.config_rules import cross_check, stack_warnings
from components.config_types import NAMESPACE, DnsLabel, Labels
from components.engines import PROFILES, EngineLaunch, EngineName, EngineProfile
from components.exposure_config import IngressConfig, NetworkPolicyConfig, ServiceConfig
from components.monitoring_config import MonitoringConfig
from components.scaling import AutoscalingConfig
from components.sections import Section
from components.workload_config import (
    DisruptionBudgetConfig,
    GpuConfig,
    ImageConfig,
    ModelCacheConfig,
    ModelConfig,
    ResourcesConfig,
    RolloutConfig,
)

__all__ = ["NAMESPACE", "SECRET_KEYS", "ConfigError", "Secrets", "StackConfig",
           "load_stack_config", "parse_stack_config", "stack_warnings"]

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


# --- the whole stack -------------------------------------------------------------


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


def parse_stack_config(raw: Mapping[str, Any]) -> StackConfig:
    """Validate the non-secret `llm-serving:*` values (keys without the namespace).

    Raises ConfigError listing every problem, each naming its key.
    """
    data = {key: _decode(value) for key, value in raw.items() if key not in SECRET_KEYS}
    try:
        cfg = StackConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError([_describe(e) for e in err.errors()]) from None
    problems = cross_check(cfg)
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
