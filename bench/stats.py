"""Per-request records and their summaries (pure: no clock, no network)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass
class Record:
    """What the client saw of one request; times are seconds on one monotonic clock."""

    index: int
    target: str
    scheduled: float
    """When the trace says it should be sent."""
    sent: float = math.nan
    first: float | None = None
    """First content token received."""
    last: float | None = None
    tokens: int = 0
    """Content events received."""
    gaps: list[float] = field(default_factory=list)
    """Times between consecutive content events."""
    status: int | None = None
    error: str | None = None
    done: bool = False
    """The stream ended with ``data: [DONE]``."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.done and self.tokens > 0

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def e2e(self) -> float | None:
        return None if self.last is None or not self.done else self.last - self.sent


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), ``q`` in [0, 100]; NaN if empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    requests: int
    errors: int
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    e2e_p50: float
    e2e_p99: float
    tokens: int
    send_lag_max: float
    """Largest delay between a request's scheduled and actual send (client health)."""
    by_target: dict[str, int]


def summarize(records: Iterable[Record]) -> Summary:
    """Percentiles over the given records. A failed request counts as an error and adds no
    latency sample; inter-token latency pools the gaps of every request."""
    recs = list(records)
    good = [r for r in recs if r.ok]
    ttft = [r.ttft for r in good if r.ttft is not None]
    e2e = [r.e2e for r in good if r.e2e is not None]
    gaps = [g for r in good for g in r.gaps]
    by_target: dict[str, int] = {}
    for r in recs:
        by_target[r.target] = by_target.get(r.target, 0) + 1
    lags = [r.sent - r.scheduled for r in recs if not math.isnan(r.sent)]
    return Summary(
        requests=len(recs), errors=len(recs) - len(good),
        ttft_p50=percentile(ttft, 50), ttft_p99=percentile(ttft, 99),
        itl_p50=percentile(gaps, 50), itl_p99=percentile(gaps, 99),
        e2e_p50=percentile(e2e, 50), e2e_p99=percentile(e2e, 99),
        tokens=sum(r.tokens for r in recs), send_lag_max=max(lags, default=0.0),
        by_target=by_target,
    )
