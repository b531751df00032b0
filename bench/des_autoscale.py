"""Autoscaling in the discrete-event model: replicas that load, serve and drain under the HPA rule.

`simulate` replays a trace (bench/autoscale_trace.py's surge and ramp) through the discrete-event
model of bench/des.py (slots replicas for the CPU regime, vLLM's continuous batching for the
GPU regime) behind NGINX's least_conn, while `Autoscaler` plays the cluster around it:

* **Prometheus.** Every `Timing.scrape_s` it records each scraped replica's gauges (running,
  waiting: `llm_requests_*` or `vllm:num_requests_*`, as bench/des.py's `Gauges` say). Only
  serving replicas are scraped (a Service's endpoints hold Ready pods only), and a change of
  targets takes effect at Prometheus's next `Timing.targets_s` tick. A query is answered the
  way PromQL answers the policy's text: `sum(metric)` sums each scraped series' latest sample
  (a series whose target went away is stale and drops out); `sum(avg_over_time(metric[R]))`
  sums, over every series with samples in the last R seconds (a retired replica's included,
  until they age out), the mean of those samples.
* **The HPA.** Every `polling_interval_seconds` it asks each trigger's query and hands the
  values to `ScalingPolicy.rule()`, the very `HpaRule` local mode runs
  (components/policies/scaling.py: tolerance, stabilization windows, rate limits, clamps), with
  the replica count the scale target has (loading and serving, not draining).
* **Replicas.** An added replica loads for `Timing.start_s + Timing.load_s` and serves from the
  next housekeeping tick after that (`Timing.housekeeping_s`: local mode's check of `/ready`,
  a readiness probe in a cluster). A removed one is the newest still loading, else the
  highest-numbered serving one (as local mode's `retire_replica`; never the last serving
  one): it takes no new request from then on, finishes what it holds and is gone at the first
  housekeeping tick at which it holds nothing. Replica indexes are reused lowest first, as
  local mode reuses ports, so a new replica continues an old one's series.

Every time here is on one clock. For the regime itself that is the trace clock (factor 1,
no dilation); to mirror a live `python -m bench autoscale` run it is the run's wall clock (the
trace and the policy compressed by its factor, the replicas' steps dilated, plus the replica
process's own start, which does not compress): see `live_timing`.

Pure and deterministic: the same jobs, model, policy and timing give the same run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench import des
from components.engines import PROFILES
from components.policies.scaling import Decision, ScalingPolicy

WAITING_METRICS = frozenset(p.waiting_metric for p in PROFILES.values())
RUNNING_METRICS = frozenset(p.running_metric for p in PROFILES.values())


@dataclass(frozen=True)
class Timing:
    """How long the cluster takes to do things, on the run's clock (seconds)."""

    load_s: float
    """Model load: from a replica's start until it can serve."""
    start_s: float = 0.0
    """Before the load (live runs: the process's own start, which time compression does not
    shorten)."""
    start_shared: bool = False
    """Starts compete for the CPU: a replica's start takes `start_s` times the replicas loading
    when it is added, itself included (live runs on two shared cores: one replica starting alone
    took 1.1 s, each of three started together about 3 s)."""
    scrape_s: float = 15.0
    """Prometheus's scrape interval (the stack's monitoring.intervalSeconds)."""
    targets_s: float = 5.0
    """Prometheus applies a change of scrape targets on this tick (its scrape manager's fixed
    5 s, in wall seconds; a live run's replicas are targets on the wall clock too)."""
    housekeeping_s: float = 1.0
    """How often a ready replica is admitted and a drained one reaped (local mode: 0.2 s)."""
    lookback_s: float = 300.0
    """PromQL's lookback for an instant selector (a series with no sample this recent is gone)."""
    poll_phase: float = 0.0
    """Where in its interval the first poll falls, as a fraction in [0, 1): an autoscaler
    starts at no fixed point of the trace."""
    scrape_phase: float = 0.0
    """Where in its interval the first scrape falls: Prometheus's clock is its own, so the
    sample a poll reads is up to one scrape interval old."""

    def __post_init__(self) -> None:
        for name in ("scrape_s", "targets_s", "housekeeping_s", "lookback_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Timing.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("poll_phase", "scrape_phase"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"Timing.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.load_s < 0 or self.start_s < 0:
            raise ValueError(f"Timing.load_s and start_s must be >= 0, got {self.load_s!r}, "
                             f"{self.start_s!r}")


def live_timing(load_s: float, factor: float, start_wall_s: float,
                scrape_s: float = 15.0, phases: tuple[float, float] = (0.0, 0.0)) -> Timing:
    """The timing of a live `python -m bench autoscale` run on its wall clock: load and scrape
    compressed by `factor` (its scrape interval has a 0.25 s floor), the process start
    (`start_wall_s` per replica starting at the time) not; `phases` are the poll's and the
    scrape's."""
    return Timing(load_s=load_s / factor, start_s=start_wall_s, start_shared=True,
                  scrape_s=max(0.25, scrape_s / factor), targets_s=5.0, housekeeping_s=0.2,
                  poll_phase=phases[0], scrape_phase=phases[1])


@dataclass
class Replica:
    index: int
    added: float
    ready: float
    """When it can serve (added + start + load; 0 for the replicas a run starts with)."""
    serving_at: float | None = None
    retired: float | None = None
    gone: float | None = None

    @property
    def state(self) -> str:
        if self.gone is not None:
            return "gone"
        if self.retired is not None:
            return "draining"
        return "serving" if self.serving_at is not None else "loading"

    def state_at(self, t: float) -> str:
        """Its state at `t` ("absent" before it was added)."""
        if t < self.added:
            return "absent"
        if self.gone is not None and t >= self.gone:
            return "gone"
        if self.retired is not None and t >= self.retired:
            return "draining"
        if self.serving_at is not None and t >= self.serving_at:
            return "serving"
        return "loading"


@dataclass
class _Series:
    """One replica's scraped samples: (time, running, waiting)."""

    samples: list[tuple[float, int, int]] = field(default_factory=list)
    stale: bool = False


class Autoscaler:
    """The cluster around the replicas (a `des.Membership`): Prometheus, the HPA, and the
    replicas' lifecycle. `policy` None keeps `initial` replicas (a static run)."""

    def __init__(self, policy: ScalingPolicy | None, timing: Timing, initial: int, pool: int,
                 ) -> None:
        if not 1 <= initial <= pool:
            raise ValueError(f"initial replicas must be in 1..{pool}, got {initial}")
        self.policy = policy
        self.timing = timing
        self.pool = pool
        self.rule = policy.rule() if policy is not None else None
        self.replicas: list[Replica] = [Replica(i, 0.0, 0.0, serving_at=0.0)
                                        for i in range(initial)]
        self.decisions: list[Decision] = []
        self.events: list[tuple[float, str, int]] = []
        """(time, "added" | "serving" | "retired" | "drained", replica index), as local mode's
        autoscaler reports them."""
        self.drain_overruns = 0
        self._series: dict[int, _Series] = {}
        self._targets: frozenset[int] = frozenset(range(initial))
        self._pending_targets: frozenset[int] | None = None
        self._clocks = {
            "scrape": timing.scrape_phase * timing.scrape_s, "targets": math.inf, "house": 0.0,
            "poll": timing.poll_phase * policy.polling_interval_seconds if policy is not None
            else math.inf}
        self._mask = sum(1 << i for i in range(initial))
        self._gauges: des.Gauges = lambda _r: (0, 0)

    # --- des.Membership ---

    def next_time(self) -> float:
        return min(self._clocks.values())

    def tick(self, t: float, gauges: des.Gauges) -> int:
        self._gauges = gauges
        c, tm = self._clocks, self.timing
        # Order at one instant: targets change, replicas turn ready or go, scrape, then the HPA.
        if c["targets"] <= t:
            c["targets"] = math.inf
            self._apply_targets()
        if c["house"] <= t:
            c["house"] = t + tm.housekeeping_s
            self._housekeeping(t)
        if c["scrape"] <= t:
            c["scrape"] = t + tm.scrape_s
            for i in self._targets:
                running, waiting = gauges(i)
                self._series.setdefault(i, _Series()).samples.append((t, running, waiting))
        if c["poll"] <= t:
            assert self.policy is not None
            c["poll"] = t + self.policy.polling_interval_seconds
            self._poll(t)
        return self._mask

    # --- the cluster ---

    @property
    def current(self) -> int:
        """The scale target's replica count: loading and serving (not draining)."""
        return sum(1 for r in self.replicas if r.state in ("loading", "serving"))

    def query(self, metric: str, average_s: float, t: float) -> float:
        """What Prometheus answers at `t` for the policy's query of `metric`."""
        if metric in WAITING_METRICS:
            col = 2
        elif metric in RUNNING_METRICS:
            col = 1
        else:
            raise ValueError(f"no gauge models {metric!r} (known: "
                             f"{', '.join(sorted(WAITING_METRICS | RUNNING_METRICS))})")
        total = 0.0
        for series in self._series.values():
            if average_s > 0:
                window = [s[col] for s in series.samples if t - average_s < s[0] <= t]
                if window:
                    total += sum(window) / len(window)
            elif not series.stale and series.samples \
                    and series.samples[-1][0] > t - self.timing.lookback_s:
                total += series.samples[-1][col]
        return total

    def _poll(self, t: float) -> None:
        assert self.policy is not None and self.rule is not None
        values = tuple(self.query(tr.metric, tr.average_seconds, t)
                       for tr in self.policy.triggers)
        current = self.current
        decision = self.rule.evaluate(t, current, values)
        self.decisions.append(decision)
        added = [self._add(t) for _ in range(decision.desired - current)]
        tm = self.timing
        loading = sum(1 for r in self.replicas if r.state == "loading")
        for r in added:  # every start of this poll competes with the others loading
            r.ready = t + tm.start_s * (loading if tm.start_shared else 1) + tm.load_s
        for _ in range(current - decision.desired):
            self._retire(t)

    def _add(self, t: float) -> Replica:
        used = {r.index for r in self.replicas if r.state != "gone"}
        free = [i for i in range(self.pool) if i not in used]
        if not free:
            raise RuntimeError(f"more than {self.pool} replicas alive at t={t:g}: raise the pool")
        replica = Replica(free[0], t, math.inf)
        self.replicas.append(replica)
        self.events.append((t, "added", free[0]))
        return replica

    def _retire(self, t: float) -> None:
        loading = [r for r in self.replicas if r.state == "loading"]
        serving = [r for r in self.replicas if r.state == "serving"]
        if loading:
            victim = max(loading, key=lambda r: r.index)
            victim.retired = victim.gone = t  # stopped before it served: nothing to drain
        elif len(serving) > 1:
            victim = max(serving, key=lambda r: r.index)
            victim.retired = t
            self._mask &= ~(1 << victim.index)
            self._retarget(t)
        else:
            return
        self.events.append((t, "retired", victim.index))

    def _housekeeping(self, t: float) -> None:
        changed = False
        for r in self.replicas:
            if r.state == "loading" and r.ready <= t:
                r.serving_at = t
                self._mask |= 1 << r.index
                self.events.append((t, "serving", r.index))
                changed = True
            elif r.state == "draining" and self._gauges(r.index) == (0, 0):
                r.gone = t
                self.events.append((t, "drained", r.index))
        if changed:
            self._retarget(t)

    def _retarget(self, t: float) -> None:
        self._pending_targets = frozenset(r.index for r in self.replicas
                                          if r.state == "serving")
        if self._clocks["targets"] == math.inf:
            tick = self.timing.targets_s
            self._clocks["targets"] = (math.floor(t / tick) + 1) * tick

    def _apply_targets(self) -> None:
        new = self._pending_targets or frozenset()
        for i in self._targets - new:  # the target went away: its series is stale
            if i in self._series:
                self._series[i].stale = True
        for i in new - self._targets:
            if i in self._series:
                self._series[i].stale = False
        self._targets = new
        self._pending_targets = None

    def run_until(self, end: float) -> None:
        """Go on ticking, with every replica idle, until `end` (after the last request)."""
        idle: des.Gauges = lambda _r: (0, 0)
        while self.next_time() <= end:
            self.tick(self.next_time(), idle)

    # --- figures ---

    def replica_seconds(self, end: float) -> float:
        """Replicas that existed (loading, serving, draining) integrated over [0, end]."""
        total = 0.0
        for r in self.replicas:
            stop = r.gone if r.gone is not None else end
            total += max(0.0, min(stop, end) - min(r.added, end))
        return total

    def timeline(self, end: float) -> list[tuple[float, int, int, int]]:
        """(time, loading, serving, draining) at 0 and at every change up to `end`."""
        marks = sorted({0.0, *(t for t, _, _ in self.events if t <= end)})
        out = []
        for t in marks:
            states = [r.state_at(t) for r in self.replicas]
            out.append((t, states.count("loading"), states.count("serving"),
                        states.count("draining")))
        return out

    def first_added_serving(self, since: float) -> float | None:
        """Seconds from `since` to the first replica added at or after it serving."""
        added = [t for t, kind, _ in self.events if kind == "added" and t >= since]
        if not added:
            return None
        serving = [t for t, kind, _ in self.events if kind == "serving" and t >= added[0]]
        return serving[0] - since if serving else None

    def max_replicas_seen(self) -> int:
        """Most replicas the scale target had at once (loading and serving)."""
        return max(loading + serving for _, loading, serving, _ in self.timeline(math.inf))


@dataclass(frozen=True)
class Outcome:
    """One modelled run; times on the run's clock."""

    jobs: Sequence[des.Job]
    result: des.Result
    scaler: Autoscaler
    end: float
    """The trace's end."""

    @property
    def lost(self) -> int:
        """Requests that never got their last token (none should)."""
        return sum(1 for x in self.result.e2e if not math.isfinite(x))

    def slo_share(self, slo_s: float) -> float:
        if not self.jobs:
            return math.nan
        return sum(1 for x in self.result.ttft if x <= slo_s) / len(self.jobs)

    def tpot(self) -> list[float]:
        """Mean seconds per output token after the first, per request with two or more."""
        return [(e - f) / (j.max_tokens - 1) for j, f, e in
                zip(self.jobs, self.result.ttft, self.result.e2e) if j.max_tokens > 1]

    def share_within(self, ttft_s: float, tpot_s: float) -> float:
        """Requests whose first token came within `ttft_s` and whose later tokens came at
        `tpot_s` or better on average."""
        good = 0
        for j, f, e in zip(self.jobs, self.result.ttft, self.result.e2e):
            if f <= ttft_s and (j.max_tokens <= 1 or (e - f) / (j.max_tokens - 1) <= tpot_s):
                good += 1
        return good / len(self.jobs) if self.jobs else math.nan

    def replica_seconds(self) -> float:
        return self.scaler.replica_seconds(self.end)


def simulate(jobs: Sequence[des.Job], params: des.Params | des.BatchedParams,
             policy: ScalingPolicy | None, timing: Timing, *, initial: int | None = None,
             end: float | None = None, dispatcher: str = "least_conn", seed: int = 0
             ) -> Outcome:
    """Replay `jobs` through replicas of `params` (its `replicas` is ignored: the pool is sized
    from the policy) scaled by `policy` (None: `initial` replicas throughout)."""
    if policy is None and initial is None:
        raise ValueError("a static run needs `initial` replicas")
    start = policy.min_replicas if initial is None else initial  # type: ignore[union-attr]
    most = policy.max_replicas if policy is not None else start
    pool = 2 * max(most, start) + 2  # serving and loading ones, plus those still draining
    scaler = Autoscaler(policy, timing, start, pool)
    sized = des.BatchedParams(pool, params.config, params.step_seconds) \
        if isinstance(params, des.BatchedParams) else \
        des.Params(pool, params.slots, params.prefill_base_s, params.prefill_per_token_s,
                   params.decode_base_s, params.decode_per_seq_s)
    result = des.simulate(jobs, sized, dispatcher, seed=seed, membership=scaler)
    stop = end if end is not None else (jobs[-1].arrival if jobs else 0.0)
    scaler.run_until(stop)
    return Outcome(jobs, result, scaler, stop)
