"""Fault drills: the sim latency model of the drill cluster, records, counting, bars and the
summary table (the pure parts: tested on synthetic data)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from bench.stats import Record, percentile

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
    disconnect_tokens: int = 400
    """Output tokens a client of the disconnect drill asks for (about 12 s with every slot
    busy, far longer than that drill's 2 s bar)."""

    def env(self) -> dict[str, str]:
        return {
            "LLM_MAX_CONCURRENCY": str(self.slots), "LLM_MAX_QUEUE": str(self.queue),
            "LLM_MAX_TOKENS": str(max(64, self.disconnect_tokens)), "LLM_MAX_MODEL_LEN": "1024",
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
    def disconnect_generation_s(self) -> float:
        """How long one disconnect-drill generation takes with every slot busy."""
        step = self.decode_base_ms + self.decode_ms_per_seq * self.slots
        return (self.prefill_base_ms + self.disconnect_tokens * step) / 1000

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
