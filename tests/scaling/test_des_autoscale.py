"""The autoscaling model (bench/des_autoscale.py) against cases worked by hand, and the hooks it
uses in the discrete-event model (bench/des.py, `Membership`).

The hand-worked model: slots replicas with one slot and requests of one token whose prefill
takes exactly `SERVICE_S`, so each request holds the replica's slot for `SERVICE_S` seconds and
the gauges are the number of requests admitted (running) and queued (waiting)."""

from __future__ import annotations

import math

import pytest

from bench import des
from bench import des_autoscale as da
from bench.autoscale_trace import SURGE, build
from components.engines import PROFILES
from components.policies import scaling
from components.policies.scaling import AutoscalingConfig, ScalingPolicy

SERVICE_S = 10.0
ONE_SLOT = des.Params(1, 1, SERVICE_S, 0.0, 0.05, 0.0)
TIMING = da.Timing(load_s=30.0, scrape_s=5.0, targets_s=5.0, housekeeping_s=1.0)
VLLM = PROFILES["vllm"]


def policy(**kw: int) -> ScalingPolicy:
    cfg = AutoscalingConfig(enabled=True, **{"target_running_per_replica": 1000, **kw})
    return ScalingPolicy.from_config(cfg, waiting_metric=VLLM.waiting_metric,
                                     running_metric=VLLM.running_metric, namespace="t",
                                     scale_down_window_seconds=300)


def burst(at: float, n: int) -> list[des.Job]:
    return [des.Job(at, 10, 1) for _ in range(n)]


def events(out: da.Outcome, kind: str) -> list[float]:
    return [t for t, k, _ in out.scaler.events if k == kind]


def test_a_step_surge_adds_replicas_at_the_poll_after_the_threshold_and_serves_after_the_load():
    # Polls at 0, 15, ..., 90, 105; scrapes every 5 s. Five requests at t = 101: one runs, four
    # wait. The poll at 90 sees nothing; the scrape at 105 sees 4 waiting, and the poll right
    # after it asks for ceil(4 / 1) = 4 replicas. They serve from the first housekeeping tick
    # after 105 + 30 s of load, not before.
    out = da.simulate(burst(101.0, 5), ONE_SLOT, policy(target_waiting_per_replica=1), TIMING,
                      end=200.0)
    at_90 = next(d for d in out.scaler.decisions if d.at == 90.0)
    assert (at_90.metrics, at_90.desired) == ((0.0, 0.0), 1)
    at_105 = next(d for d in out.scaler.decisions if d.at == 105.0)
    assert at_105.metrics[0] == 4.0 and at_105.desired == 4
    assert events(out, "added") == [105.0, 105.0, 105.0]
    assert events(out, "serving") == [135.0, 135.0, 135.0]
    assert out.scaler.first_added_serving(100.0) == pytest.approx(35.0)
    # Nginx does not move queued requests: the four wait on the first replica, one after another.
    assert out.result.ttft == pytest.approx([SERVICE_S * k for k in range(1, 6)])
    assert out.result.replica == [0] * 5
    assert out.lost == 0


def test_a_poll_reads_the_last_scraped_sample_not_the_replica_now():
    # Scrapes at 2.5, 7.5, ..., 102.5, 107.5, ...; polls at 0, 15, ..., 105, 120. The burst at
    # 103 is after the scrape of 102.5: the poll at 105 sees no queue; the one at 120 reads the
    # scrape of 117.5.
    timing = da.Timing(load_s=30.0, scrape_s=5.0, targets_s=5.0, housekeeping_s=1.0,
                       scrape_phase=0.5)
    out = da.simulate(burst(103.0, 5), ONE_SLOT, policy(target_waiting_per_replica=1), timing,
                      end=200.0)
    assert next(d for d in out.scaler.decisions if d.at == 105.0).metrics == (0.0, 0.0)
    assert events(out, "added")[0] == 120.0


def test_a_higher_waiting_target_asks_for_fewer_replicas():
    out = da.simulate(burst(101.0, 5), ONE_SLOT, policy(target_waiting_per_replica=2), TIMING,
                      end=200.0)
    assert events(out, "added") == [105.0]  # ceil(4 / 2) = 2 replicas


def test_the_scale_up_rate_limit_adds_one_replica_per_period():
    pol = policy(target_waiting_per_replica=1, scale_up_pods=1, scale_up_period_seconds=15)
    out = da.simulate(burst(101.0, 8), ONE_SLOT, pol, TIMING, end=200.0)
    assert events(out, "added") == [105.0, 120.0, 135.0]
    assert [d.reason for d in out.scaler.decisions if d.at in (105.0, 120.0)] == \
        ["scale-up policy", "scale-up policy"]


def test_the_stabilization_window_holds_replicas_then_the_rate_limit_removes_one_per_minute():
    # 4 asked for at 105; nothing after the queue empties. The window keeps the highest
    # recommendation of the last 300 s: the first poll that no longer sees 105 is 405 (a
    # recommendation counts while at > now - window). Then one replica per 60 s, down to 1.
    out = da.simulate(burst(101.0, 5), ONE_SLOT, policy(target_waiting_per_replica=1), TIMING,
                      end=700.0)
    assert events(out, "retired") == [405.0, 465.0, 525.0]
    assert [d.reason for d in out.scaler.decisions if d.at == 390.0] == \
        ["scale-down stabilization window"]
    assert [d.reason for d in out.scaler.decisions if d.at == 450.0] == ["scale-down policy"]
    # Idle replicas are reaped at the next housekeeping tick (1 s later: at one instant the
    # housekeeping comes before the poll).
    assert events(out, "drained") == [406.0, 466.0, 526.0]
    # Cost: 1 replica for 700 s, 3 more from 105 until they were gone.
    assert out.replica_seconds() == pytest.approx(700 + (406 - 105) + (466 - 105) + (526 - 105))


def shrinking() -> ScalingPolicy:
    """Scale down at once (no window) on anything short of 100 waiting per replica."""
    return ScalingPolicy.from_config(
        AutoscalingConfig(enabled=True, min_replicas=1, target_waiting_per_replica=100,
                          target_running_per_replica=1000),
        waiting_metric=VLLM.waiting_metric, running_metric=VLLM.running_metric, namespace="t",
        scale_down_window_seconds=0)


HALF = da.Timing(load_s=30.0, scrape_s=5.0, targets_s=5.0, housekeeping_s=1.0,
                 poll_phase=0.5, scrape_phase=0.5)
"""Polls at 7.5, 22.5, ...; scrapes at 2.5, 7.5, ..."""


def test_a_retired_replica_finishes_what_it_holds_and_nothing_is_lost():
    # Two replicas; eight requests at 1.5 s split four and four (least_conn). The poll at 7.5
    # retires replica 1 while three of its requests still wait there: it takes no new request,
    # serves its queue (until 1.5 + 4 x 10 s) and is reaped at the next housekeeping tick.
    jobs = burst(1.5, 8) + [des.Job(20.0, 10, 1)]
    out = da.simulate(jobs, ONE_SLOT, shrinking(), HALF, initial=2, end=100.0)
    assert out.lost == 0
    assert events(out, "retired") == [7.5]
    assert out.result.replica[:8] == [0, 1] * 4
    assert out.result.replica[8] == 0  # after the retirement only replica 0 takes requests
    last_on_1 = max(j.arrival + e for j, e, r in zip(jobs, out.result.e2e, out.result.replica)
                    if r == 1)
    assert last_on_1 == pytest.approx(41.5)
    assert events(out, "drained") == [42.0]
    assert out.replica_seconds() == pytest.approx(100.0 + 42.0)


def test_the_running_trigger_reads_the_average_of_the_scraped_samples():
    s = da.Autoscaler(None, da.Timing(load_s=0.0, scrape_s=5.0), initial=2, pool=4)
    gauges = {0: (4, 1), 1: (8, 0)}
    for t in (0.0, 5.0, 10.0):
        s.tick(t, lambda r: gauges[r])
    gauges = {0: (0, 0), 1: (2, 3)}
    s.tick(15.0, lambda r: gauges[r])
    # avg_over_time over (-5, 15]: replica 0 (4, 4, 4, 0) -> 3, replica 1 (8, 8, 8, 2) -> 6.5.
    assert s.query(VLLM.running_metric, 20.0, 15.0) == pytest.approx(9.5)
    assert s.query(VLLM.running_metric, 10.0, 15.0) == pytest.approx(2.0 + 5.0)  # (5, 15]
    assert s.query(VLLM.running_metric, 0.0, 15.0) == 2.0  # the instant value: the last sample
    assert s.query(VLLM.waiting_metric, 0.0, 15.0) == 3.0
    with pytest.raises(ValueError, match="no gauge models"):
        s.query("vllm:gpu_cache_usage_perc", 0.0, 15.0)


def test_a_retired_replicas_series_leaves_the_instant_sum_but_stays_in_the_average():
    # Four requests at 1.5 s: each replica runs one and queues one until 21.5 s. Replica 1 is
    # retired at 7.5 s and keeps running; Prometheus drops its target at its next 5 s tick
    # (10 s). At 21 s the instant sum has replica 0's last sample only, while the 30 s average
    # still holds replica 1's samples of 2.5 and 7.5 s.
    out = da.simulate(burst(1.5, 4), ONE_SLOT, shrinking(), HALF, initial=2, end=21.0)
    s = out.scaler
    assert events(out, "retired") == [7.5]
    assert s._series[1].stale and [x[0] for x in s._series[1].samples] == [2.5, 7.5]
    assert s.query(VLLM.running_metric, 0.0, 21.0) == 1.0
    assert s.query(VLLM.running_metric, 30.0, 21.0) == pytest.approx(2.0)
    assert s.query(VLLM.running_metric, 5.0, 21.0) == pytest.approx(1.0)  # aged out


def test_it_runs_the_same_hpa_rule_as_local_mode(monkeypatch):
    calls: list[tuple[float, int, tuple[float, ...]]] = []
    real = scaling.HpaRule.evaluate

    def spy(self, now, current, metrics):
        calls.append((now, current, tuple(metrics)))
        return real(self, now, current, metrics)

    monkeypatch.setattr(scaling.HpaRule, "evaluate", spy)
    out = da.simulate(burst(101.0, 5), ONE_SLOT, policy(target_waiting_per_replica=1), TIMING,
                      end=200.0)
    assert [(d.at, d.current, d.metrics) for d in out.scaler.decisions] == calls
    assert len(calls) == 14  # polls at 0, 15, ..., 195

    # Local mode's autoscaler goes through the same method (fake cluster and Prometheus).
    from local.autoscaler import LocalAutoscaler

    class Prom:
        def set_targets(self, ports): pass

        def query(self, text): return 4.0 if "waiting" in text else 0.0

    class Cluster:
        replicas, serving_ports = 1, [1]

        def add_replica(self): return 1

    calls.clear()
    LocalAutoscaler(Cluster(), Prom(), policy(target_waiting_per_replica=1)).step()
    assert len(calls) == 1 and calls[0][1:] == (1, (4.0, 0.0))


def test_static_runs_keep_their_replicas_and_cost_them():
    out = da.simulate(burst(1.0, 3), ONE_SLOT, None, TIMING, initial=3, end=50.0)
    assert out.scaler.decisions == [] and out.scaler.events == []
    assert out.replica_seconds() == 150.0
    assert sorted(out.result.replica) == [0, 1, 2]


def test_continuous_batching_replicas_join_and_leave_too():
    from server.engines.scheduler import SchedulerConfig
    from server.engines.steps import StepBatch

    def cost(batch: StepBatch) -> float:
        return 0.02 + 0.001 * batch.sequences

    params = des.BatchedParams(1, SchedulerConfig(kv_cache_tokens=65_536, max_model_len=2048,
                                                  max_num_seqs=4, max_num_batched_tokens=512),
                               cost)
    jobs = [des.Job(100.0 + 0.01 * i, 50, 200) for i in range(40)]
    out = da.simulate(jobs, params, policy(target_waiting_per_replica=1), TIMING, end=600.0)
    assert out.lost == 0
    assert events(out, "added") and min(events(out, "added")) == 105.0
    assert min(events(out, "serving")) == 135.0
    assert set(out.result.replica) == {0}  # all arrived before a new replica served


def test_membership_needs_a_replica_and_a_new_one_must_start_empty():
    class Nobody:
        def next_time(self): return math.inf

        def tick(self, t, gauges): return 0

    with pytest.raises(RuntimeError, match="no replica takes requests"):
        des.simulate(burst(1.0, 1), ONE_SLOT, "least_conn", membership=Nobody())

    class Flapping:
        """Replica 0 leaves while busy and comes back at once: not a new process."""

        def __init__(self): self.times = [0.0, 2.0, 3.0]

        def next_time(self): return self.times[0] if self.times else math.inf

        def tick(self, t, gauges):
            self.times.pop(0)
            return {0.0: 0b01, 2.0: 0b10, 3.0: 0b11}[t]

    params = des.Params(2, 1, SERVICE_S, 0.0, 0.05, 0.0)
    with pytest.raises(RuntimeError, match="joined while holding requests"):
        des.simulate(burst(1.0, 1), params, "least_conn", membership=Flapping())


def test_fcfs_feeds_a_joining_replica_from_the_central_queue():
    class Joins:
        def __init__(self): self.times = [0.0, 5.0]

        def next_time(self): return self.times[0] if self.times else math.inf

        def tick(self, t, gauges):
            self.times.pop(0)
            return 0b01 if t == 0.0 else 0b11

    params = des.Params(2, 1, SERVICE_S, 0.0, 0.05, 0.0)
    res = des.simulate(burst(1.0, 3), params, "fcfs", membership=Joins())
    assert res.replica == [0, 1, 0]
    assert res.ttft == pytest.approx([10.0, 14.0, 20.0])


def test_the_trace_without_texts_is_the_same_trace():
    full = build(SURGE, 60.0, 3.0, 11)
    lean = build(SURGE, 60.0, 3.0, 11, texts=False)
    assert [(r.arrival, r.prompt_tokens, r.max_tokens) for r in full.requests] == \
        [(r.arrival, r.prompt_tokens, r.max_tokens) for r in lean.requests]
    assert all(r.messages == () for r in lean.requests)


def test_bad_timing_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="Timing.scrape_s"):
        da.Timing(load_s=1.0, scrape_s=0.0)
    with pytest.raises(ValueError, match="Timing.scrape_phase"):
        da.Timing(load_s=1.0, scrape_phase=1.0)
