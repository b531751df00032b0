"""Fault drills: rolling restart, crash, overload and nginx reload, each under load."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.faults.load import (
    in_flight,
    rss_bytes,
    run_load,
    wait_idle,
    wait_serving,
)
from bench.faults.model import (
    MIB,
    REENTRY_SERVED,
    DrillModel,
    DrillResult,
    count,
    crash_checks,
    failed_after,
    overload_bounds,
    overload_checks,
    zero_failure_checks,
)
from bench.stats import Record


# --- drills ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    rate: float
    """Steady load, requests/s (well under capacity)."""
    min_requests: int
    """For rolling restart and reload (the bar's 500 in the full run)."""
    crash_requests: int
    overload_seconds: float
    max_seconds: float = 150.0


def say(msg: str) -> None:
    print(msg, flush=True)


def _line(r: DrillResult) -> str:
    c = r.counts
    return (f"[{r.drill}] sent {c.sent}, succeeded {c.succeeded}, failed {c.failed}, 429 "
            f"{c.rejected} ({r.seconds:.0f} s): {r.verdict}")


def _failure_samples(records: Sequence[Record], limit: int = 5) -> list[str]:
    bad = [r for r in records if not r.ok]
    return [f"request {r.index}: {r.error}" for r in bad[:limit]]


def drill_rolling(cluster: Any, model: DrillModel, plan: Plan, seed: int) -> DrillResult:
    urls = cluster.replica_urls
    ft = cluster.policy.fail_timeout_seconds
    log: list[str] = []

    def action() -> None:
        for i in range(len(urls)):
            t = time.monotonic()
            cluster.restart_replica(i, timeout=60)
            ready = time.monotonic() - t
            # nginx counted the draining 503s as failures (max_fails=1), so it skips the
            # replica for fail_timeout, then sends it ONE probe request and keeps skipping it
            # until that probe has *finished*. Taking the next replica down before then can
            # leave no live upstream (502s with 2 replicas; see docs/reliability.md). A second
            # request routed to the new process proves nginx re-admitted it.
            n = wait_serving(urls[i], timeout=ft + 15, since=REENTRY_SERVED - 1)
            log.append(f"replica {i + 1}: ready {ready:.1f} s after SIGTERM, back in nginx's "
                       f"rotation after {time.monotonic() - t:.1f} s ({n:g} served)")
            if n < REENTRY_SERVED:
                raise RuntimeError(f"replica {i + 1} did not get traffic after its restart")

    t0 = time.monotonic()
    run = asyncio.run(run_load(cluster.endpoint + "/chat/completions", cluster.model_name,
                               cluster.api_key, rate=plan.rate, min_requests=plan.min_requests,
                               max_seconds=plan.max_seconds,
                               tokens=(model.tokens_low, model.tokens_high), seed=seed,
                               action=action, action_at=2.0))
    counts = count(run.records)
    res = DrillResult("rolling restart", counts, f"0 failed of >= {plan.min_requests}",
                      zero_failure_checks(counts, plan.min_requests, run.action_done),
                      log + _failure_samples(run.records), time.monotonic() - t0)
    if run.action_error:
        res.notes.append(f"restart error: {run.action_error!r}")
    return res


def drill_crash(cluster: Any, model: DrillModel, plan: Plan, seed: int,
                fail_timeout: int = 2) -> DrillResult:
    urls = cluster.replica_urls
    victim = 0
    info: dict[str, Any] = {}
    default_policy = cluster.policy
    # Short passive-health window for this drill, so the restarted replica is retried after
    # 2 s instead of the default 10 s (restored afterwards). Reloading an idle nginx.
    cluster.reload_nginx(policy=default_policy.model_copy(
        update={"fail_timeout_seconds": fail_timeout}))

    def action() -> None:
        info["inflight"] = in_flight(urls[victim])
        cluster.kill_replica(victim)
        info["killed_at"] = time.monotonic()
        time.sleep(2.0)  # the others carry the load alone for a while
        cluster.start_replica(victim, timeout=60)
        info["restarted_at"] = time.monotonic()
        info["served"] = wait_serving(urls[victim], timeout=fail_timeout + 10)

    t0 = time.monotonic()
    try:
        run = asyncio.run(run_load(cluster.endpoint + "/chat/completions", cluster.model_name,
                                   cluster.api_key, rate=plan.rate,
                                   min_requests=plan.crash_requests,
                                   max_seconds=plan.max_seconds,
                                   tokens=(model.tokens_low, model.tokens_high), seed=seed,
                                   action=action, action_at=3.0, tail_seconds=2.0))
    finally:
        if cluster.replica_pids[victim] is None:
            cluster.start_replica(victim, timeout=60)
        cluster.reload_nginx(policy=default_policy)
    counts = count(run.records)
    killed_at = info.get("killed_at", math.inf)
    after = failed_after(run.records, killed_at)
    checks = crash_checks(counts, info.get("inflight"), after, info.get("served", 0.0),
                          run.action_done, plan.crash_requests)
    notes = [(f"in flight on replica {victim + 1} at SIGKILL (running + waiting from its "
             f"/metrics): {info.get('inflight')}"),
             f"failed among requests sent after the kill: {after}",
             (f"nginx fail_timeout {fail_timeout} s for this drill (default "
             f"{default_policy.fail_timeout_seconds} s restored after)"),
             f"replica {victim + 1} served {info.get('served', 0):g} requests after restart"]
    if run.action_error:
        notes.append(f"fault error: {run.action_error!r}")
    bar = (f"failed <= in flight on killed replica ({info.get('inflight')}); 0 failed after "
           "kill; restarted replica serves")
    return DrillResult("crash (SIGKILL)", counts, bar, checks,
                       notes + _failure_samples(run.records), time.monotonic() - t0)


def drill_overload(cluster: Any, model: DrillModel, plan: Plan, seed: int,
                   capacity_rps: float) -> DrillResult:
    urls = cluster.replica_urls
    pids = list(cluster.replica_pids)
    bounds = overload_bounds(model, len(urls))
    rss: dict[int, list[float]] = {i: [] for i in range(len(pids))}
    stop = threading.Event()

    def sample() -> None:
        for i, pid in enumerate(pids):
            v = rss_bytes(pid)
            if v is not None:
                rss[i].append(v)

    def sampler() -> None:
        while not stop.wait(0.25):
            sample()

    wait_idle(urls)
    sample()
    th = threading.Thread(target=sampler, name="rss", daemon=True)
    th.start()
    t0 = time.monotonic()
    rate = 3 * capacity_rps
    try:
        run = asyncio.run(run_load(cluster.endpoint + "/chat/completions", cluster.model_name,
                                   cluster.api_key, rate=rate,
                                   min_requests=int(rate * plan.overload_seconds),
                                   max_seconds=plan.overload_seconds + 5,
                                   tokens=(model.tokens_low, model.tokens_high), seed=seed))
        wait_idle(urls)
    finally:
        stop.set()
        th.join(5)
    sample()  # end
    checks, fig = overload_checks(run.records, rss, bounds)
    counts = count(run.records, rejections_expected=True)
    notes = [
        (f"offered {rate:.1f} req/s = 3 x capacity {capacity_rps:.1f} req/s for "
        f"{plan.overload_seconds:g} s"),
        (f"429 share {fig['reject_share']:.0%}; 429 latency p50 {fig['reject_p50'] * 1e3:.1f} ms"
        f", p99 {fig['reject_p99'] * 1e3:.1f} ms (bound {bounds.reject_p99_s * 1e3:.0f} ms)"),
        (f"admitted TTFT p99 {fig['ttft_p99']:.2f} s (bound {bounds.ttft_p99_s:.2f} s), E2E p99 "
        f"{fig['e2e_p99']:.2f} s (bound {bounds.e2e_p99_s:.2f} s)"),
    ] + [f"replica {i + 1} RSS start {s[0] / MIB:.1f} MiB, peak {max(s) / MIB:.1f} MiB, end "
         f"{s[-1] / MIB:.1f} MiB" for i, s in rss.items() if s]
    for c in checks:
        notes.append(f"{'ok  ' if c.passed else 'MISS'} {c.name}: {c.detail}")
    bar = (f"429 p99 < {bounds.reject_p99_s * 1e3:.0f} ms with Retry-After; RSS growth < "
           f"{bounds.rss_growth_mib:g} MiB; admitted TTFT p99 <= {bounds.ttft_p99_s:.1f} s")
    return DrillResult("overload 3x", counts, bar, checks,
                       notes + _failure_samples([r for r in run.records if r.status != 429]),
                       time.monotonic() - t0)


def drill_reload(cluster: Any, model: DrillModel, plan: Plan, seed: int) -> DrillResult:
    n = cluster.replicas
    log: list[str] = []

    def action() -> None:
        t = time.monotonic()
        cluster.reload_nginx(replicas=n + 1)
        log.append(f"reload to {n + 1} replicas took {time.monotonic() - t:.1f} s")
        got = wait_serving(cluster.replica_urls[n], timeout=10)
        log.append(f"new replica {n + 1} served {got:g} requests")

    t0 = time.monotonic()
    run = asyncio.run(run_load(cluster.endpoint + "/chat/completions", cluster.model_name,
                               cluster.api_key, rate=plan.rate, min_requests=plan.min_requests,
                               max_seconds=plan.max_seconds,
                               tokens=(model.tokens_low, model.tokens_high), seed=seed,
                               action=action, action_at=plan.min_requests / plan.rate / 3))
    counts = count(run.records)
    res = DrillResult(f"nginx reload ({n}->{n + 1})", counts,
                      f"0 failed of >= {plan.min_requests}",
                      zero_failure_checks(counts, plan.min_requests, run.action_done),
                      log + _failure_samples(run.records), time.monotonic() - t0)
    if run.action_error:
        res.notes.append(f"reload error: {run.action_error!r}")
    return res


def measure_capacity(cluster: Any, model: DrillModel, seconds: float) -> float:
    """Closed-loop saturation straight to the replicas (bench.capacity), requests/s."""
    from bench import capacity, trace

    wl = trace.Workload(prompt=trace.LogNormal(24, 0.3, 8, 40),
                        output=trace.LogNormal((model.tokens_low + model.tokens_high) / 2, 0.2,
                                               model.tokens_low, model.tokens_high))
    pool = trace.generate(50, 4, 77, wl, 1024).requests
    cap, _tps, _errs = asyncio.run(capacity.measure(
        cluster.replica_urls, cluster.model_name, cluster.api_key, pool, model.slots,
        warmup=1.0, duration=seconds, salt="cap"))
    wait_idle(cluster.replica_urls)
    return cap
