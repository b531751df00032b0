"""The autoscaling benchmark's pure parts: the time-varying trace and the figures of a run."""

from __future__ import annotations

import math

import pytest

from bench.autoscale import best_setting, policy_for
from bench.autoscale_report import Run, Setting
from bench.autoscale_trace import RAMP, SURGE, build
from bench.stats import Record
from local.autoscaler import Sample


def test_surge_trace_offers_five_times_the_quiet_rate_compressed_by_the_factor():
    timed = build(SURGE, factor=30, capacity=2.0, seed=3)
    assert timed.wall_seconds == pytest.approx(80)
    counts = {p.name: 0 for p in SURGE.phases}
    for req in timed.requests:
        counts[timed.phase_of(req.arrival)] += 1
    # Expected: quiet 20 s x 1 req/s, surge 30 s x 5 req/s, after 30 s x 1 req/s.
    assert counts["surge"] == pytest.approx(150, rel=0.25)
    assert counts["quiet"] == pytest.approx(20, rel=0.6)
    assert counts["after"] == pytest.approx(30, rel=0.5)
    assert build(SURGE, 30, 2.0, 3) == timed  # seeded
    assert timed.phase_start("surge") == pytest.approx(20)


def test_ramp_rises_linearly_to_the_same_peak():
    assert RAMP.load_at(0) == 0.5
    assert RAMP.load_at(300 + 450) == pytest.approx(1.5)
    assert RAMP.load_at(1200) == pytest.approx(2.5)
    assert RAMP.peak == SURGE.peak == 2.5


def _run(events=(), samples=(), records=(), replicas=None) -> Run:
    timed = build(SURGE, factor=30, capacity=2.0, seed=1)
    setting = Setting("x", replicas=replicas)
    return Run(setting, timed, 30.0, list(records), t0=100.0, samples=list(samples),
               events=list(events))


def _rec(sent: float, *, ok: bool, ttft: float = 0.1) -> Record:
    rec = Record(0, "u", scheduled=sent, sent=sent)
    if ok:
        rec.first, rec.last, rec.status, rec.done, rec.tokens = sent + ttft, sent + 1, 200, True, 3
    else:
        rec.status, rec.error = 502, "HTTP 502"
    return rec


def test_replica_seconds_integrate_loading_serving_and_draining_replicas():
    samples = [Sample(0, 1, 0, 0, 0, 0), Sample(20, 1, 2, 0, 5, 8), Sample(25, 3, 0, 0, 0, 8),
               Sample(50, 1, 0, 2, 0, 2), Sample(55, 1, 0, 0, 0, 1)]
    run = _run(samples=samples)
    wall = 20 * 1 + 5 * 3 + 25 * 3 + 5 * 3 + 25 * 1
    assert run.replica_seconds() == pytest.approx(wall * 30)
    assert _run(replicas=4).replica_seconds() == 4 * SURGE.seconds


def test_failures_count_against_scale_down_only_near_a_retirement():
    records = [_rec(130.0, ok=False), _rec(160.5, ok=False), _rec(170.0, ok=False),
               _rec(140.0, ok=True)]
    run = _run(events=[(60.0, "retired", 2)], records=records)
    # In flight at t=60 (sent 130-100=30, no reply: counted until +120 s), and sent 0.5 s
    # after it; the one sent 10 s after is not the retirement's.
    assert run.failed == 3
    assert run.failed_by_scale_down() == 2
    assert _run(records=records).failed_by_scale_down() == 0


def test_slo_share_counts_failures_as_misses_and_first_serving_is_measured_from_the_phase():
    records = [_rec(101, ok=True, ttft=0.5), _rec(102, ok=True, ttft=3.0), _rec(103, ok=False)]
    run = _run(records=records, events=[(21.0, "added", 1), (23.5, "serving", 1)])
    assert run.slo_share(2.0) == pytest.approx(1 / 3)
    assert run.first_added_serving("surge") == pytest.approx((23.5 - 20) * 30)
    assert _run().first_added_serving("surge") is None
    assert math.isnan(_run().slo_share(2.0))


def test_best_setting_stays_within_the_cost_budget():
    static_max = _run(replicas=4)
    cheap = _run(replicas=2, records=[_rec(101, ok=True)] * 9 + [_rec(102, ok=False)])
    dear = _run(replicas=3, records=[_rec(101, ok=True)] * 10)
    assert best_setting([cheap, dear], static_max, 2.0) is cheap  # 75 % is over budget


def test_benchmarked_policy_is_the_stack_policy_compressed():
    policy = policy_for(Setting("a", None, target_waiting=3, target_running=5, window_s=600),
                        factor=30)
    assert [t.threshold for t in policy.triggers] == [3, 5]
    assert policy.scale_down.stabilization_window_seconds == pytest.approx(20)
    assert policy.polling_interval_seconds == pytest.approx(0.5)
    assert policy.triggers[0].query == 'sum(llm_requests_waiting{namespace="llm-serving"})'
    # The running trigger's 60 s average is a window too: compressed alike.
    assert policy.triggers[1].query == (
        'sum(avg_over_time(llm_requests_running{namespace="llm-serving"}[2s]))')


def test_conclusion_says_whether_the_target_is_reached_and_a_quick_run_is_a_smoke_test():
    from argparse import Namespace

    from bench.autoscale import conclusion

    ok = [_rec(101 + i, ok=True) for i in range(98)]
    static_max = _run(replicas=4, records=ok + [_rec(200, ok=True)] * 2)
    two = [Sample(0, 2, 0, 0), Sample(80, 2, 0, 0)]  # 2 replicas throughout: 50 % of the cost
    near = _run(samples=two, records=ok + [_rec(200, ok=False)] * 2,
                events=[(30.0, "added", 1), (60.0, "retired", 1)])
    far = _run(samples=two, records=ok[:90] + [_rec(200, ok=False)] * 10)
    full = Namespace(quick=False, slo=2.0)
    assert conclusion(near, static_max, full, 10, 0) == (
        "Conclusion: at 10x compression, autoscaling (auto waiting 2, running 6 (avg 60 s), "
        "window 300 s) gave 98.0% of requests their first token within 2 s, against 100.0% "
        "with 4 replicas always on, at 50% of their replica-seconds (target: within 3 points "
        "at <= 70% of the cost, reached); no request failed because of a scale-down.")
    assert "(target: within 3 points at <= 70% of the cost, not reached); 3 requests failed " \
           "because of a scale-down (bar: none)." in conclusion(far, static_max, full, 30, 3)
    quick = conclusion(near, static_max, Namespace(quick=True, slo=2.0), 80, 0)
    assert quick.startswith("Conclusion (smoke test at 80x): the autoscaling path works end to "
                            "end (1 replica(s) added and 1 retired")
    assert "its SLO share is not a measurement" in quick and "--factor 10" in quick
