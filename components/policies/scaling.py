"""The scaling policy: one object for the stack's `autoscaling` section, rendered to every target.

`AutoscalingConfig` is the stack-file section. `ScalingPolicy.from_config` turns it (with the
engine profile and namespace) into one frozen object from which come

* the cluster objects: `hpa_behavior()` (the HPA's `behavior`, also inside KEDA's ScaledObject)
  and `scaled_object_spec()` (KEDA's ScaledObject spec: triggers with the PromQL text,
  thresholds, min/max, polling interval), rendered by `components.resources.autoscaling.LlmAutoscaler`;
* the local-mode rule: `HpaRule`, the Kubernetes HPA algorithm over the same triggers, which
  `local.autoscaler` evaluates against a real Prometheus with the very same query text.

Upstream semantics this follows (read at the versions named; the algorithm tests in
tests/scaling cite the worked examples):

* KEDA v2.19.0 Prometheus scaler (kedacore/keda@v2.19.0:pkg/scalers/prometheus_scaler.go):
  metadata keys `serverAddress`, `query`, `threshold` (plus optional `activationThreshold`,
  `ignoreNullValues` default true: an empty result counts as 0; more than one series is an
  error). Its metric type defaults to `AverageValue` (kedacore/keda@v2.19.0:pkg/scalers/
  scaler.go, GetMetricTargetType), so the HPA divides the query's value by the replica count.
  `pollingInterval` defaults to 30 s (apis/keda/v1alpha1/withtriggers_types.go) and
  `cooldownPeriod` to 300 s (pkg/scaling/executor/scale_executor.go); the cooldown only
  applies to scaling to zero, which `minReplicas >= 1` rules out.
* Kubernetes HPA (pkg/controller/podautoscaler: replica_calculator.go
  GetExternalPerPodMetricReplicas, horizontal.go stabilizeRecommendationWithBehaviors,
  convertDesiredReplicasWithBehaviorRate, calculateScale{Up,Down}LimitWithBehaviors; and the
  HPA concept page, kubernetes/website content/en/docs/concepts/workloads/autoscaling/
  horizontal-pod-autoscale.md): per metric with an AverageValue target,
  `usageRatio = total / (target * currentReplicas)`; inside the tolerance (|1 - ratio| <= 0.1)
  the count stays, else `desired = ceil(total / target)`; the largest desired count over the
  metrics wins; the stabilization windows keep the lowest recommendation of the scale-up window
  and the highest of the scale-down window; the rate policies limit the change per period
  (`selectPolicy` Max picks the policy allowing the largest change, Min the smallest, Disabled
  none); min/max clamp last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import Field

from components.config.sections import Section
from components.config.types import DnsLabel
from components.engines import MODEL_LABEL
from components.pins import KEDA_CHART_VERSION  # the scaler semantics above were read at it

HPA_TOLERANCE = 0.1
"""kube-controller-manager `--horizontal-pod-autoscaler-tolerance` default (both directions)."""

PolicyType = Literal["Pods", "Percent"]
SelectPolicy = Literal["Max", "Min", "Disabled"]


class AutoscalingConfig(Section):
    enabled: bool = False
    """Scale replicas automatically: HPA on CPU for the server engine, KEDA on queue depth for GPU engines (local mode: always the queue rule)."""
    min_replicas: int = Field(1, ge=1, le=1000)
    """Fewest replicas; `replicas` is ignored while autoscaling is on."""
    max_replicas: int = Field(4, ge=1, le=1000)
    """Most replicas (GPU stacks: no more than the GPUs you can get)."""
    target_cpu_utilization: int = Field(70, ge=1, le=100)
    """Server engine: average CPU utilisation (% of requests) the HPA keeps."""
    target_waiting_per_replica: int = Field(1, ge=1)
    """Queued requests per replica before a replica is added. 1, measured in the CPU regime (docs/autoscaling.md): on a 2.5x surge it kept 94 % of requests within the TTFT objective against 93 % for 2 and 81 % for 4, at the same cost; any queue means a request already waits. Prod (vLLM) sets 2: in the GPU regime (h200-llama8b, modelled, "Which regime are you in") 1, 2 and 4 kept the same share on the surge (96.0 ± 0.8 %) but 1 cost 10.3 ± 4.5 points more of static max's replica-seconds than 2; on a ramp 2 lost 0.2 ± 0.8 points."""
    target_running_per_replica: int = Field(24, ge=1)
    """Sequences in generation per replica before one is added: about 75 % of the engine's concurrent sequences (model.maxConcurrency; the server's default is 32). Measured in the CPU regime: at or above the slot count this trigger never fires, so replicas are removed mid-surge as soon as the queue empties and the queue builds again (87 % within the objective against 93 %). Prod sets 96 of 128: in the GPU regime (modelled, docs/autoscaling.md "Which regime are you in") 64, 96 and 128 kept the same share (paired 0.0 ± 0.0 points) at costs within 2.5 ± 9.3 points; the waiting trigger decides there."""
    running_average_seconds: int = Field(60, ge=0, le=3600)
    """The running trigger reads its gauge averaged over this many seconds (PromQL `avg_over_time`), at least two scrape intervals; 0 reads the instant value. Measured (docs/autoscaling.md): read instantly, the count of sequences in generation swings with every arrival, and a swing in a quiet spell added a replica the load did not need (72.6 % of static max's replica-seconds against 65.6 % averaged, 99.0 % against 97.4 % within the TTFT objective). The waiting trigger always reads the instant value, so a surge is seen at the next poll."""
    prometheus_url: str | None = Field(None, min_length=1)
    """Prometheus KEDA queries, e.g. http://prometheus-operated.monitoring.svc:9090 (GPU engines)."""
    install_keda: bool = False
    """Install KEDA with Helm into `kedaNamespace`; false expects it installed."""
    keda_namespace: DnsLabel = "keda"
    """Namespace KEDA is installed into."""
    keda_chart_version: str = Field(KEDA_CHART_VERSION, min_length=1)
    """Version of the kedacore/keda chart."""
    polling_interval_seconds: int = Field(15, ge=1, le=3600)
    """How often the metric is read (KEDA's pollingInterval; the HPA's own sync period is 15 s)."""
    scale_down_stabilization_seconds: int | None = Field(None, ge=0, le=86_400)
    """Window before replicas are removed (the highest recommendation in it wins); at least model.loadTimeoutSeconds (its default), so a replica that took that long to load is not given up on a short lull."""
    scale_up_pods: int = Field(4, ge=1, le=1000)
    """Most replicas added per `scaleUpPeriodSeconds` (the HPA default, 4 per 15 s)."""
    scale_up_period_seconds: int = Field(15, ge=1, le=1800)
    """Period of the scale-up limit."""
    scale_down_pods: int = Field(1, ge=1, le=1000)
    """Most replicas removed per `scaleDownPeriodSeconds`: one at a time, since a replacement needs the full model load time."""
    scale_down_period_seconds: int = Field(60, ge=1, le=1800)
    """Period of the scale-down limit."""


# --- the policy object ---------------------------------------------------------------------


@dataclass(frozen=True)
class RatePolicy:
    """One HPA scaling policy: at most `value` pods (or percent) per `period_seconds`."""

    type: PolicyType
    value: int
    period_seconds: float

    def render(self) -> dict[str, Any]:
        return {"type": self.type, "value": self.value,
                "periodSeconds": _whole(self.period_seconds)}


@dataclass(frozen=True)
class ScalingRules:
    """HPAScalingRules of one direction."""

    stabilization_window_seconds: float
    policies: tuple[RatePolicy, ...]
    select_policy: SelectPolicy = "Max"

    def render(self) -> dict[str, Any]:
        return {
            "stabilizationWindowSeconds": _whole(self.stabilization_window_seconds),
            "selectPolicy": self.select_policy,
            "policies": [p.render() for p in self.policies],
        }


DEFAULT_SCALE_UP = ScalingRules(0, (RatePolicy("Percent", 100, 15), RatePolicy("Pods", 4, 15)))
"""The HPA's default scale-up behavior (HPA concept page, "Default behavior")."""
DEFAULT_SCALE_DOWN = ScalingRules(300, (RatePolicy("Percent", 100, 15),))
"""The HPA's default scale-down behavior."""


@dataclass(frozen=True)
class Trigger:
    """One KEDA prometheus trigger: the query's value divided by replicas is kept at `threshold`."""

    metric: str
    namespace: str
    threshold: float
    average_seconds: float = 0.0
    """Average the gauge over this range first (0: the instant value)."""
    match: tuple[tuple[str, str], ...] = ()
    """More label matchers, e.g. the model's name where several models share the namespace."""

    @property
    def query(self) -> str:
        return queue_query(self.metric, self.namespace, self.average_seconds, self.match)


@dataclass(frozen=True)
class ScalingPolicy:
    """Everything that decides the replica count; times in seconds (see `compressed`)."""

    min_replicas: int
    max_replicas: int
    triggers: tuple[Trigger, ...]
    polling_interval_seconds: float
    scale_up: ScalingRules
    scale_down: ScalingRules
    prometheus_url: str | None = None
    tolerance: float = HPA_TOLERANCE

    @classmethod
    def from_config(cls, scaling: AutoscalingConfig, *, waiting_metric: str, running_metric: str,
                    namespace: str, scale_down_window_seconds: float,
                    match: tuple[tuple[str, str], ...] = ()) -> ScalingPolicy:
        return cls(
            min_replicas=scaling.min_replicas,
            max_replicas=scaling.max_replicas,
            triggers=(
                Trigger(waiting_metric, namespace, scaling.target_waiting_per_replica,
                        match=match),
                Trigger(running_metric, namespace, scaling.target_running_per_replica,
                        scaling.running_average_seconds, match=match),
            ),
            polling_interval_seconds=scaling.polling_interval_seconds,
            scale_up=ScalingRules(0, (RatePolicy("Pods", scaling.scale_up_pods,
                                                 scaling.scale_up_period_seconds),)),
            scale_down=ScalingRules(scale_down_window_seconds, (
                RatePolicy("Pods", scaling.scale_down_pods, scaling.scale_down_period_seconds),)),
            prometheus_url=scaling.prometheus_url,
        )

    @classmethod
    def for_stack(cls, cfg: Any, profile: Any = None) -> ScalingPolicy:
        """The policy of a parsed `StackConfig`: its namespace and the queue metrics of
        `profile` (default: the stack's engine; local mode passes the server's, whose
        replicas export `llm_requests_waiting` / `llm_requests_running`). On one model's view of
        a stack with several models (`StackConfig.for_model`), the queries select that model's
        series only (engines.MODEL_LABEL)."""
        profile = cfg.profile if profile is None else profile
        match = ((MODEL_LABEL, cfg.model.served),) if cfg.scoped_by_model else ()
        return cls.from_config(
            cfg.autoscaling, waiting_metric=profile.waiting_metric,
            running_metric=profile.running_metric, namespace=cfg.namespace,
            scale_down_window_seconds=cfg.scale_down_window_seconds, match=match)

    # --- cluster renderings ---

    def hpa_behavior(self) -> dict[str, Any]:
        """HPA `behavior` (camelCase: it also goes into KEDA's ScaledObject, a raw resource)."""
        return {"scaleDown": self.scale_down.render(), "scaleUp": self.scale_up.render()}

    def keda_triggers(self) -> list[dict[str, Any]]:
        return [{
            "type": "prometheus",
            # metricType unset: KEDA's default AverageValue divides the sum by the replicas.
            "metadata": {"serverAddress": self.prometheus_url or "", "query": t.query,
                         "threshold": _number(t.threshold)},
        } for t in self.triggers]

    def scaled_object_spec(self, deployment_name: Any) -> dict[str, Any]:
        window = _whole(self.scale_down.stabilization_window_seconds)
        return {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                               "name": deployment_name},
            "minReplicaCount": self.min_replicas,
            "maxReplicaCount": self.max_replicas,
            "pollingInterval": _whole(self.polling_interval_seconds),
            # Only used when scaling to zero; kept as long as the HPA window.
            "cooldownPeriod": window,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": self.hpa_behavior()}},
            # KEDA scales to the largest replica count any trigger asks for.
            "triggers": self.keda_triggers(),
        }

    # --- local mode ---

    def compressed(self, factor: float) -> ScalingPolicy:
        """The same policy on a clock running `factor` times faster: every period and window
        divided by `factor` (benchmarks replay hours of traffic in minutes)."""
        if factor <= 0:
            raise ValueError(f"compression factor must be positive, got {factor!r}")

        def rules(r: ScalingRules) -> ScalingRules:
            return replace(r, stabilization_window_seconds=r.stabilization_window_seconds / factor,
                           policies=tuple(replace(p, period_seconds=p.period_seconds / factor)
                                          for p in r.policies))

        return replace(self, polling_interval_seconds=self.polling_interval_seconds / factor,
                       triggers=tuple(replace(t, average_seconds=t.average_seconds / factor)
                                      for t in self.triggers),
                       scale_up=rules(self.scale_up), scale_down=rules(self.scale_down))

    def rule(self) -> HpaRule:
        """A fresh HPA state machine for this policy (local mode keeps one per cluster)."""
        return HpaRule(self)


def queue_query(metric: str, namespace: str, average_seconds: float = 0.0,
                match: tuple[tuple[str, str], ...] = ()) -> str:
    """PromQL summing an engine gauge over the stack's namespace (one stack per namespace) and
    the `match` labels (one model of several), each series first averaged over
    `average_seconds` when that is positive."""
    labels = ",".join(f'{k}="{v}"' for k, v in (("namespace", namespace), *match))
    series = f"{metric}{{{labels}}}"
    if average_seconds > 0:
        series = f"avg_over_time({series}[{promql_duration(average_seconds)}])"
    return f"sum({series})"


def promql_duration(seconds: float) -> str:
    """A PromQL range: whole seconds as `60s`, anything finer in milliseconds (`750ms`)."""
    ms = round(seconds * 1000)
    if ms <= 0:
        raise ValueError(f"a PromQL range must be positive, got {seconds!r} s")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


# --- the HPA algorithm ---------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """One evaluation: what the metrics asked for, what the rule allows, and why."""

    at: float
    current: int
    metrics: tuple[float, ...]
    """Each trigger's query value (the sum over replicas)."""
    raw: int
    """Largest desired count over the triggers, before windows, policies and clamps."""
    desired: int
    reason: str


def replicas_for_metric(total: float, target: float, current: int, tolerance: float) -> int:
    """HPA external metric with an AverageValue target (GetExternalPerPodMetricReplicas)."""
    if current <= 0:
        raise ValueError("current replicas must be at least 1")
    ratio = total / (target * current)
    if abs(1.0 - ratio) <= tolerance:
        return current
    return math.ceil(total / target)


@dataclass
class HpaRule:
    """The HPA controller's state for one scale target: past recommendations and scale events."""

    policy: ScalingPolicy
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    up_events: list[tuple[float, int]] = field(default_factory=list)
    down_events: list[tuple[float, int]] = field(default_factory=list)

    def evaluate(self, now: float, current: int, metrics: tuple[float, ...] | list[float]
                 ) -> Decision:
        """Desired replicas for `current` replicas given each trigger's value (in order)."""
        p = self.policy
        values = tuple(metrics)
        if len(values) != len(p.triggers):
            raise ValueError(f"expected {len(p.triggers)} metric values, got {len(values)}")
        raw = max(replicas_for_metric(v, t.threshold, current, p.tolerance)
                  for v, t in zip(values, p.triggers))
        # Outside [min, max] the HPA jumps to the bound first (horizontal.go reconcileAutoscaler).
        if current > p.max_replicas:
            return self._record(now, current, values, raw, p.max_replicas, "above maxReplicas")
        if current < p.min_replicas:
            return self._record(now, current, values, raw, p.min_replicas, "below minReplicas")
        stabilized, why = self._stabilize(now, current, raw)
        desired, limit_why = self._limit(now, current, stabilized)
        reason = limit_why or why or ("within tolerance" if raw == current else "metrics")
        return self._record(now, current, values, raw, desired, reason)

    def _stabilize(self, now: float, current: int, raw: int) -> tuple[int, str]:
        up_cut = now - self.policy.scale_up.stabilization_window_seconds
        down_cut = now - self.policy.scale_down.stabilization_window_seconds
        up, down = raw, raw
        for at, rec in self.recommendations:
            if at > up_cut:
                up = min(up, rec)
            if at > down_cut:
                down = max(down, rec)
        keep = min(up_cut, down_cut)
        self.recommendations = [(at, rec) for at, rec in self.recommendations if at > keep]
        self.recommendations.append((now, raw))
        result = min(max(current, up), down)
        why = ""
        if result > raw:
            why = "scale-down stabilization window"
        elif result < raw:
            why = "scale-up stabilization window"
        return result, why

    def _limit(self, now: float, current: int, desired: int) -> tuple[int, str]:
        p = self.policy
        if desired > current:
            limit = max(_up_limit(now, current, self.up_events, self.down_events, p.scale_up),
                        current)
            allowed = min(p.max_replicas, limit)
            if desired > allowed:
                return allowed, ("scale-up policy" if limit < p.max_replicas else "maxReplicas")
        elif desired < current:
            limit = min(_down_limit(now, current, self.up_events, self.down_events, p.scale_down),
                        current)
            allowed = max(p.min_replicas, limit)
            if desired < allowed:
                return allowed, ("scale-down policy" if limit > p.min_replicas else "minReplicas")
        return desired, ""

    def _record(self, now: float, current: int, values: tuple[float, ...], raw: int,
                desired: int, reason: str) -> Decision:
        if desired > current:
            self.up_events.append((now, desired - current))
        elif desired < current:
            self.down_events.append((now, current - desired))
        horizon = now - max([r.period_seconds for r in
                             self.policy.scale_up.policies + self.policy.scale_down.policies],
                            default=0)
        self.up_events = [e for e in self.up_events if e[0] > horizon]
        self.down_events = [e for e in self.down_events if e[0] > horizon]
        return Decision(now, current, values, raw, desired, reason)


def _changed(now: float, period: float, events: list[tuple[float, int]]) -> int:
    return sum(n for at, n in events if at > now - period)


def _period_start(now: float, current: int, pol: RatePolicy, ups: list[tuple[float, int]],
                  downs: list[tuple[float, int]]) -> int:
    """Replicas at the start of `pol`'s period: current, less what was added in it, plus
    what was removed (periodStartReplicas in both of upstream's limit functions)."""
    return current - _changed(now, pol.period_seconds, ups) \
        + _changed(now, pol.period_seconds, downs)


def _up_limit(now: float, current: int, ups: list[tuple[float, int]],
              downs: list[tuple[float, int]], rules: ScalingRules) -> int:
    """calculateScaleUpLimitWithScalingRules: the most replicas the policies allow now."""
    if rules.select_policy == "Disabled":
        return current
    proposals = []
    for pol in rules.policies:
        start = _period_start(now, current, pol, ups, downs)
        proposals.append(start + pol.value if pol.type == "Pods"
                         else math.ceil(start * (1 + pol.value / 100)))
    if not proposals:
        return current
    return max(proposals) if rules.select_policy == "Max" else min(proposals)


def _down_limit(now: float, current: int, ups: list[tuple[float, int]],
                downs: list[tuple[float, int]], rules: ScalingRules) -> int:
    """calculateScaleDownLimitWithBehaviors: the fewest replicas the policies allow now."""
    if rules.select_policy == "Disabled":
        return current
    proposals = []
    for pol in rules.policies:
        start = _period_start(now, current, pol, ups, downs)
        # Go's int32(float64) truncates toward zero: 72 * 0.9 = 64.8 -> 64.
        proposals.append(start - pol.value if pol.type == "Pods"
                         else int(start * (1 - pol.value / 100)))
    if not proposals:
        return current
    return min(proposals) if rules.select_policy == "Max" else max(proposals)


def _whole(seconds: float) -> int | float:
    return int(seconds) if float(seconds).is_integer() else seconds


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
