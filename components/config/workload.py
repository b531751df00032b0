"""Stack configuration sections of the model workload: the model (or several, each with its
own replicas, GPUs, resources and autoscaling bounds), its image, resources, GPUs, weight cache,
rollout and disruption budget (assembled in components/config/stack.py)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field

from components.config.sections import Section
from components.config.types import CpuQuantity, DnsLabel, MemoryQuantity, NonEmptyStr

MODEL_NAME_MAX = 24
"""Longest Kubernetes name of a model: it goes into the names of the model's objects (e.g.
`llm-autoscaler-<name>-scaledobject-<suffix>`, which KEDA copies into a label value, at most 63
characters)."""

_MODEL_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_NAME_SEPARATORS = re.compile(r"[./_]")


def kube_name_problem(name: str) -> str | None:
    """Why `name` cannot name a model's Kubernetes objects, or None when it can."""
    if not _MODEL_NAME.match(name):
        return ("lower-case letters, digits and '-', starting and ending with a letter or digit, "
                "are allowed")
    if len(name) > MODEL_NAME_MAX:
        return (f"at most {MODEL_NAME_MAX} characters are allowed (it prefixes the model's "
                "object names, which Kubernetes caps at 63)")
    return None


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
    --max-num-seqs); the engine's default when unset. Prod sets 128: in the GPU regime
    (h200-llama8b, modelled, docs/autoscaling.md "Which regime are you in") 256 kept the same
    share of requests within the TTFT objective (+0.1 ± 0.0 points) at no lower cost
    (+2.0 ± 18.2 points of static max's replica-seconds) with a TPOT p99 of 32 ms against 19 ms."""
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


class DisruptionBudgetConfig(Section):
    enabled: bool = True
    """A PodDisruptionBudget so node drains take model pods down one at a time."""
    max_unavailable: int = Field(1, ge=1)
    """Pods a voluntary disruption (drain, upgrade) may take down at once."""


# --- several models per stack -----------------------------------------------------------------


class ModelGpuConfig(Section):
    count: int = Field(ge=0, le=16)
    """GPUs per replica of this model; the rest of the `gpu` section (vendor, node selector,
    tolerations) is the stack's."""


class ModelAutoscalingConfig(Section):
    min_replicas: int | None = Field(None, ge=1, le=1000)
    """Fewest replicas of this model; default autoscaling.minReplicas."""
    max_replicas: int | None = Field(None, ge=1, le=1000)
    """Most replicas of this model; default autoscaling.maxReplicas."""
    target_running_per_replica: int | None = Field(None, ge=1)
    """Sequences in generation per replica before one is added; about 75 % of this model's
    maxConcurrency. Default autoscaling.targetRunningPerReplica."""


class ModelEntry(ModelConfig):
    """One model of `models`: the `model` keys, plus what may differ between models."""

    name: DnsLabel | None = None
    """Kubernetes name of the model's objects and its Ingress path; default: servedName
    lower-cased, with '.', '/' and '_' turned into '-' (at most 24 characters)."""
    replicas: int | None = Field(None, ge=0, le=1000)
    """Pods of this model; default the stack's `replicas`."""
    gpu: ModelGpuConfig | None = None
    """GPUs per replica of this model; default gpu.count."""
    resources: ResourcesConfig | None = None
    """CPU and memory per replica of this model; default the stack's `resources`."""
    autoscaling: ModelAutoscalingConfig | None = None
    """This model's replica bounds (autoscaling.enabled is the stack's)."""

    @property
    def kube_name(self) -> str:
        """The name its objects carry: `name`, or the served name made a Kubernetes name."""
        if self.name is not None:
            return self.name
        return _NAME_SEPARATORS.sub("-", self.served.lower())

    @classmethod
    def of(cls, model: ModelConfig) -> ModelEntry:
        """The entry a single `model` section stands for (no overrides)."""
        if isinstance(model, ModelEntry):
            return model
        return cls.model_validate(model.model_dump())
