"""local top's arithmetic, without processes: quantiles as Prometheus computes
them, the rolling window, and a replica that restarts (its counters reset)."""

from __future__ import annotations

import math
from pathlib import Path

from local.top import ReplicaRow, Scrape, Top, histogram_quantile, parse_metrics, render
from server.metrics import Metrics


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.1: 50.0, 0.5: 90.0, 1.0: 100.0, math.inf: 100.0}
    assert histogram_quantile(0.5, buckets) == 0.1
    assert histogram_quantile(0.7, buckets) == 0.1 + 0.4 * (70 - 50) / 40
    assert histogram_quantile(0.99, buckets) == 0.5 + 0.5 * (99 - 90) / 10
    # Ranks in the +Inf bucket answer the highest finite bound.
    assert histogram_quantile(0.99, {1.0: 10.0, math.inf: 100.0}) == 1.0
    assert histogram_quantile(0.5, {1.0: 0.0, math.inf: 0.0}) is None
    assert histogram_quantile(0.5, {}) is None


def test_parse_reads_the_servers_own_exposition() -> None:
    metrics = Metrics(running=lambda: 3, waiting=lambda: 2)
    metrics.time_to_first_token.observe(0.04)
    metrics.e2e_latency.observe(1.0)
    metrics.reject("overload")
    metrics.reject("auth")  # not a 429
    scrape = parse_metrics(metrics.render().decode())
    assert (scrape.running, scrape.waiting, scrape.finished, scrape.refused) == (3, 2, 1, 1)
    assert scrape.ttft_buckets[0.05] == 1 and scrape.ttft_buckets[0.025] == 0


def _scrape(finished: float, refused: float, fast: float, slow: float) -> Scrape:
    return Scrape(running=0, waiting=0, finished=finished, refused=refused,
                  ttft_buckets={0.1: fast, 1.0: fast + slow, math.inf: fast + slow})


def test_window_counts_increases_and_survives_a_restart(tmp_path: Path) -> None:
    now = [0.0]
    top = Top(workdir=tmp_path, window_seconds=10, clock=lambda: now[0])

    first = top.frame([ReplicaRow(0, 8000, _scrape(100, 5, 100, 0))])
    assert first.finished_in_window == 0 and first.ttft_p99 is None
    now[0] = 5.0
    second = top.frame([ReplicaRow(0, 8000, _scrape(110, 7, 100, 10))])
    assert (second.finished_in_window, second.refused_in_window) == (10, 2)
    assert second.requests_per_second == 2.0
    assert 0.1 < second.ttft_p50 <= 1.0  # all ten new first tokens were slow
    # The replica restarted: its counters begin again from zero.
    now[0] = 8.0
    third = top.frame([ReplicaRow(0, 8000, _scrape(4, 0, 4, 0))])
    assert third.finished_in_window == 4
    text = "".join(str(part) for part in render(third).renderables)
    assert "autoscaling off" in text and "frame 3" in text
