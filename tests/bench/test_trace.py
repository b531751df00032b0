"""Trace generation is seeded, hits the requested rate, and respects its caps."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from bench import trace
from server.engines.sim import sim_chat_prompt, sim_tokenize


def test_same_seed_same_trace_and_different_seed_differs() -> None:
    a = trace.generate(5, 20, seed=7)
    b = trace.generate(5, 20, seed=7)
    c = trace.generate(5, 20, seed=8)
    assert a.requests == b.requests
    assert a.requests != c.requests


def test_poisson_arrival_rate_and_exponential_gaps() -> None:
    rng = random.Random(3)
    arrivals = trace.poisson_arrivals(20.0, 2000.0, rng)
    assert len(arrivals) / 2000.0 == pytest.approx(20.0, rel=0.02)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # exponential: standard deviation equals the mean
    assert statistics.pstdev(gaps) == pytest.approx(statistics.mean(gaps), rel=0.05)
    assert all(0 <= t < 2000.0 for t in arrivals)
    with pytest.raises(ValueError):
        trace.poisson_arrivals(0, 1, rng)


def test_lengths_are_heavy_tailed_and_capped() -> None:
    wl = trace.Workload()
    tr = trace.generate(50, 100, seed=1, workload=wl, max_model_len=4096)
    outs = [r.max_tokens for r in tr.requests]
    assert max(outs) <= wl.output.high and min(outs) >= 1
    assert statistics.median(outs) == pytest.approx(wl.output.median, rel=0.15)
    assert statistics.mean(outs) > 1.5 * statistics.median(outs)  # long tail
    assert outs.count(wl.output.high) > 0  # the cap is reached
    for r in tr.requests[:50]:
        assert r.prompt_tokens == len(sim_tokenize(sim_chat_prompt(list(r.messages))))
        assert r.prompt_tokens + r.max_tokens <= 4096
        assert r.session is None


def test_sessions_share_their_prefix_and_keep_turn_order() -> None:
    tr = trace.generate(10, 60, seed=2, workload=trace.Workload(sessions=True))
    by_session: dict[str, list[trace.Request]] = {}
    for r in tr.requests:
        assert r.session is not None
        by_session.setdefault(r.session, []).append(r)
    assert len(tr.requests) / 60 == pytest.approx(10, rel=0.35)  # ramp-up lowers it a bit
    multi = [turns for turns in by_session.values() if len(turns) > 1]
    assert multi
    for turns in multi:
        assert [t.turn for t in turns] == list(range(len(turns)))
        for prev, nxt in itertools.pairwise(turns):
            assert nxt.arrival > prev.arrival
            # the next turn resends the whole conversation: the previous prompt is its prefix
            assert nxt.messages[: len(prev.messages)] == prev.messages
            assert nxt.messages[len(prev.messages)]["role"] == "assistant"
