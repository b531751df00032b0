"""The HPA algorithm local mode runs (`components.policies.scaling.HpaRule`), table-driven.

Sources of the cases (read at these revisions):
- HPA_DOC: kubernetes/website@10ae76015a9a9af1cf6d5ef14bc43b7f2be2584e:
  content/en/docs/concepts/workloads/autoscaling/horizontal-pod-autoscale.md
  ("Algorithm details", "Scaling policies", "Stabilization window", "Default behavior",
  "Example: limit scale down rate", "Example: disable scale down").
- HPA_CODE: kubernetes/kubernetes pkg/controller/podautoscaler/replica_calculator.go
  (GetExternalPerPodMetricReplicas: usageRatio = total / (target * statusReplicas); scale only
  when |1 - usageRatio| > tolerance, then ceil(total / target)) and horizontal.go
  (stabilizeRecommendationWithBehaviors, convertDesiredReplicasWithBehaviorRate,
  calculateScaleUpLimitWithScalingRules, calculateScaleDownLimitWithBehaviors).
- KEDA: kedacore/keda@v2.19.0:pkg/scalers/scaler.go (metricType defaults to AverageValue) and
  pkg/scalers/prometheus_scaler.go (empty result = 0 with ignoreNullValues, the default).
"""

from __future__ import annotations

import pytest

from components.policies.scaling import (
    DEFAULT_SCALE_DOWN,
    DEFAULT_SCALE_UP,
    RatePolicy,
    ScalingPolicy,
    ScalingRules,
    Trigger,
    promql_duration,
    replicas_for_metric,
)

FREE_DOWN = ScalingRules(0, (RatePolicy("Percent", 100, 15),))
"""No window, any change at once: isolates the metric arithmetic."""
FREE_UP = ScalingRules(0, (RatePolicy("Percent", 1000, 15),))


def policy(*thresholds: float, lo: int = 1, hi: int = 100, up: ScalingRules = FREE_UP,
           down: ScalingRules = FREE_DOWN) -> ScalingPolicy:
    triggers = tuple(Trigger(f"m{i}", "ns", t) for i, t in enumerate(thresholds))
    return ScalingPolicy(lo, hi, triggers, 15, up, down)


# (case, source, current, metric totals, thresholds, expected desired)
METRIC_CASES = [
    ("200m against 100m doubles", "HPA_DOC Algorithm details", 3, (600.0,), (100,), 6),
    ("50m against 100m halves", "HPA_DOC Algorithm details", 4, (200.0,), (100,), 2),
    ("ratio 1.08 is inside the 0.1 tolerance", "HPA_DOC/HPA_CODE tolerance", 5, (10.8,), (2,), 5),
    ("ratio 0.92 is inside the tolerance", "HPA_DOC/HPA_CODE tolerance", 5, (9.2,), (2,), 5),
    ("ratio 1.15 scales: ceil(total/target)", "HPA_CODE", 4, (9.2,), (2,), 5),
    ("AverageValue: the sum over replicas, not per pod", "KEDA scaler.go + HPA_CODE",
     2, (9.0,), (2,), 5),
    ("no series (KEDA reads 0) scales to the minimum", "KEDA prometheus_scaler.go",
     3, (0.0,), (2,), 1),
    ("largest desired count over the triggers", "HPA_DOC multiple metrics",
     2, (1.0, 300.0), (2, 32), 10),
]


@pytest.mark.parametrize("case, source, current, totals, thresholds, expected", METRIC_CASES,
                         ids=[c[0] for c in METRIC_CASES])
def test_desired_replicas_from_metrics(case, source, current, totals, thresholds, expected):
    decision = policy(*thresholds).rule().evaluate(0.0, current, totals)
    assert decision.desired == expected, f"{case} ({source})"


def test_the_tolerance_compares_the_per_replica_average_with_the_target():
    assert replicas_for_metric(21.0, 2, 10, 0.1) == 10  # 2.1 per replica: 5 % off
    assert replicas_for_metric(25.0, 2, 10, 0.1) == 13  # 2.5 per replica: 25 % off
    with pytest.raises(ValueError):
        replicas_for_metric(1.0, 2, 0, 0.1)


# Sequences: (time, current, totals) -> expected desired at each step.
SEQUENCES = [
    ("HPA_DOC Scaling policies: Pods 4 + Percent 10 per 60 s, Max: 80 -> 72 -> 64 (7.2 "
     "rounds to 8 removed), and 4 at a time below 40",
     ScalingRules(0, (RatePolicy("Pods", 4, 60), RatePolicy("Percent", 10, 60))),
     [(0, 80, 10, 72), (61, 72, 10, 64), (122, 64, 10, 57),
      (200, 40, 10, 36), (261, 36, 10, 32)]),
    ("HPA_DOC limit scale down: Percent 10 + Pods 5 per 60 s, Min: 5 at most",
     ScalingRules(0, (RatePolicy("Percent", 10, 60), RatePolicy("Pods", 5, 60)), "Min"),
     [(0, 80, 10, 75), (30, 75, 10, 75), (61, 75, 10, 70)]),
    ("HPA_DOC disable scale down: selectPolicy Disabled keeps the count",
     ScalingRules(0, (RatePolicy("Percent", 100, 15),), "Disabled"),
     [(0, 8, 1, 8), (100, 8, 1, 8)]),
]


@pytest.mark.parametrize("case, rules, steps", SEQUENCES, ids=[s[0][:40] for s in SEQUENCES])
def test_scale_down_rate_policies(case, rules, steps):
    """Target 1 per replica, so the raw recommendation is the total (10: "scaled down to 10")."""
    rule = policy(1, down=rules).rule()
    for at, current, total, expected in steps:
        assert rule.evaluate(float(at), current, (float(total),)).desired == expected, \
            f"{case}: t={at}"


def test_default_scale_up_adds_4_pods_or_100_percent_per_15_s_whichever_is_more():
    """HPA_DOC Default behavior: Percent 100 and Pods 4 per 15 s, selectPolicy Max."""
    rule = policy(1, up=DEFAULT_SCALE_UP).rule()
    assert rule.evaluate(0.0, 1, (20.0,)).desired == 5     # max(1 + 4, 1 * 2)
    assert rule.evaluate(5.0, 5, (20.0,)).desired == 5     # the period still holds the +4
    assert rule.evaluate(16.0, 5, (20.0,)).desired == 10   # max(5 + 4, 5 * 2)
    assert rule.evaluate(32.0, 10, (20.0,)).desired == 20  # max(14, 20)


def test_scale_down_window_keeps_the_highest_recommendation_in_it():
    """HPA_DOC Stabilization window: scale-down uses the highest desired state of the window."""
    down = ScalingRules(300, (RatePolicy("Percent", 100, 15),))
    rule = policy(1, down=down).rule()
    assert rule.evaluate(0.0, 5, (5.0,)).desired == 5
    assert rule.evaluate(100.0, 5, (2.0,)).desired == 5   # 5 is still in the window
    assert rule.evaluate(250.0, 5, (3.0,)).desired == 5
    assert rule.evaluate(301.0, 5, (2.0,)).desired == 3   # 5 left; highest left is 3
    assert rule.evaluate(551.0, 3, (2.0,)).desired == 2


def test_default_scale_down_window_is_300_s():
    """HPA_DOC Default behavior: scaleDown stabilizationWindowSeconds 300."""
    rule = policy(1, down=DEFAULT_SCALE_DOWN).rule()
    rule.evaluate(0.0, 4, (4.0,))
    assert rule.evaluate(299.0, 4, (1.0,)).desired == 4
    assert rule.evaluate(300.5, 4, (1.0,)).desired == 1


def test_scale_up_window_keeps_the_lowest_recommendation_in_it():
    """HPA_CODE stabilizeRecommendationWithBehaviors: upRecommendation is the window's min."""
    up = ScalingRules(60, (RatePolicy("Percent", 1000, 15),))
    rule = policy(1, up=up).rule()
    assert rule.evaluate(0.0, 2, (2.0,)).desired == 2
    assert rule.evaluate(10.0, 2, (8.0,)).desired == 2    # 2 is in the window
    assert rule.evaluate(61.0, 2, (8.0,)).desired == 8


@pytest.mark.parametrize("current, total, lo, hi, expected, reason", [
    (2, 40.0, 1, 4, 4, "maxReplicas"),
    (3, 0.0, 2, 10, 2, "minReplicas"),
    (6, 12.0, 1, 4, 4, "above maxReplicas"),
    (1, 1.0, 2, 4, 2, "below minReplicas"),
])
def test_min_and_max_clamp_last(current, total, lo, hi, expected, reason):
    decision = policy(2, lo=lo, hi=hi).rule().evaluate(0.0, current, (total,))
    assert (decision.desired, decision.reason) == (expected, reason)


def test_compression_divides_every_period_and_window():
    base = policy(1, up=DEFAULT_SCALE_UP, down=DEFAULT_SCALE_DOWN)
    fast = base.compressed(20)
    assert fast.polling_interval_seconds == pytest.approx(0.75)
    assert fast.scale_down.stabilization_window_seconds == pytest.approx(15)
    assert [p.period_seconds for p in fast.scale_up.policies] == [0.75, 0.75]
    assert fast.triggers == base.triggers and fast.max_replicas == base.max_replicas
    rule = fast.rule()  # the 300 s default window is 15 s on the compressed clock
    rule.evaluate(0.0, 4, (4.0,))
    assert rule.evaluate(14.0, 4, (1.0,)).desired == 4
    assert rule.evaluate(15.5, 4, (1.0,)).desired == 1
    with pytest.raises(ValueError):
        base.compressed(0)


@pytest.mark.parametrize("average, factor, query", [
    (0, 1, 'sum(m{namespace="ns"})'),
    (60, 1, 'sum(avg_over_time(m{namespace="ns"}[60s]))'),
    (60, 30, 'sum(avg_over_time(m{namespace="ns"}[2s]))'),
    (60, 80, 'sum(avg_over_time(m{namespace="ns"}[750ms]))'),
])
def test_an_averaged_trigger_compresses_its_range_like_every_other_window(average, factor, query):
    base = ScalingPolicy(1, 4, (Trigger("m", "ns", 2, average),), 15, DEFAULT_SCALE_UP,
                         DEFAULT_SCALE_DOWN)
    assert base.compressed(factor).triggers[0].query == query


def test_promql_duration_rejects_an_empty_range():
    with pytest.raises(ValueError, match="positive"):
        promql_duration(0.0004)
