"""Engine profiles: what differs between the serving engines, in one table.

Components never branch on an engine's name; they read its profile. Adding an
engine means adding a row here, not touching the Deployment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from components.pins import VLLM_IMAGE

EngineName = Literal["server", "vllm"]

SERVER_KEEPALIVE_SECONDS = 75
"""Idle keep-alive of the engines' HTTP servers (both run uvicorn, default 5 s).
The NGINX Ingress Controller keeps idle upstream connections for nginx's 60 s
and exposes no setting for it; a server that closes first makes the proxy
reuse a dead connection. So the servers wait longer than the proxy."""


MODEL_LABEL = "model_name"
"""Label that carries the served model name on an engine's series: vLLM's own
(tests/contracts/data/vllm-0.33.0.metrics.json, `labels`). For an engine that sets none, the
ServiceMonitor of a stack with several models adds it, so rules, dashboards and autoscaling
queries tell the models apart the same way on every engine."""


@dataclass(frozen=True)
class EngineLaunch:
    """The part of a stack's configuration an engine's command line and environment are built
    from (`StackConfig.launch`); engines know nothing else of the stack."""

    model_id: str
    revision: str
    served_name: str
    max_context_length: int
    max_output_tokens: int
    max_concurrency: int | None
    extra_args: tuple[str, ...]
    drain_seconds: int
    gpu_count: int


@dataclass(frozen=True)
class MetricRef:
    """One series family: a metric name and the label values that narrow it."""

    name: str
    match: tuple[tuple[str, str], ...] = ()

    def selector(self, extra: dict[str, str] | None = None) -> str:
        """PromQL selector, e.g. `llm_requests_rejected_total{reason="overload",namespace="x"}`."""
        pairs = list(self.match) + sorted((extra or {}).items())
        inner = ",".join(f'{k}="{v}"' for k, v in pairs)
        return f"{self.name}{{{inner}}}" if inner else self.name


@dataclass(frozen=True)
class EngineProfile:
    name: EngineName
    prebuilt_image: str | None
    """Image to run when the stack does not build one (None: must be built)."""
    dockerfile: str
    """Dockerfile, relative to the build context, that builds this engine's image."""
    port: int
    health_path: str
    """Answers while the process is alive (liveness)."""
    ready_path: str
    """Answers 200 only once the model serves requests (readiness, startup)."""
    ready_path_needs_auth: bool
    """True when ready_path sits behind the API key, so an HTTP probe cannot call it."""
    metrics_path: str
    uses_gpus: bool
    """The image is built for GPUs; False means it runs on CPU only."""
    drains_on_sigterm: bool
    """False: the preStop pause must also cover the drain time."""
    api_key_env: str
    running_metric: str
    """Prometheus gauge of sequences being generated (autoscaling signal)."""
    waiting_metric: str
    """Prometheus gauge of queued requests (autoscaling signal)."""
    ttft_histogram: str
    """Histogram of seconds from arrival to the first token (`_bucket`/`_count` series)."""
    e2e_histogram: str
    """Histogram of seconds from arrival to the last token; its `_count` counts finished requests."""
    itl_histogram: str | None
    """Histogram of seconds between output tokens; None when the engine exports none."""
    kv_cache_metric: str | None
    """Gauge of the KV-cache fraction in use (0..1); None when the engine has no KV cache pool."""
    refused: MetricRef | None
    """Counter of requests refused with 429 for overload; None when the engine queues instead."""
    unavailable: MetricRef | None
    """Counter of requests answered 503 (draining); None when the engine does not count them."""
    labels_model: bool
    """True when every series carries MODEL_LABEL (the served name) from the engine itself."""
    scale_signal: Literal["cpu", "queue"]
    """What autoscaling follows: CPU (HPA) or the engine's queue metrics (KEDA)."""
    command: tuple[str, ...] | None
    """Container command; None keeps the image's own."""
    args: Callable[[EngineLaunch], list[str]]
    """Container arguments for a stack."""
    env: Callable[[EngineLaunch], dict[str, str]]
    """Plain (non-secret) environment for a stack."""


def _server_env(launch: EngineLaunch) -> dict[str, str]:
    # The names are the server's settings contract (server/README.md).
    env = {
        "LLM_ENGINE": "transformers",
        "LLM_MODEL": launch.model_id,
        "LLM_MODEL_REVISION": launch.revision,
        "LLM_SERVED_MODEL_NAME": launch.served_name,
        "LLM_MAX_MODEL_LEN": str(launch.max_context_length),
        "LLM_MAX_TOKENS": str(launch.max_output_tokens),
        "LLM_DRAIN_SECONDS": str(launch.drain_seconds),
        # uvicorn reads its CLI options from UVICORN_* variables.
        "UVICORN_TIMEOUT_KEEP_ALIVE": str(SERVER_KEEPALIVE_SECONDS),
    }
    if launch.max_concurrency is not None:
        env["LLM_MAX_CONCURRENCY"] = str(launch.max_concurrency)
    return env


def _vllm_args(launch: EngineLaunch) -> list[str]:
    args = [
        launch.model_id,
        "--revision", launch.revision,
        "--served-model-name", launch.served_name,
        "--max-model-len", str(launch.max_context_length),
        "--tensor-parallel-size", str(max(launch.gpu_count, 1)),
        "--port", "8000",
    ]
    if launch.max_concurrency is not None:
        args += ["--max-num-seqs", str(launch.max_concurrency)]
    return args + list(launch.extra_args)


def _vllm_env(launch: EngineLaunch) -> dict[str, str]:
    # vLLM exposes no per-request output cap flag; the ingress policy bounds
    # generation time instead. Usage stats would try to phone home.
    return {
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": str(SERVER_KEEPALIVE_SECONDS),
    }


PROFILES: dict[str, EngineProfile] = {
    # This repository's OpenAI-compatible server (server/): CPU stacks, local mode.
    "server": EngineProfile(
        name="server",
        prebuilt_image=None,
        dockerfile="Dockerfile",
        port=8000,
        health_path="/health",
        ready_path="/ready",
        ready_path_needs_auth=False,
        metrics_path="/metrics",
        uses_gpus=False,
        drains_on_sigterm=True,
        api_key_env="LLM_API_KEY",
        running_metric="llm_requests_running",
        waiting_metric="llm_requests_waiting",
        # server/metrics.py; prometheus_client adds `_total` to counters.
        ttft_histogram="llm_time_to_first_token_seconds",
        e2e_histogram="llm_e2e_request_latency_seconds",
        itl_histogram=None,
        kv_cache_metric=None,
        refused=MetricRef("llm_requests_rejected_total", (("reason", "overload"),)),
        unavailable=MetricRef("llm_requests_rejected_total", (("reason", "draining"),)),
        labels_model=False,
        # On CPU nodes generation is CPU-bound, so utilisation tracks load.
        scale_signal="cpu",
        command=None,
        args=lambda launch: [],
        env=_server_env,
    ),
    # The official vLLM OpenAI server: GPU stacks. Its /health answers before the
    # model serves, so readiness asks /v1/models, which needs the API key.
    "vllm": EngineProfile(
        name="vllm",
        prebuilt_image=VLLM_IMAGE,
        dockerfile="Dockerfile.vllm",
        port=8000,
        health_path="/health",
        ready_path="/v1/models",
        ready_path_needs_auth=True,
        metrics_path="/metrics",
        uses_gpus=True,
        drains_on_sigterm=False,
        api_key_env="VLLM_API_KEY",
        running_metric="vllm:num_requests_running",
        waiting_metric="vllm:num_requests_waiting",
        # tests/contracts/data/vllm-0.33.0.metrics.json lists these with their source.
        ttft_histogram="vllm:time_to_first_token_seconds",
        e2e_histogram="vllm:e2e_request_latency_seconds",
        itl_histogram="vllm:inter_token_latency_seconds",
        kv_cache_metric="vllm:kv_cache_usage_perc",
        # vLLM queues requests beyond --max-num-seqs rather than refusing them,
        # and counts no HTTP status codes of its own.
        refused=None,
        unavailable=None,
        labels_model=True,
        # GPU utilisation says little about queueing; waiting requests do.
        scale_signal="queue",
        command=("vllm", "serve"),
        args=_vllm_args,
        env=_vllm_env,
    ),
}
