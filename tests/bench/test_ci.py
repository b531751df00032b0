"""Bootstrap intervals (bench/ci.py): coverage, pairing, blocks, failures."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from bench import ci


def test_interval_of_a_median_covers_the_true_value_about_95_percent_of_the_time():
    true_median = math.log(2)  # exponential, rate 1
    covered = 0
    for seed in range(40):
        rng = random.Random(seed)
        xs = [rng.expovariate(1) for _ in range(800)]
        covered += ci.quantile(xs, 50, block=1, samples=400, seed=seed).contains(true_median)
    assert 33 <= covered <= 40  # 95 % of 40 is 38; a broken interval misses far more often


def test_paired_ratio_of_a_sample_with_itself_is_exactly_one():
    rng = random.Random(1)
    xs = [rng.expovariate(1) for _ in range(500)]
    r = ci.ratio(xs, xs, 99)
    assert (r.value, r.lo, r.hi) == (1.0, 1.0, 1.0)
    doubled = ci.ratio([2 * x for x in xs], xs, 99)
    assert doubled.lo == pytest.approx(2.0) and doubled.hi == pytest.approx(2.0)


def test_unpaired_noise_gives_a_ratio_interval_around_one():
    rng = random.Random(2)
    a = [rng.expovariate(1) for _ in range(2000)]
    b = [rng.expovariate(1) for _ in range(2000)]
    r = ci.ratio(a, b, 50)
    assert r.lo < 1 < r.hi and r.hi - r.lo < 0.3


def test_blocks_widen_the_interval_of_an_autocorrelated_series():
    rng = np.random.default_rng(3)
    x = np.zeros(2000)
    for i in range(1, len(x)):  # AR(1), strongly correlated, like a queue's waiting times
        x[i] = 0.97 * x[i - 1] + rng.normal()
    iid = ci.quantile(list(x), 50, block=1, seed=1)
    blocked = ci.quantile(list(x), 50, seed=1)  # sqrt(n) blocks
    assert (blocked.hi - blocked.lo) > 2 * (iid.hi - iid.lo)


def test_failed_requests_are_left_out_not_counted_as_zero():
    xs = [1.0] * 90 + [None] * 10
    assert ci.quantile(xs, 50).value == 1.0
    assert ci.quantile([None, None], 50) is ci.NAN
    with pytest.raises(ValueError, match="differ in length"):
        ci.ratio([1.0, 2.0], [1.0], 50)
    with pytest.raises(ValueError, match="longer than the sample"):
        ci.quantile([1.0, 2.0], 50, block=3)


def test_interval_brackets_its_value_and_scales():
    rng = random.Random(4)
    iv = ci.quantile([rng.lognormvariate(0, 1) for _ in range(1000)], 99)
    assert iv.lo <= iv.value <= iv.hi
    assert iv.scaled(1000).value == pytest.approx(iv.value * 1000)
    bits = [float(rng.random() < 0.3) for _ in range(400)]
    m = ci.mean(bits)
    assert m.value == sum(bits) / 400 and m.lo < m.value < m.hi


def test_pooled_runs_are_resampled_inside_each_run():
    # Two runs of 400 requests: one fast, one slow. Blocks drawn inside each run keep 400 of
    # each in every bootstrap sample, so the pooled median stays between the two (about 5);
    # blocks that ignore the runs mix them in varying shares and it jumps to either side.
    rng = random.Random(5)
    fast = [rng.uniform(0.9, 1.1) for _ in range(400)]
    slow = [rng.uniform(9.0, 11.0) for _ in range(400)]
    pooled = ci.quantile(fast + slow, 50, strata=[400, 400])
    assert 4 < pooled.lo <= pooled.hi < 6
    mixed = ci.quantile(fast + slow, 50)
    assert mixed.lo < 1.2 and mixed.hi > 8.8
    r = ci.ratio(fast + slow, fast + slow, 99, strata=[400, 400])
    assert (r.lo, r.hi) == (1.0, 1.0)
    with pytest.raises(ValueError, match="add up to the sample"):
        ci.quantile(fast + slow, 50, strata=[400, 300])
