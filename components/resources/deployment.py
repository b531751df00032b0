"""LlmDeployment: the model-server pods, shaped for slow loads, GPUs and clean rollouts."""

from __future__ import annotations

import math
from typing import Any, Mapping, NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.config.stack import StackConfig
from components.resources.api_key import SECRET_KEY as API_KEY_SECRET_KEY

HF_TOKEN_SECRET_KEY = "token"
"""Key of the Hugging Face token inside its Secret."""

RUN_AS_USER = 10001
"""Non-root uid; matches the user the server Dockerfile creates."""

MODEL_DIR = "/models"
HOME_DIR = "/home/llm"
RUN_AS_USER_NAME = "llm"
"""The server image's user of uid RUN_AS_USER; for vLLM only a name (no passwd entry)."""

STARTUP_PERIOD_SECONDS = 10
READY_PERIOD_SECONDS = 5
LIVENESS_PERIOD_SECONDS = 10
LIVENESS_FAILURES = 6
"""A busy engine can stall its event loop; a minute of silence, not one miss, means dead."""


class LlmDeploymentArgs(TypedDict):
    config: StackConfig
    """The validated stack configuration: engine, model, resources, GPUs, cache, rollout."""
    namespace: pulumi.Input[str]
    image: pulumi.Input[str]
    """Image reference; a digest, so a rebuild rolls the pods."""
    image_content_id: NotRequired[pulumi.Input[str]]
    """Changes with the image content; rolls pods when `image` is a reused tag."""
    api_key_secret: pulumi.Input[str]
    """Secret holding the API key under `api-key`."""
    hf_token_secret: NotRequired[pulumi.Input[str] | None]
    """Secret holding the Hugging Face token under `token`, for gated models."""
    labels: NotRequired[Mapping[str, str]]
    """Labels on every object; the selector uses only the two stable ones."""


def selector_labels(name: str) -> dict[str, str]:
    """Stable labels that select the pods; never change them on a live stack."""
    return {"app.kubernetes.io/name": "llm-server", "app.kubernetes.io/instance": name}


def startup_failure_threshold(load_timeout_seconds: int) -> int:
    """Probe failures the startup probe tolerates so that loading may take the full budget."""
    return math.ceil(load_timeout_seconds / STARTUP_PERIOD_SECONDS)


def _custom_timeout(seconds: int) -> str:
    return f"{math.ceil(seconds / 60)}m"


class LlmDeployment(pulumi.ComponentResource):
    deployment_name: pulumi.Output[str]
    selector: dict[str, str]
    """Labels a Service or policy uses to select these pods."""
    port: int
    """Container port of the OpenAI-compatible API, named `http`."""

    def __init__(
        self, name: str, args: LlmDeploymentArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("llm-serving:index:LlmDeployment", name, None, opts)
        cfg = args["config"]
        self._cfg = cfg
        self._profile = cfg.profile
        self.selector = selector_labels(name)
        self.port = self._profile.port
        labels = {
            **dict(args.get("labels", {})),
            **self.selector,
            "app.kubernetes.io/component": "inference",
            "llm-serving/engine": cfg.engine,
        }

        cache_claim = self._create_cache_claim(name, args, labels)
        pod_annotations: dict[str, Any] = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(self.port),
            "prometheus.io/path": self._profile.metrics_path,
        }
        if "image_content_id" in args:
            pod_annotations["llm-serving/image-content-id"] = args["image_content_id"]

        autoscaled = cfg.autoscaling.enabled
        deployment = k8s.apps.v1.Deployment(
            f"{name}-deploy",
            metadata={"namespace": args["namespace"], "labels": labels},
            spec={
                "replicas": cfg.autoscaling.min_replicas if autoscaled else cfg.replicas,
                "selector": {"match_labels": self.selector},
                "revision_history_limit": 5,
                "progress_deadline_seconds": cfg.progress_deadline_seconds,
                # GPUs are scarce: unless the stack says a spare one exists, a surge pod
                # would sit Pending, so replace in place; the config parser refuses that
                # with a single replica unless the stack accepts the downtime.
                "strategy": {
                    "type": "RollingUpdate",
                    "rolling_update": {
                        "max_surge": cfg.rollout_max_surge,
                        "max_unavailable": cfg.rollout_max_unavailable,
                    },
                },
                "template": {
                    "metadata": {"labels": labels, "annotations": pod_annotations},
                    "spec": self._pod_spec(args, cache_claim),
                },
            },
            opts=pulumi.ResourceOptions(
                parent=self,
                # The autoscaler owns the replica count; `pulumi up` must not reset it.
                ignore_changes=["spec.replicas"] if autoscaled else None,
                # Pulumi waits for the rollout; give it the same budget Kubernetes has.
                custom_timeouts=pulumi.CustomTimeouts(
                    create=_custom_timeout(cfg.progress_deadline_seconds + 60),
                    update=_custom_timeout(cfg.progress_deadline_seconds + 60),
                ),
            ),
        )
        self.deployment_name = deployment.metadata.name
        self.register_outputs({"deployment_name": self.deployment_name})

    # --- pieces ---------------------------------------------------------------------

    def _create_cache_claim(
        self, name: str, args: LlmDeploymentArgs, labels: Mapping[str, str]
    ) -> k8s.core.v1.PersistentVolumeClaim | None:
        cache = self._cfg.model_cache
        if cache.type != "pvc":
            return None
        if cache.access_mode != "ReadWriteMany" and self._cfg.replicas > 1:
            pulumi.log.warn(
                f"modelCache.accessMode {cache.access_mode} with {self._cfg.replicas} replicas: "
                "only pods on one node (e.g. minikube) can share the volume; "
                "use ReadWriteMany on a multi-node cluster",
                resource=self,
            )
        spec: dict[str, Any] = {
            "access_modes": [cache.access_mode],
            "resources": {"requests": {"storage": cache.size}},
        }
        if cache.storage_class:
            spec["storage_class_name"] = cache.storage_class
        return k8s.core.v1.PersistentVolumeClaim(
            f"{name}-model-cache",
            metadata={
                "namespace": args["namespace"],
                "labels": dict(labels),
                # WaitForFirstConsumer classes keep the claim Pending until a pod
                # mounts it; waiting for Bound would deadlock against the Deployment.
                "annotations": {"pulumi.com/skipAwait": "true"},
            },
            spec=spec,
            opts=pulumi.ResourceOptions(parent=self),
        )

    def _pod_spec(
        self, args: LlmDeploymentArgs, cache_claim: k8s.core.v1.PersistentVolumeClaim | None
    ) -> dict[str, Any]:
        cfg, profile = self._cfg, self._profile
        volumes, mounts = self._volumes(cache_claim)
        container: dict[str, Any] = {
            "name": "llm",
            "image": args["image"],
            "image_pull_policy": "IfNotPresent",
            "ports": [{"name": "http", "container_port": profile.port, "protocol": "TCP"}],
            "env": self._env(args),
            "resources": self._resources(),
            "volume_mounts": mounts,
            "startup_probe": {
                **self._ready_check(),
                "period_seconds": STARTUP_PERIOD_SECONDS,
                "failure_threshold": startup_failure_threshold(cfg.startup_budget_seconds),
                "timeout_seconds": 5,
            },
            "readiness_probe": {
                **self._ready_check(),
                "period_seconds": READY_PERIOD_SECONDS,
                "failure_threshold": 2,
                "timeout_seconds": 5,
            },
            # Starts only once the startup probe passed, so it cannot kill a loading pod.
            "liveness_probe": {
                "http_get": {"path": profile.health_path, "port": "http"},
                "period_seconds": LIVENESS_PERIOD_SECONDS,
                "failure_threshold": LIVENESS_FAILURES,
                "timeout_seconds": 5,
            },
            "security_context": {
                "allow_privilege_escalation": False,
                "capabilities": {"drop": ["ALL"]},
                "read_only_root_filesystem": True,
                "run_as_non_root": True,
            },
        }
        if profile.command is not None:
            container["command"] = list(profile.command)
        if engine_args := profile.args(cfg.launch):
            container["args"] = engine_args
        pause = self._pre_stop_seconds()
        if pause > 0:
            # Endpoints and proxies take a few seconds to forget a terminating pod;
            # keep serving meanwhile. An engine that does not drain on SIGTERM
            # gets the whole drain time here instead.
            container["lifecycle"] = {"pre_stop": {"sleep": {"seconds": pause}}}

        spec: dict[str, Any] = {
            "containers": [container],
            "volumes": volumes,
            "termination_grace_period_seconds": cfg.grace_period_seconds,
            # A Service named like the engine would inject e.g. VLLM_PORT=tcp://...,
            # which vLLM reads as its own setting.
            "enable_service_links": False,
            "automount_service_account_token": False,
            "security_context": {
                "run_as_non_root": True,
                "run_as_user": RUN_AS_USER,
                "run_as_group": RUN_AS_USER,
                "fs_group": RUN_AS_USER,
                "seccomp_profile": {"type": "RuntimeDefault"},
            },
        }
        if cfg.gpu.node_selector:
            spec["node_selector"] = dict(cfg.gpu.node_selector)
        if cfg.gpu.tolerations:
            spec["tolerations"] = [
                t.model_dump(exclude_none=True) for t in cfg.gpu.tolerations
            ]
        if cfg.gpu.runtime_class_name:
            spec["runtime_class_name"] = cfg.gpu.runtime_class_name
        return spec

    def _pre_stop_seconds(self) -> int:
        rollout = self._cfg.rollout
        if self._profile.drains_on_sigterm:
            return rollout.pre_stop_seconds
        return rollout.pre_stop_seconds + rollout.drain_seconds

    def _ready_check(self) -> dict[str, Any]:
        """True only once the model serves. Behind the API key, an HTTP probe
        cannot authenticate without putting the key in the manifest, so the
        check runs inside the container, where the key is in the environment."""
        profile = self._profile
        if not profile.ready_path_needs_auth:
            return {"http_get": {"path": profile.ready_path, "port": "http"}}
        script = (
            "import os,urllib.request as u;"
            f"r=u.Request('http://127.0.0.1:{profile.port}{profile.ready_path}',"
            f"headers={{'Authorization':'Bearer '+os.environ['{profile.api_key_env}']}});"
            "u.urlopen(r,timeout=4)"
        )
        return {"exec_": {"command": ["python3", "-c", script]}}

    def _env(self, args: LlmDeploymentArgs) -> list[dict[str, Any]]:
        cfg, profile = self._cfg, self._profile
        plain = {
            **profile.env(cfg.launch),
            "HF_HOME": MODEL_DIR,
            # The pod runs as uid RUN_AS_USER, which has no passwd entry in the vLLM image:
            # HOME must be a writable directory (caches under ~/.cache, ~/.config, ~/.triton),
            # and USER answers getpass.getuser() without a passwd lookup (vLLM issue #44548).
            "HOME": HOME_DIR,
            "USER": RUN_AS_USER_NAME,
        }
        if cfg.model_cache.type == "baked":
            plain["HF_HUB_OFFLINE"] = "1"  # weights are in the image; never reach the hub
        env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in plain.items()]
        env.append({
            "name": profile.api_key_env,
            "value_from": {
                "secret_key_ref": {"name": args["api_key_secret"], "key": API_KEY_SECRET_KEY}
            },
        })
        if args.get("hf_token_secret") is not None:
            env.append({
                "name": "HF_TOKEN",
                "value_from": {
                    "secret_key_ref": {
                        "name": args["hf_token_secret"],
                        "key": HF_TOKEN_SECRET_KEY,
                    }
                },
            })
        return env

    def _resources(self) -> dict[str, Any]:
        cfg = self._cfg
        requests = cfg.resources.requests.model_dump(exclude_none=True)
        limits = cfg.resources.limits.model_dump(exclude_none=True)
        if cfg.gpu.count > 0:
            # Extended resources cannot be overcommitted: requests must equal limits.
            requests[cfg.gpu.resource] = str(cfg.gpu.count)
            limits[cfg.gpu.resource] = str(cfg.gpu.count)
        return {"requests": requests, "limits": limits}

    def _volumes(
        self, cache_claim: k8s.core.v1.PersistentVolumeClaim | None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The root filesystem is read-only; these are the only writable paths."""
        cfg = self._cfg
        volumes: list[dict[str, Any]] = [
            {"name": "tmp", "empty_dir": {"size_limit": "1Gi"}},
            {"name": "home", "empty_dir": {"size_limit": "2Gi"}},
        ]
        mounts: list[dict[str, Any]] = [
            {"name": "tmp", "mount_path": "/tmp"},
            {"name": "home", "mount_path": HOME_DIR},
        ]
        cache = cfg.model_cache
        if cache.type == "pvc":
            assert cache_claim is not None
            volumes.append({
                "name": "model-cache",
                "persistent_volume_claim": {"claim_name": cache_claim.metadata.name},
            })
            mounts.append({"name": "model-cache", "mount_path": MODEL_DIR})
        elif cache.type == "none":
            volumes.append({"name": "model-cache", "empty_dir": {"size_limit": cache.size}})
            mounts.append({"name": "model-cache", "mount_path": MODEL_DIR})
        # "baked": the image's own /models, read-only like the rest of the image.
        if cfg.gpu.count > 0:
            # Worker processes share tensors through /dev/shm; the runtime's 64 MiB default is too small.
            volumes.append({
                "name": "dshm",
                "empty_dir": {"medium": "Memory", "size_limit": cfg.gpu.shm_size},
            })
            mounts.append({"name": "dshm", "mount_path": "/dev/shm"})
        return volumes, mounts
