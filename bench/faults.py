"""Fault drills in local mode: ``python -m bench faults [--quick] [--out DIR]``.

Starts one local cluster (3 sim replicas behind the real nginx, default balancing policy) and
runs four drills against it, each under open-loop streaming load through nginx:

1. ``rolling-restart``: SIGTERM each replica in turn (it drains), start it again, wait until it
   is ready *and* back in nginx's rotation before the next one (like ``maxUnavailable: 1``).
2. ``crash``: SIGKILL one replica; only the requests in flight on it may fail (measured from its
   /metrics right before the kill); requests sent afterwards must all succeed; after
   ``start_replica`` it must serve again.
3. ``overload``: 3x the measured capacity for a bounded time: fast 429s with Retry-After,
   bounded replica RSS, admitted requests' p99 bounded by what the queue can hold.
4. ``nginx-reload``: ``reload_nginx(replicas=n + 1)`` under load: no failed request.

A request succeeds only with status 200 and a stream that ended with ``data: [DONE]``; 429s are
counted apart (the expected answer in the overload drill, a failure elsewhere). Prints one line
per drill and a summary table; exits 1 when any drill misses its bar. The pure parts (counting,
bars, table) are separate from the drivers so tests can check them on synthetic data.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from bench import alert_timing
from bench.client import stream_one
from bench.stats import Record, percentile
from components.balancing import LoadBalancingConfig

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
REENTRY_SERVED = 2
"""A restarted replica is back in nginx's rotation once it served this many requests: the
first one may be nginx's single probe after fail_timeout, the second proves the probe passed."""


# --- sim model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DrillModel:
    """Short requests, so hundreds fit in a drill: 20-40 output tokens at ~25-30 ms a step."""

    slots: int = 8
    queue: int = 16
    prefill_base_ms: float = 20
    prefill_ms_per_token: float = 0.1
    decode_base_ms: float = 25
    decode_ms_per_seq: float = 0.5
    tokens_low: int = 20
    tokens_high: int = 40
    drain_seconds: float = 10

    def env(self) -> dict[str, str]:
        return {
            "LLM_MAX_CONCURRENCY": str(self.slots), "LLM_MAX_QUEUE": str(self.queue),
            "LLM_MAX_TOKENS": "64", "LLM_MAX_MODEL_LEN": "1024",
            "LLM_SIM_PREFILL_BASE_MS": str(self.prefill_base_ms),
            "LLM_SIM_PREFILL_MS_PER_TOKEN": str(self.prefill_ms_per_token),
            "LLM_SIM_DECODE_BASE_MS": str(self.decode_base_ms),
            "LLM_SIM_DECODE_MS_PER_SEQ": str(self.decode_ms_per_seq),
            "LLM_DRAIN_SECONDS": str(self.drain_seconds), "LLM_LOG_LEVEL": "warning",
            "LLM_RETRY_AFTER_SECONDS": "1",
        }

    @property
    def service_max_s(self) -> float:
        """Longest request with every slot busy: prefill + tokens_high full decode steps."""
        step = self.decode_base_ms + self.decode_ms_per_seq * self.slots
        return (self.prefill_base_ms + 40 * self.prefill_ms_per_token
                + self.tokens_high * step) / 1000

    @property
    def service_mean_s(self) -> float:
        step = self.decode_base_ms + self.decode_ms_per_seq * self.slots
        mean_tokens = (self.tokens_low + self.tokens_high) / 2
        return (self.prefill_base_ms + 40 * self.prefill_ms_per_token
                + mean_tokens * step) / 1000

    def describe(self) -> str:
        return (f"sim: {self.tokens_low}-{self.tokens_high} output tokens, prefill "
                f"{self.prefill_base_ms:g} ms, decode step {self.decode_base_ms:g} ms + "
                f"{self.decode_ms_per_seq:g} ms x active; {self.slots} slots and a queue of "
                f"{self.queue} per replica; drain deadline {self.drain_seconds:g} s")


# --- pure parts: records, counting, bars, table ------------------------------------------------


@dataclass
class FaultRecord(Record):
    """A bench Record plus what the drills need: when the answer's headers came, Retry-After."""

    responded: float | None = None
    retry_after: str | None = None

    @property
    def header_latency(self) -> float | None:
        return None if self.responded is None else self.responded - self.sent


@dataclass(frozen=True)
class Counts:
    sent: int
    succeeded: int
    failed: int
    rejected: int
    """429 answers (not in `failed` when counted apart, else part of it)."""


def count(records: Sequence[Record], *, rejections_expected: bool = False) -> Counts:
    """Sent / succeeded / failed; a 429 is `rejected` and, unless expected, also a failure.

    Success is `Record.ok`: status 200, a stream ending in [DONE], at least one token.
    """
    ok = sum(1 for r in records if r.ok)
    rejected = sum(1 for r in records if r.status == 429)
    failed = len(records) - ok - (rejected if rejections_expected else 0)
    return Counts(len(records), ok, failed, rejected)


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str = ""


@dataclass
class DrillResult:
    drill: str
    counts: Counts
    bar: str
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def verdict(self) -> str:
        if self.passed:
            return "PASS"
        return "FAIL (" + "; ".join(c.name for c in self.checks if not c.passed) + ")"


def zero_failure_checks(counts: Counts, min_requests: int, action_done: bool) -> list[Check]:
    """Bar of rolling restart and nginx reload: 0 failed out of at least `min_requests`."""
    return [
        Check("enough requests", counts.sent >= min_requests,
              f"{counts.sent} sent, need >= {min_requests}"),
        Check("no failed request", counts.failed == 0, f"{counts.failed} failed"),
        Check("fault ran under load", action_done, "the fault finished while load ran"),
    ]


def crash_checks(counts: Counts, inflight_at_kill: int | None, failed_after_kill: int,
                 served_after_restart: float, action_done: bool,
                 min_requests: int) -> list[Check]:
    """Bar of the crash drill: failures <= in flight on the killed replica at the kill,
    none of the requests sent after the kill fails, and the restarted replica serves again."""
    inflight_known = inflight_at_kill is not None
    return [
        Check("enough requests", counts.sent >= min_requests,
              f"{counts.sent} sent, need >= {min_requests}"),
        Check("in-flight measured", bool(inflight_known and inflight_at_kill > 0),
              f"{inflight_at_kill} in flight on the killed replica (0 would prove nothing)"),
        Check("failures <= in flight",
              bool(inflight_known and counts.failed <= inflight_at_kill),
              f"{counts.failed} failed, {inflight_at_kill} in flight"),
        Check("new requests unaffected", failed_after_kill == 0,
              f"{failed_after_kill} sent after the kill failed"),
        Check("restarted replica serves", served_after_restart > 0,
              f"{served_after_restart:g} requests served after restart"),
        Check("fault ran under load", action_done, "kill, restart and re-entry during load"),
    ]


@dataclass(frozen=True)
class OverloadBounds:
    reject_p99_s: float
    rss_growth_mib: float
    ttft_p99_s: float
    e2e_p99_s: float
    min_reject_share: float = 0.2


def overload_bounds(model: DrillModel, replicas: int) -> OverloadBounds:
    """Bounds derived from the settings (see docs/reliability.md for the reasoning).

    * 429 p99 < 50 ms: a refusal is an O(1) admission check behind one loopback proxy hop;
      it never waits for a slot or a decode step (25+ ms), so 50 ms leaves room for the event
      loops of 2 busy cores and nothing for an accidental wait.
    * RSS growth < 50 MiB per replica: the queue caps resident requests at slots + queue
      (24 here, a few KiB each); 50 MiB is far above that and allocator noise, and far below
      what an unbounded queue at 3x capacity would add.
    * Admitted TTFT p99 <= (queue / slots + 1) x longest request + 1 s: a request admitted
      into a full queue waits for at most queue/slots generations of the longest request
      ahead of it, then its own prefill; 1 s is client/proxy slack on a shared 2-core box.
      E2E p99 <= one more longest request than that.
    """
    waves = model.queue / model.slots
    ttft = (waves + 1) * model.service_max_s + 1.0
    return OverloadBounds(reject_p99_s=0.050, rss_growth_mib=50.0, ttft_p99_s=ttft,
                          e2e_p99_s=ttft + model.service_max_s)


def overload_checks(records: Sequence[FaultRecord], rss: Mapping[int, Sequence[float]],
                    bounds: OverloadBounds) -> tuple[list[Check], dict[str, float]]:
    """Checks of the overload drill and the figures they are based on.

    `rss`: per replica, RSS samples in bytes (first = start, last = end)."""
    counts = count(records, rejections_expected=True)
    rejects = [r for r in records if r.status == 429]
    lat = [r.header_latency for r in rejects if r.header_latency is not None]
    admitted = [r for r in records if r.ok]
    ttft = [r.ttft for r in admitted if r.ttft is not None]
    e2e = [r.e2e for r in admitted if r.e2e is not None]
    growth = {i: (max(s) - s[0]) / MIB for i, s in rss.items() if s}
    figures = {
        "reject_share": counts.rejected / counts.sent if counts.sent else 0.0,
        "reject_p50": percentile(lat, 50), "reject_p99": percentile(lat, 99),
        "ttft_p99": percentile(ttft, 99), "e2e_p99": percentile(e2e, 99),
        "rss_growth_max_mib": max(growth.values(), default=math.nan),
    }
    missing = sum(1 for r in rejects if not r.retry_after)
    checks = [
        Check("429s happen", figures["reject_share"] >= bounds.min_reject_share,
              f"{figures['reject_share']:.0%} of requests got 429 (>= "
              f"{bounds.min_reject_share:.0%} expected at 3x)"),
        Check("no other failure", counts.failed == 0, f"{counts.failed} failed (not 429)"),
        Check("Retry-After on every 429", bool(rejects) and missing == 0,
              f"{missing} of {len(rejects)} lack it"),
        Check("429 p99 fast", lat != [] and figures["reject_p99"] < bounds.reject_p99_s,
              f"p99 {figures['reject_p99'] * 1e3:.1f} ms < {bounds.reject_p99_s * 1e3:.0f} ms"),
        Check("RSS bounded", bool(growth) and figures["rss_growth_max_mib"]
              < bounds.rss_growth_mib,
              f"max growth {figures['rss_growth_max_mib']:.1f} MiB < "
              f"{bounds.rss_growth_mib:g} MiB"),
        Check("admitted TTFT p99 bounded", ttft != [] and figures["ttft_p99"]
              <= bounds.ttft_p99_s,
              f"{figures['ttft_p99']:.2f} s <= {bounds.ttft_p99_s:.2f} s"),
        Check("admitted E2E p99 bounded", e2e != [] and figures["e2e_p99"]
              <= bounds.e2e_p99_s,
              f"{figures['e2e_p99']:.2f} s <= {bounds.e2e_p99_s:.2f} s"),
    ]
    return checks, figures


def summary_table(results: Sequence[DrillResult]) -> str:
    lines = ["| drill | sent | succeeded | failed | 429 | bar | verdict |",
             "|---|---:|---:|---:|---:|---|---|"]
    for r in results:
        c = r.counts
        lines.append(f"| {r.drill} | {c.sent} | {c.succeeded} | {c.failed} | {c.rejected} | "
                     f"{r.bar} | {r.verdict} |")
    return "\n".join(lines)


def exit_code(results: Sequence[DrillResult]) -> int:
    """0 only when every drill ran and passed."""
    return 0 if results and all(r.passed for r in results) else 1


def failed_after(records: Sequence[Record], t: float) -> int:
    """Failures among requests sent at or after `t` (the kill)."""
    return sum(1 for r in records if not r.ok and not math.isnan(r.sent) and r.sent >= t)


# --- load --------------------------------------------------------------------------------------


async def _stream(client: httpx.AsyncClient, url: str, body: dict, headers: dict[str, str],
                  rec: FaultRecord) -> None:
    """bench.client.stream_one, plus the time the headers came and Retry-After."""

    def headers_arrived(response: httpx.Response) -> None:
        rec.responded = time.monotonic()
        rec.retry_after = response.headers.get("retry-after")

    await stream_one(client, url, body, headers, rec, on_response=headers_arrived)


@dataclass
class LoadRun:
    records: list[FaultRecord]
    action_result: Any = None
    action_error: BaseException | None = None
    action_started: float | None = None
    action_ended: float | None = None
    load_ended: float | None = None
    """When the last request was sent."""

    @property
    def action_done(self) -> bool:
        """The action ran to completion without error before the last request was sent."""
        return (self.action_error is None and self.action_ended is not None
                and self.load_ended is not None and self.action_ended <= self.load_ended)


async def run_load(url: str, model: str, api_key: str, *, rate: float, min_requests: int,
                   max_seconds: float, tokens: tuple[int, int], seed: int,
                   action: Callable[[], Any] | None = None, action_at: float = 0.0,
                   tail_seconds: float = 1.0, stop_early: Callable[[], bool] | None = None,
                   request_timeout: float = 30.0, grace: float = 30.0) -> LoadRun:
    """Open loop at `rate` requests/s (Poisson) to `url` until `min_requests` were sent *and*
    `action` (run in a thread from `action_at` seconds) is over plus `tail_seconds`; never
    longer than `max_seconds` of sending. Streams still open `grace` s later are cancelled."""
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"}
    run = LoadRun([])
    done = threading.Event()
    if action is None:
        done.set()

    def in_thread() -> None:
        run.action_started = time.monotonic()
        try:
            run.action_result = action()  # type: ignore[misc]
        except BaseException as exc:  # noqa: BLE001 - reported in the drill's result
            run.action_error = exc
        finally:
            run.action_ended = time.monotonic()
            done.set()

    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=128)
    timeout = httpx.Timeout(request_timeout, connect=5.0)
    tasks: list[asyncio.Task[None]] = []
    thread: threading.Thread | None = None
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        t0 = time.monotonic()
        next_at = t0
        i = 0
        while True:
            now = time.monotonic()
            if action is not None and thread is None and now - t0 >= action_at:
                thread = threading.Thread(target=in_thread, name="fault", daemon=True)
                thread.start()
            finished = (i >= min_requests and done.is_set()
                        and (run.action_ended is None
                             or now - run.action_ended >= tail_seconds))
            if finished or now - t0 >= max_seconds or (stop_early and stop_early()):
                break
            if now < next_at:
                await asyncio.sleep(min(next_at - now, 0.05))
                continue
            n = rng.randint(*tokens)
            body = {"model": model, "max_tokens": n, "stream": True, "seed": i,
                    "messages": [{"role": "user",
                                  "content": f"drill {seed} request {i}: say {n} words"}]}
            rec = FaultRecord(i, url, next_at)
            run.records.append(rec)
            tasks.append(asyncio.create_task(_stream(client, url, body, headers, rec)))
            i += 1
            next_at += rng.expovariate(rate)
        run.load_ended = time.monotonic()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    for rec in run.records:
        if rec.error is None and not rec.done:
            rec.error = "cancelled: still running after the grace period"
    if thread is not None:
        await asyncio.to_thread(thread.join, 120.0)
    return run


# --- replica introspection ------------------------------------------------------------------


def scrape(url: str, timeout: float = 2.0) -> dict[str, float]:
    """Unlabelled gauges/counters of a replica's /metrics (plus `llm_..._count` series)."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=timeout).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def served(url: str) -> float:
    """Requests that produced a first token on this replica since it started."""
    try:
        return scrape(url).get("llm_time_to_first_token_seconds_count", 0.0)
    except httpx.HTTPError:
        return 0.0


def in_flight(url: str) -> int:
    m = scrape(url, timeout=1.0)
    return int(m.get("llm_requests_running", 0) + m.get("llm_requests_waiting", 0))


def rss_bytes(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def wait_serving(url: str, timeout: float, since: float = 0.0) -> float:
    """Poll until the replica served more than `since` requests; return its count."""
    deadline = time.monotonic() + timeout
    n = served(url)
    while n <= since and time.monotonic() < deadline:
        time.sleep(0.2)
        n = served(url)
    return n


def wait_idle(urls: Sequence[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if sum(in_flight(u) for u in urls) == 0:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


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
    alerts = alert_timing.start(cluster)  # the stack's backlog alert in a real Prometheus
    try:
        run = asyncio.run(run_load(cluster.endpoint + "/chat/completions", cluster.model_name,
                                   cluster.api_key, rate=rate,
                                   min_requests=int(rate * plan.overload_seconds),
                                   max_seconds=plan.overload_seconds + 5,
                                   tokens=(model.tokens_low, model.tokens_high), seed=seed))
        wait_idle(urls)
        alert_notes = alerts.finish(run.records, run.load_ended)
    finally:
        stop.set()
        th.join(5)
        alerts.close()
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
    ] + alert_notes + [f"replica {i + 1} RSS start {s[0] / MIB:.1f} MiB, peak {max(s) / MIB:.1f} MiB, end "
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


# --- report ----------------------------------------------------------------------------------


def markdown(results: Sequence[DrillResult], command: str, elapsed: float, model: DrillModel,
             capacity_rps: float, plan: Plan, replicas: int) -> str:
    lines = ["### Latest fault-drill run", "",
             (f"`{command}` - {elapsed:.0f} s on {os.cpu_count()} cores, {replicas} sim "
             "replicas behind nginx (local mode, default `LoadBalancingConfig`)."), "",
             f"- {model.describe()}.",
             (f"- Measured capacity {capacity_rps:.1f} requests/s; steady load "
             f"{plan.rate:g} requests/s (open loop, Poisson, streaming)."), "",
             summary_table(results), ""]
    for r in results:
        lines.append(f"**{r.drill}**")
        lines.append("")
        lines += [f"- {n}" for n in r.notes]
        lines.append("")
    return "\n".join(lines)


BEGIN = "<!-- fault-drills:begin (written by python -m bench faults) -->"
END = "<!-- fault-drills:end -->"
_SKELETON = f"""# Reliability

{BEGIN}
{END}

## Fuzzing

_Placeholder: filled in by the lead._
"""


def splice(existing: str | None, results: str) -> str:
    """`existing` (docs/reliability.md) with the text between the markers replaced by
    `results`; everything else (the prose, the Fuzzing section) is kept. A file without the
    markers gets them appended rather than being overwritten."""
    text = existing if existing is not None else _SKELETON
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{results.strip()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench faults", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="shorter drills (under two minutes); writes nowhere unless --out")
    ap.add_argument("--out", type=Path, default=None,
                    help="directory whose reliability.md gets the results between its markers "
                         "(full run default: docs)")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate", type=float, default=None,
                    help="steady load in requests/s (default 14: about half of 3 replicas)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the cluster's logs (replica-*.log, nginx/error.log) here")
    ap.add_argument("--drills", default="rolling,crash,overload,reload",
                    help="comma-separated subset, run in this order")
    args = ap.parse_args(argv)
    out = args.out if args.out is not None or args.quick else ROOT / "docs"
    drills = [d for d in args.drills.split(",") if d]
    for d in drills:
        if d not in ("rolling", "crash", "overload", "reload"):
            ap.error(f"unknown drill {d!r}")

    model = DrillModel()
    if args.quick:
        plan = Plan(rate=14.0, min_requests=250, crash_requests=150, overload_seconds=5.0)
    else:
        plan = Plan(rate=14.0, min_requests=500, crash_requests=300, overload_seconds=12.0)

    if args.rate is not None:
        if args.rate <= 0:
            ap.error("--rate must be positive")
        plan = replace(plan, rate=args.rate)

    from bench.__main__ import free_ports
    from local.cluster import LocalCluster

    rng = random.Random(args.seed)
    base = free_ports(args.replicas + 2, rng)
    t_start = time.monotonic()
    say(f"{model.describe()}; {args.replicas} replicas on {os.cpu_count()} cores")
    results: list[DrillResult] = []
    with LocalCluster(args.replicas, port=base + args.replicas + 1, first_replica_port=base,
                      server_env=model.env(), max_output_tokens=64,
                      policy=LoadBalancingConfig(), workdir=args.workdir) as cluster:
        say(f"cluster up: {cluster.endpoint} -> {', '.join(cluster.replica_urls)}")
        capacity_rps = measure_capacity(cluster, model, 2.0 if args.quick else 4.0)
        say(f"capacity {capacity_rps:.1f} requests/s (derived: "
            f"{args.replicas * model.slots / model.service_mean_s:.1f}); steady load "
            f"{plan.rate:g} requests/s")
        runners: dict[str, Callable[[int], DrillResult]] = {
            "rolling": lambda s: drill_rolling(cluster, model, plan, s),
            "crash": lambda s: drill_crash(cluster, model, plan, s),
            "overload": lambda s: drill_overload(cluster, model, plan, s, capacity_rps),
            "reload": lambda s: drill_reload(cluster, model, plan, s),
        }
        for k, name in enumerate(drills):
            wait_idle(cluster.replica_urls)
            res = runners[name](args.seed * 100 + k)
            results.append(res)
            say(_line(res))
            for note in res.notes:
                say(f"    {note}")
        replicas_end = cluster.replicas
    elapsed = time.monotonic() - t_start
    table = summary_table(results)
    say("")
    say(table)
    say(f"total {elapsed:.0f} s")
    if out is not None:
        command = " ".join(["python -m bench faults",
                            *(argv if argv is not None else sys.argv[1:])]).strip()
        out.mkdir(parents=True, exist_ok=True)
        path = out / "reliability.md"
        body = markdown(results, command, elapsed, model, capacity_rps, plan, args.replicas)
        path.write_text(splice(path.read_text() if path.exists() else None, body))
        say(f"wrote {path} ({replicas_end} replicas at the end)")
    code = exit_code(results)
    say("all drills passed" if code == 0 else "some drill missed its bar")
    return code


if __name__ == "__main__":
    sys.exit(main())
