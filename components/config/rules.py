"""Configuration rules that span sections; each problem names the key to change."""

from __future__ import annotations

from typing import TYPE_CHECKING

from components.config.types import NAMESPACE, cpu_cores, memory_bytes
from components.pins import KUBE_STATE_METRICS_VERSION
from components.policies import affinity

if TYPE_CHECKING:
    from components.config.stack import StackConfig


def cross_check(cfg: StackConfig) -> list[str]:
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
    if cfg.monitoring.rules and cfg.monitoring.kube_state_metrics is None:
        warnings.append(
            f"{NAMESPACE}:monitoring.kubeStateMetrics: unset; the replica alerts "
            "(LlmNoReadyReplica, LlmReplicasAtMax) read kube-state-metrics' kube_deployment_* "
            "series and never fire without them. Set 'present' if your Prometheus scrapes a "
            "kube-state-metrics (kube-prometheus-stack installs one) or 'install' to install "
            f"kube-state-metrics {KUBE_STATE_METRICS_VERSION} with this stack"
        )
    if ingress.enabled and not ingress.controller.install and ingress.host is None:
        warnings.append(
            f"{NAMESPACE}:ingress.host: unset with an existing controller; NGINX Ingress "
            "Controller rejects host-less Ingresses unless it runs 5.5+ with "
            "-allow-empty-ingress-host (chart value controller.allowEmptyIngressHost); "
            "set ingress.host otherwise"
        )
    return warnings
