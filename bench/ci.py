"""95 % confidence intervals for latency percentiles and their ratios: a paired moving-block
bootstrap over requests (pure: no clock, no network).

Why blocks: requests of one open-loop run are not independent - a queue that builds up delays
many consecutive requests - so resampling single requests would understate how much a p99
moves from one run to the next. The measured requests, in arrival order, are cut into
contiguous blocks (default: about sqrt(n) requests each, long enough to span a queueing
episode at these rates); a bootstrap sample draws as many blocks as fit, with replacement.

Why paired: every method replays the same trace, so request i of one run and request i of
another are the same request. A ratio's bootstrap draws the *same* blocks for both sides, which
keeps the trace's own luck (a burst of long outputs) out of the ratio's interval.

Why strata: several seeds' traces can be pooled into one sample (``python -m bench --seeds
1,2,3``). The runs are independent of each other but not inside, so blocks are drawn within each
run (``strata``: the runs' lengths, in order) and never span two; every bootstrap sample keeps
each run's size.

Failed requests have no latency: they are NaN and left out of the percentile of the sample
they fall in (their count is reported separately as errors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
BOOTSTRAP_SAMPLES = 1000


@dataclass(frozen=True)
class Interval:
    value: float
    """The statistic on the whole sample."""
    lo: float
    hi: float

    def __str__(self) -> str:
        return f"{self.value:.3g} ({self.lo:.3g}-{self.hi:.3g})"

    def scaled(self, factor: float) -> Interval:
        return Interval(self.value * factor, self.lo * factor, self.hi * factor)

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi


NAN = Interval(math.nan, math.nan, math.nan)


def default_block(n: int) -> int:
    return max(1, round(math.sqrt(n)))


def _block_starts(n: int, block: int | None, rng: np.random.Generator, samples: int,
                  strata: Sequence[int] | None = None) -> np.ndarray:
    """Index arrays (samples x n) of moving-block bootstrap samples over range(n); with
    ``strata`` (empty or None: one run), blocks of each consecutive stratum are drawn inside it
    (block None: about the square root of the stratum's length)."""
    sizes = list(strata) if strata else [n]
    if sum(sizes) != n or any(m < 1 for m in sizes):
        raise ValueError(f"strata {sizes} must be positive and add up to the sample ({n})")
    parts, offset = [], 0
    for m in sizes:
        b = block or default_block(m)
        if b > m:
            raise ValueError(f"block {b} is longer than the sample ({m})")
        starts = rng.integers(0, m - b + 1, size=(samples, math.ceil(m / b))) + offset
        idx = (starts[:, :, None] + np.arange(b)[None, None, :]).reshape(samples, -1)
        parts.append(idx[:, :m])
        offset += m
    return np.concatenate(parts, axis=1)


def _as_array(values: Sequence[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=float)


def quantile(values: Sequence[float | None], q: float, *, block: int | None = None,
             samples: int = BOOTSTRAP_SAMPLES, seed: int = 0, level: float = LEVEL,
             strata: Sequence[int] | None = None) -> Interval:
    """The ``q``-th percentile (0-100) of ``values`` (in arrival order; None/NaN = failed)
    and its bootstrap interval."""
    x = _as_array(values)
    if np.all(np.isnan(x)):
        return NAN
    idx = _block_starts(len(x), block, np.random.default_rng(seed), samples, strata)
    boot = np.nanpercentile(x[idx], q, axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(boot, [tail, 100 - tail])
    return Interval(float(np.nanpercentile(x, q)), float(lo), float(hi))


def ratio(num: Sequence[float | None], den: Sequence[float | None], q: float, *,
          block: int | None = None, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
          level: float = LEVEL, strata: Sequence[int] | None = None) -> Interval:
    """percentile(num) / percentile(den) with a paired bootstrap interval: both sequences are
    latencies of the same trace's requests, index by index."""
    a, b = _as_array(num), _as_array(den)
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    if np.all(np.isnan(a)) or np.all(np.isnan(b)):
        return NAN
    idx = _block_starts(len(a), block, np.random.default_rng(seed), samples, strata)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = np.nanpercentile(a[idx], q, axis=1) / np.nanpercentile(b[idx], q, axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(boot, [tail, 100 - tail])
    return Interval(float(np.nanpercentile(a, q) / np.nanpercentile(b, q)), float(lo), float(hi))


def mean(values: Sequence[float], *, block: int | None = None, samples: int = BOOTSTRAP_SAMPLES,
         seed: int = 0, level: float = LEVEL, strata: Sequence[int] | None = None) -> Interval:
    """Mean with a block-bootstrap interval (e.g. a per-request cache hit fraction)."""
    x = _as_array(values)
    n = len(x)
    if n == 0:
        return NAN
    idx = _block_starts(n, block, np.random.default_rng(seed), samples, strata)
    boot = np.nanmean(x[idx], axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(boot, [tail, 100 - tail])
    return Interval(float(np.nanmean(x)), float(lo), float(hi))
