"""The benchmark's statistics on tiny traces with known timings."""

from __future__ import annotations

import math

import pytest

from bench.stats import Record, percentile, summarize


def rec(i: int, sent: float, token_times: list[float], *, status: int = 200,
        done: bool = True, error: str | None = None, target: str = "a") -> Record:
    r = Record(i, target, scheduled=sent - 0.001 * i, sent=sent, status=status, done=done,
               error=error)
    for t in token_times:
        if r.last is None:
            r.first = t
        else:
            r.gaps.append(t - r.last)
        r.last = t
        r.tokens += 1
    return r


def test_percentile_interpolates_like_numpy() -> None:
    xs = [1.0, 2.0, 3.0, 4.0]
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile(xs, 99) == pytest.approx(3.97)
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # order does not matter


def test_ttft_itl_e2e_from_known_timestamps() -> None:
    records = [
        rec(0, 10.0, [10.1, 10.2, 10.3]),        # TTFT 0.1, gaps 0.1 0.1, E2E 0.3
        rec(1, 20.0, [20.3, 20.5]),              # TTFT 0.3, gap 0.2, E2E 0.5
        rec(2, 30.0, [30.2, 30.25, 30.3, 30.6], target="b"),  # TTFT .2, gaps .05 .05 .3
        rec(3, 40.0, [], status=429, done=False, error="HTTP 429"),
        rec(4, 50.0, [50.1], done=False, error="cancelled", target="b"),  # no samples
    ]
    s = summarize(records)
    assert s.requests == 5 and s.errors == 2
    assert s.ttft_p50 == pytest.approx(0.2)
    assert s.ttft_p99 == pytest.approx(0.2 + 0.1 * 0.98)
    # pooled gaps: .05 .05 .1 .1 .2 .3
    assert s.itl_p50 == pytest.approx(0.1)
    assert s.itl_p99 == pytest.approx(0.2 + 0.1 * 0.95)
    assert s.e2e_p50 == pytest.approx(0.5)
    assert s.tokens == 3 + 2 + 4 + 1
    assert s.by_target == {"a": 3, "b": 2}
    assert s.send_lag_max == pytest.approx(0.004)


def test_a_stream_without_done_is_an_error() -> None:
    r = rec(0, 0.0, [0.1, 0.2], done=False)
    assert not r.ok and r.e2e is None
    assert summarize([r]).errors == 1
    assert math.isnan(summarize([r]).ttft_p50)
