"""Configuration rules that span sections; each problem names the key to change."""

from __future__ import annotations

from typing import TYPE_CHECKING

from components.config.types import NAMESPACE, cpu_cores, memory_bytes
from components.config.workload import kube_name_problem
from components.pins import KUBE_STATE_METRICS_VERSION
from components.policies import affinity
from components.policies.model_routing import SERVED_NAME, SERVED_NAME_MAX

if TYPE_CHECKING:
    from components.config.stack import StackConfig


def cross_check(cfg: StackConfig) -> list[str]:
    """Rules that span sections; each names the key to change. Rules about one model run on
    each model's view (`StackConfig.for_model`), so they name `models[1].gpu.count` where that
    model sets its own count; a problem several models share is listed once."""
    problems = _model_list(cfg) + _stack(cfg)
    for view in cfg.model_views():
        problems += _one_model(view)
    return list(dict.fromkeys(problems))


def _model_list(cfg: StackConfig) -> list[str]:
    """The `models` list itself: names, routes, and what several models need."""
    problems = []
    models = cfg.models
    several = len(models) > 1
    where = (lambda i: f"{NAMESPACE}:model") if cfg.model_list is None else (
        lambda i: f"{NAMESPACE}:models[{i}]")
    served: dict[str, int] = {}
    kube: dict[str, int] = {}
    for i, entry in enumerate(models):
        name_key = "servedName" if entry.served_name is not None else "id"
        if entry.served in served:
            problems.append(
                f"{where(i)}.{name_key}: '{entry.served}' is already served by "
                f"models[{served[entry.served]}]; served names must be unique (clients pick a "
                "model by it)")
            continue
        served[entry.served] = i
        if cfg.gateway.enabled and not SERVED_NAME.match(entry.served):
            problems.append(
                f"{where(i)}.{name_key}: '{entry.served}' cannot be routed on the Gateway path "
                "(it is matched as a header value and written into the model router's "
                f"configuration): 1 to {SERVED_NAME_MAX} letters, digits and '.', '_', '/', ':', "
                "'@', '+', '-', starting with a letter or digit")
        if not several:
            continue  # a single model's objects keep their fixed names
        if entry.name is None:
            problem = kube_name_problem(entry.kube_name)
            if problem is not None:
                problems.append(
                    f"{where(i)}.{name_key}: '{entry.served}' cannot become a Kubernetes name "
                    f"(it would be '{entry.kube_name}': {problem}); set models[{i}].name")
                continue
        elif (problem := kube_name_problem(entry.name)) is not None:
            problems.append(f"{where(i)}.name: {problem} (got {entry.name!r})")
            continue
        if entry.kube_name in kube:
            problems.append(
                f"{where(i)}.{'name' if entry.name else name_key}: Kubernetes name "
                f"'{entry.kube_name}' is already models[{kube[entry.kube_name]}]'s; set "
                f"models[{i}].name")
        kube.setdefault(entry.kube_name, i)
    for model, path in cfg.ingress.model_paths.items():
        key = f"{NAMESPACE}:ingress.modelPaths.{model}"
        if model not in served:
            problems.append(
                f"{key}: routes to a model that does not exist; served names: "
                f"{', '.join(served)}")
        elif served[model] == 0:
            problems.append(f"{key}: the first model's path is ingress.path; list only the "
                            "other models here")
    if several:
        paths: dict[str, int] = {}
        for i in range(len(models)):
            path = cfg.ingress_path(i)
            if path in paths:
                problems.append(
                    f"{NAMESPACE}:ingress.modelPaths.{models[i].served}: {path} is already "
                    f"models[{paths[path]}]'s path")
            paths.setdefault(path, i)
        if not cfg.routed:
            problems.append(
                f"{NAMESPACE}:models: {len(models)} models need one entry point that routes "
                "between them; set gateway.enabled: true (by the request's model field) or "
                "ingress.enabled: true (a path prefix per model), as a Service alone cannot "
                "route by model")
        if cfg.model_cache.type == "baked":
            problems.append(
                f"{NAMESPACE}:modelCache.type: 'baked' puts one model's weights into the image; "
                "with several models use 'pvc' or 'none'")
    if not cfg.autoscaling.enabled:
        for i, entry in enumerate(models):
            if entry.autoscaling is not None:
                problems.append(f"{where(i)}.autoscaling: set, but autoscaling.enabled is false")
    return problems


def _stack(cfg: StackConfig) -> list[str]:
    """Rules over the sections every model shares."""
    problems = []
    profile = cfg.profile
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
    scaling = cfg.autoscaling
    if scaling.enabled:
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
    if cfg.gateway.enabled:
        if cfg.ingress.enabled:
            problems.append(f"{NAMESPACE}:gateway.enabled: set either gateway.enabled or "
                            "ingress.enabled, not both (each is the stack's entry point)")
        if profile.name != "vllm":
            problems.append(
                f"{NAMESPACE}:gateway.enabled: the endpoint picker reads vLLM's metrics (queue, "
                f"KV cache); engine '{cfg.engine}' exports others. Use engine 'vllm', or "
                "ingress.enabled for this engine")
    if cfg.service.source_ranges and cfg.gateway.enabled:
        problems.append(f"{NAMESPACE}:service.sourceRanges: the model router is the entry point; "
                        "set gateway.router.sourceRanges instead")
    if cfg.ingress.tls_secret is not None and cfg.ingress.host is None:
        problems.append(f"{NAMESPACE}:ingress.tlsSecret: needs ingress.host (the certificate's name)")
    lb = cfg.load_balancing
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
    if cfg.service.source_ranges and cfg.service_type != "LoadBalancer" \
            and not cfg.gateway.enabled:
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


def _one_model(cfg: StackConfig) -> list[str]:
    """Rules of one model's view; `cfg.key` names where each value came from."""
    problems = []
    profile, key = cfg.profile, cfg.key
    gpu_count = key("gpu.count")
    if cfg.gpu.count > 0 and not profile.uses_gpus:
        problems.append(
            f"{NAMESPACE}:{gpu_count}: engine '{cfg.engine}' runs on CPU only; "
            f"set {gpu_count} to 0 or use engine 'vllm'"
        )
    if profile.uses_gpus and cfg.gpu.count == 0:
        problems.append(
            f"{NAMESPACE}:{gpu_count}: engine '{cfg.engine}' needs at least 1 GPU per replica"
        )
    model = cfg.model
    if model.max_output_tokens >= model.max_context_length:
        problems.append(
            f"{NAMESPACE}:{key('model.maxOutputTokens')}: must be below "
            f"{key('model.maxContextLength')} ({model.max_context_length}) to leave room for "
            "the prompt"
        )
    for section in ("cpu", "memory"):
        request = getattr(cfg.resources.requests, section)
        limit = getattr(cfg.resources.limits, section)
        if request and limit:
            parse = cpu_cores if section == "cpu" else memory_bytes
            if parse(request) > parse(limit):
                problems.append(
                    f"{NAMESPACE}:{key(f'resources.requests.{section}')}: {request} exceeds "
                    f"{key(f'resources.limits.{section}')} ({limit})"
                )
    scaling = cfg.autoscaling
    if scaling.enabled:
        if scaling.max_replicas < scaling.min_replicas:
            problems.append(
                f"{NAMESPACE}:{key('autoscaling.maxReplicas')}: must be at least "
                f"{key('autoscaling.minReplicas')} ({scaling.min_replicas})"
            )
        if cfg.scale_down_window_seconds < model.load_timeout_seconds:
            problems.append(
                f"{NAMESPACE}:autoscaling.scaleDownStabilizationSeconds: must be at least "
                f"{key('model.loadTimeoutSeconds')} ({model.load_timeout_seconds}) so a loading "
                "pod is never scaled away"
            )
        if profile.scale_signal == "cpu" and cfg.resources.requests.cpu is None:
            problems.append(
                f"{NAMESPACE}:{key('resources.requests.cpu')}: CPU autoscaling measures "
                "utilisation against the request; set one"
            )
    if cfg.rollout_downtime and not cfg.rollout.accept_downtime:
        replicas_key = key("autoscaling.minReplicas" if scaling.enabled else "replicas")
        problems.append(
            f"{NAMESPACE}:rollout.maxSurge: a rollout would take the only ready replica down "
            f"({replicas_key} {cfg.fewest_replicas}, rollout.maxSurge {cfg.rollout_max_surge}); "
            f"set {replicas_key} to 2 or more, rollout.maxSurge to 1 (needs room for one more "
            "pod, a spare GPU on GPU stacks), or rollout.acceptDowntime: true"
        )
    if cfg.load_balancing.bounded and model.max_concurrency is None:
        problems.append(
            f"{NAMESPACE}:{key('model.maxConcurrency')}: required with loadBalancing.method "
            "session_hash_bounded, whose bound is loadBalancing.boundFactor x the replica's slots"
        )
    return problems


def stack_warnings(cfg: StackConfig) -> list[str]:
    """Settings that are allowed but that an operator should see at every preview."""
    warnings = []
    for view in cfg.model_views():
        if view.rollout_downtime:  # only reachable with rollout.acceptDowntime
            whose = f" of {view.model.served}" if cfg.model_count > 1 else ""
            warnings.append(
                f"{NAMESPACE}:rollout.acceptDowntime: every rollout{whose} takes the only ready "
                f"replica down for the preStop pause and a full model load (up to "
                f"{view.key('model.loadTimeoutSeconds')} = {view.model.load_timeout_seconds} s); "
                "requests fail meanwhile"
            )
    ingress = cfg.ingress
    gateway = cfg.gateway
    if gateway.enabled and "method" in cfg.load_balancing.model_fields_set:
        warnings.append(
            f"{NAMESPACE}:loadBalancing.method: does not apply on the Gateway path, where each "
            "model's endpoint picker chooses the replica (queue, KV cache, prefix cache); the "
            "timeouts, body size and rate limit still apply (at the model router)")
    if gateway.enabled and gateway.tls_secret is None:
        warnings.append(
            f"{NAMESPACE}:gateway: no TLS; the API key crosses the network in clear. Set "
            "gateway.tlsSecret (an existing kubernetes.io/tls Secret)")
    if ingress.enabled and cfg.model_count > 1:
        routes = ", ".join(f"{m.served} at {cfg.ingress_path(i)}" for i, m in enumerate(cfg.models))
        warnings.append(
            f"{NAMESPACE}:models: the NGINX Ingress Controller cannot read the request body, so "
            f"it routes by path, not by the request's `model` field: {routes} (each client uses "
            f"its model's path as base URL; GET /v1/models lists only {cfg.models[0].served}). "
            "Routing by `model` needs the Gateway path (docs/gateway.md)"
        )
        slots = {m.max_concurrency for m in cfg.models}
        if cfg.load_balancing.bounded and len(slots) > 1:
            warnings.append(
                f"{NAMESPACE}:models: one Ingress carries one nginx.org/max-conns for every "
                f"model; it is sized from the largest maxConcurrency ({max(slots)}), so the "
                "bound of the models with fewer slots is looser than loadBalancing.boundFactor"
            )
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
