"""Alerting policy: one object from the stack configuration, two renderings.

`alert_policy(cfg, target)` reads the thresholds (monitoring.slo, the
autoscaling targets) and the metric names (the engine profile) once.
`rule_groups(policy)` turns it into Prometheus rule groups, which become
either a Prometheus Operator `PrometheusRule` (`LlmAlertRules`, in-cluster) or
a plain rule file (`rules_file`, local mode's Prometheus). The expressions are
the same; only the scope (which series belong to this stack) and the source of
the replica count differ:

- cluster: engine series carry the `namespace` label the ServiceMonitor adds;
  replicas come from kube-state-metrics (`kube_deployment_*` of the model's own
  Deployment), which is the only place that knows about a pod that is not ready;
- local: the scrape job of the local replicas scopes the series; a replica
  counts as available while its /metrics answers (`up == 1`).

A stack with several models gets one policy per model (from its view,
`StackConfig.for_model`): its engine series are further scoped by the model's name
(`engines.MODEL_LABEL`), and, as every model's, its replica counts by its Deployment's name,
so each model has its own recorded series and alerts, told apart by their `model` label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import yaml

from components.engines import MODEL_LABEL, EngineProfile

if TYPE_CHECKING:
    from components.config.stack import StackConfig

Target = Literal["cluster", "local"]

LOCAL_JOB = "llm-serving-local"
"""Scrape job name of the local replicas in local mode's Prometheus."""

KUBE_STATE_METRICS_REPLICAS = (
    "kube_deployment_status_replicas_available", "kube_deployment_spec_replicas")
"""(available, desired) replicas per Deployment from kube-state-metrics; labels `namespace` and
`deployment` (tests/contracts/data/kube-state-metrics-2.20.0.json)."""

RECORD_PREFIX = "llm_serving"
"""Recorded series are `llm_serving:<what>:<how>` (Prometheus naming convention)."""


@dataclass(frozen=True)
class AlertPolicy:
    profile: EngineProfile
    """Where the metric names come from."""
    scope: tuple[tuple[str, str], ...]
    """Label matchers that select this stack's series, e.g. (("namespace", "llm-prod"),)."""
    target: Target
    model: str
    """Served model name; a label on every recorded series and alert."""
    ttft_p99_seconds: float
    backlog_per_replica: int
    """Queued requests per replica above which the backlog alert fires (the autoscaling target)."""
    max_replicas: int | None
    """Autoscaling ceiling; None: no autoscaling, no pinned-at-max alert."""
    refusal_ratio: float
    for_seconds: int
    no_ready_for_seconds: int
    window_seconds: int
    replica_scope: tuple[tuple[str, str], ...] | None = None
    """Label matchers of the replica counts (kube-state-metrics series carry no model label);
    None: `scope`."""

    def with_timing(self, *, for_seconds: int, window_seconds: int) -> "AlertPolicy":
        """The same policy on a shorter clock, for drills that cannot wait minutes."""
        if for_seconds < 1 or window_seconds < 2:
            raise ValueError("with_timing: 'for_seconds' must be >= 1 and 'window_seconds' >= 2")
        return replace(
            self, for_seconds=for_seconds, no_ready_for_seconds=for_seconds,
            window_seconds=window_seconds,
        )


def needs_deployment(cfg: "StackConfig") -> bool:
    """Whether the stack's namespace holds Deployments other than this model's: several models,
    or the Gateway path's model router and endpoint pickers."""
    return cfg.scoped_by_model or cfg.gateway.enabled


def alert_policy(
    cfg: "StackConfig", target: Target = "cluster", job: str = LOCAL_JOB,
    profile: EngineProfile | None = None, deployment: str | None = None,
) -> AlertPolicy:
    """The policy of one stack (or of one model's view of it); `target` picks how its series are
    scoped, `profile` the engine whose metric names the rules read (default: the stack's
    engine). `deployment`, the model's Deployment, scopes a cluster policy's replica counts to
    it; it is required where other Deployments share the namespace (several models, or the
    Gateway path's router), whose replicas would otherwise count as the model's."""
    if target not in ("cluster", "local"):
        raise ValueError(f"alert_policy: 'target' must be 'cluster' or 'local', not {target!r}")
    slo = cfg.monitoring.slo
    scope: tuple[tuple[str, str], ...] = (
        (("namespace", cfg.namespace),) if target == "cluster" else (("job", job),))
    replica_scope = None
    if target == "cluster":
        if deployment is None and needs_deployment(cfg):
            raise ValueError("alert_policy: a model whose namespace holds other Deployments "
                             "(several models, or the gateway's router) needs its 'deployment'")
        if deployment is not None:
            replica_scope = (*scope, ("deployment", deployment))
        if cfg.scoped_by_model:
            scope = (*scope, (MODEL_LABEL, cfg.model.served))
    return AlertPolicy(
        profile=profile if profile is not None else cfg.profile,
        scope=scope,
        target=target,
        model=cfg.model.served,
        ttft_p99_seconds=slo.ttft_p99_seconds,
        backlog_per_replica=cfg.autoscaling.target_waiting_per_replica,
        max_replicas=cfg.autoscaling.max_replicas if cfg.autoscaling.enabled else None,
        refusal_ratio=slo.refusal_ratio,
        for_seconds=slo.for_minutes * 60,
        no_ready_for_seconds=slo.no_ready_for_minutes * 60,
        window_seconds=slo.window_minutes * 60,
        replica_scope=replica_scope,
    )


def _duration(seconds: int) -> str:
    return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"


def _sel(policy: AlertPolicy, name: str, scope: tuple[tuple[str, str], ...] | None = None,
         **extra: str) -> str:
    pairs = list(policy.scope if scope is None else scope) + sorted(extra.items())
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"


def record_name(what: str, how: str) -> str:
    return f"{RECORD_PREFIX}:{what}:{how}"


def recorded(policy: AlertPolicy, what: str, how: str) -> str:
    """Selector of one recorded series of this stack (recorded series carry the scope labels)."""
    return _sel(policy, record_name(what, how))


def _rate(policy: AlertPolicy, series: str) -> str:
    return f"sum(rate({series}[{_duration(policy.window_seconds)}]))"


def _quantile(policy: AlertPolicy, q: float, histogram: str) -> str:
    bucket = _sel(policy, f"{histogram}_bucket")
    return (
        f"histogram_quantile({q}, sum by (le) "
        f"(rate({bucket}[{_duration(policy.window_seconds)}])))"
    )


def _replica_exprs(policy: AlertPolicy) -> tuple[str, str]:
    """(available, desired) replica counts for the target."""
    if policy.target == "cluster":
        # max by Deployment first: two kube-state-metrics scraped by one Prometheus (the
        # stack's and kube-prometheus-stack's) report each Deployment twice. One model of
        # several selects its own Deployment (`replica_scope`).
        return tuple(  # type: ignore[return-value]
            f"sum(max by (deployment) ({_sel(policy, name, policy.replica_scope)}))"
            for name in KUBE_STATE_METRICS_REPLICAS
        )
    up = _sel(policy, "up")
    # A replica whose /metrics answers is serving in local mode: up is 1 for it, 0 for one
    # that does not answer. The sum is 0 only when every known replica fails; before the first
    # scrape (a target's first one comes up to a scrape interval after start) there is no
    # series and so no alert, as in the cluster, where no kube-state-metrics series means no
    # alert. (`count(up == 1) or vector(0)` read "not scraped yet" as "none ready", and local
    # top showed LlmNoReadyReplica pending while the replicas answered.)
    return f"sum({up})", f"count({up}) or vector(0)"


def recording_rules(policy: AlertPolicy) -> list[dict[str, Any]]:
    p = policy.profile
    finished = _sel(policy, f"{p.e2e_histogram}_count")
    available, desired = _replica_exprs(policy)
    rules = [
        ("requests", "rate", _rate(policy, finished)),
        ("ttft_seconds", "p50", _quantile(policy, 0.5, p.ttft_histogram)),
        ("ttft_seconds", "p99", _quantile(policy, 0.99, p.ttft_histogram)),
        ("e2e_seconds", "p50", _quantile(policy, 0.5, p.e2e_histogram)),
        ("e2e_seconds", "p99", _quantile(policy, 0.99, p.e2e_histogram)),
        ("running", "sum", f"sum({_sel(policy, p.running_metric)})"),
        ("waiting", "sum", f"sum({_sel(policy, p.waiting_metric)})"),
        # Mean over the replicas that export the gauge: the backlog one replica sees.
        ("waiting_per_replica", "avg", f"avg({_sel(policy, p.waiting_metric)})"),
        ("replicas", "available", available),
        ("replicas", "desired", desired),
    ]
    if p.itl_histogram is not None:
        rules.append(("itl_seconds", "p99", _quantile(policy, 0.99, p.itl_histogram)))
    if p.kv_cache_metric is not None:
        rules.append(("kv_cache_usage", "max", f"max({_sel(policy, p.kv_cache_metric)})"))
    for what, ref in (("refused", p.refused), ("unavailable", p.unavailable)):
        if ref is None:
            continue
        counted = _rate(policy, ref.selector(dict(policy.scope)))
        # Refused over everything that got an answer: finished plus refused.
        rules.append((what, "ratio", f"{counted} / ({_rate(policy, finished)} + {counted})"))
    labels = {**dict(policy.scope), "model": policy.model}
    return [
        {"record": record_name(what, how), "expr": expr, "labels": dict(labels)}
        for what, how, expr in rules
    ]


def _alert(
    policy: AlertPolicy, name: str, expr: str, for_seconds: int, severity: str,
    summary: str, description: str,
) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": _duration(for_seconds),
        "labels": {"severity": severity, "model": policy.model},
        # Static text (thresholds filled in here): what an operator needs at 3 am,
        # and what the promtool tests can expect verbatim.
        "annotations": {"summary": summary, "description": description},
    }


def alerting_rules(policy: AlertPolicy) -> list[dict[str, Any]]:
    m, for_s = policy.model, policy.for_seconds
    window = _duration(for_s)
    alerts = [
        _alert(
            policy, "LlmTtftP99AboveSlo",
            f"{recorded(policy, 'ttft_seconds', 'p99')} > {policy.ttft_p99_seconds}",
            for_s, "warning",
            f"{m}: p99 time to first token above {policy.ttft_p99_seconds} s for {window}",
            "Requests wait too long for their first token. Check the queue backlog and "
            "whether replicas are at their maximum; add capacity or lower the load.",
        ),
        _alert(
            policy, "LlmQueueBacklog",
            f"{recorded(policy, 'waiting_per_replica', 'avg')} > {policy.backlog_per_replica}",
            for_s, "warning",
            f"{m}: more than {policy.backlog_per_replica} queued requests per replica for {window}",
            "The queue per replica stays above the autoscaling target: scaling is not keeping "
            "up (at its maximum, no GPU to schedule on, or autoscaling is off).",
        ),
        _alert(
            policy, "LlmNoReadyReplica",
            f"{recorded(policy, 'replicas', 'available')} < 1",
            policy.no_ready_for_seconds, "critical",
            f"{m}: no ready replica for {_duration(policy.no_ready_for_seconds)}",
            "Every request fails. Look at the pods' events and logs (image pull, model "
            "load, GPU scheduling).",
        ),
    ]
    if policy.max_replicas is not None:
        alerts.append(_alert(
            policy, "LlmReplicasAtMax",
            f"{recorded(policy, 'replicas', 'desired')} >= {policy.max_replicas}",
            for_s, "warning",
            f"{m}: replicas pinned at maxReplicas ({policy.max_replicas}) for {window}",
            "The autoscaler wants more replicas than it may have; raise "
            "autoscaling.maxReplicas (and the GPU quota) or expect queueing.",
        ))
    if policy.profile.refused is not None:
        percent = f"{policy.refusal_ratio * 100:g}%"
        alerts.append(_alert(
            policy, "LlmRefusalRatioHigh",
            f"{recorded(policy, 'refused', 'ratio')} > {policy.refusal_ratio}",
            for_s, "warning",
            f"{m}: more than {percent} of requests refused with 429 for {window}",
            "Replicas are full (admission control answers 429). Clients retry with "
            "backoff; capacity is short.",
        ))
    return alerts


def rule_groups(policy: AlertPolicy) -> list[dict[str, Any]]:
    """Prometheus rule groups: recording rules first, alerts read the recorded series."""
    return [
        {"name": f"{RECORD_PREFIX}.recording", "rules": recording_rules(policy)},
        {"name": f"{RECORD_PREFIX}.alerts", "rules": alerting_rules(policy)},
    ]


def rules_file(policy: AlertPolicy) -> str:
    """The plain Prometheus rule file (`rule_files:`) of the policy."""
    header = (
        f"# Rendered from the stack configuration (components/policies/alerting.py), "
        f"target: {policy.target}.\n"
    )
    return header + yaml.safe_dump({"groups": rule_groups(policy)}, sort_keys=False)


def local_rules(cfg: "StackConfig", time_factor: float = 1.0,
                scrape_seconds: float | None = None, job: str = LOCAL_JOB,
                profile: EngineProfile | None = None) -> str:
    """The rule file local mode's Prometheus loads: the stack's policy (read with `profile`'s
    metric names: local mode runs the server engine whatever the stack's), its `for` and rate
    windows divided by `time_factor` (local mode's compressed clock), a window never shorter
    than four scrapes."""
    if time_factor <= 0:
        raise ValueError(f"local_rules: 'time_factor' must be positive, got {time_factor}")
    policy = alert_policy(cfg, "local", job=job, profile=profile)
    if time_factor != 1:
        scrape = scrape_seconds if scrape_seconds is not None else cfg.monitoring.interval_seconds
        window = max(policy.window_seconds / time_factor, 4 * scrape)
        policy = policy.with_timing(
            for_seconds=max(1, math.ceil(policy.for_seconds / time_factor)),
            window_seconds=max(2, math.ceil(window)),
        )
    return rules_file(policy)
