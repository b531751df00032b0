"""The sim engine follows its own latency model; tokenizer and stop matcher units."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Sequence

import pytest

from server import from_env
from server.api.generation import StopMatcher
from server.engines.base import SamplingParams
from server.engines.sim import LruPrefixCache, NoPrefixCache, SimEngine, sim_tokenize


def test_sim_tokenizer_counts_word_pieces() -> None:
    assert len(sim_tokenize("Hello, world!")) == 4
    assert len(sim_tokenize("  spaces   don't count ")) == 5  # spaces, don, ', t, count
    assert sim_tokenize("same text") == sim_tokenize("same text")
    assert sim_tokenize("") == []


async def _run(engine: SimEngine, prompt: list[int], n: int) -> tuple[float, list[float]]:
    t0 = time.monotonic()
    stamps = []
    async for _ in engine.generate(prompt, SamplingParams(max_tokens=n)):
        stamps.append(time.monotonic())
    return stamps[0] - t0, [b - a for a, b in itertools.pairwise(stamps)]


@pytest.mark.parametrize("concurrency", [1, 12])
def test_latency_model_holds(concurrency: int) -> None:
    settings = from_env({}, sim_prefill_base_ms=40, sim_prefill_ms_per_token=2,
                        sim_decode_base_ms=15, sim_decode_ms_per_seq=2.5)
    prompt = list(range(30))
    expected_ttft = 0.040 + 0.002 * 30
    expected_itl = 0.015 + 0.0025 * concurrency

    async def main() -> list[tuple[float, list[float]]]:
        engine = SimEngine(settings)
        await engine.load()
        try:
            return await asyncio.gather(*[_run(engine, prompt, 12) for _ in range(concurrency)])
        finally:
            await engine.close()

    results = asyncio.run(main())
    ttft = statistics.median(r[0] for r in results)
    itl = statistics.median(x for r in results for x in r[1][1:])  # skip the join step
    assert ttft == pytest.approx(expected_ttft, rel=0.15)
    assert itl == pytest.approx(expected_itl, rel=0.15)


class HalfCached:
    def cached_prefix_len(self, prompt_ids: Sequence[int]) -> int:
        return len(prompt_ids) // 2

    def insert(self, prompt_ids: Sequence[int]) -> None:
        pass


def test_prefill_cost_uses_the_prefix_cache_hook() -> None:
    settings = from_env({}, sim_prefill_base_ms=10, sim_prefill_ms_per_token=1)
    assert SimEngine(settings).prefill_seconds(list(range(100))) == pytest.approx(0.110)
    cached = SimEngine(settings, prefix_cache=HalfCached())
    assert cached.prefill_seconds(list(range(100))) == pytest.approx(0.060)


def test_closing_a_stream_frees_its_decode_slot() -> None:
    settings = from_env({}, sim_prefill_base_ms=0, sim_prefill_ms_per_token=0,
                        sim_decode_base_ms=2, sim_decode_ms_per_seq=0)

    async def main() -> None:
        engine = SimEngine(settings)
        await engine.load()
        gen = engine.generate([1, 2], SamplingParams(max_tokens=100))
        for _ in range(3):
            await gen.__anext__()
        assert engine.active_sequences == 1
        await gen.aclose()
        assert engine.active_sequences == 0
        await engine.close()

    asyncio.run(main())


def feed_all(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        text, stopped = m.feed(p)
        out.append(text)
        if stopped:
            return "".join(out), True
    out.append(m.flush())
    return "".join(out), False


def test_stop_matcher_across_pieces_and_never_leaks_a_prefix() -> None:
    assert feed_all(["END"], ["abc E", "N", "D more"]) == ("abc ", True)
    assert feed_all(["END"], ["abc EN", "x"]) == ("abc ENx", False)
    assert feed_all(["xyz", "b"], ["aab", "xyz"]) == ("aa", True)
    assert feed_all([], ["a", "b"]) == ("ab", False)
    m = StopMatcher(["STOP"])
    assert m.feed("hello ST") == ("hello ", False)  # "ST" held back: may begin STOP
    assert m.feed("OP") == ("", True)


# --- prefix cache ------------------------------------------------------------------------------


def test_cached_prefix_reduces_prefill_exactly_as_the_formula_says() -> None:
    settings = from_env({}, sim_prefill_base_ms=10, sim_prefill_ms_per_token=1,
                        sim_prefill_ms_per_cached_token=0.25, sim_prefix_cache_tokens=1024,
                        sim_prefix_cache_block_tokens=16)
    engine = SimEngine(settings)
    assert isinstance(engine.prefix_cache, LruPrefixCache)
    first = list(range(100))
    assert engine.prefill_seconds(first) == pytest.approx(0.010 + 0.001 * 100)
    engine.prefix_cache.insert(first)  # 6 full blocks = 96 tokens cached
    longer = first + list(range(1000, 1050))
    # 96 cached tokens at 0.25 ms, 54 uncached at 1 ms
    assert engine.prefill_seconds(longer) == pytest.approx(0.010 + 0.001 * 54 + 0.00025 * 96)
    # the same blocks after a different first token are a different prefix: no hit
    assert engine.prefill_seconds([7] + first[1:]) == pytest.approx(0.010 + 0.001 * 100)


def test_the_engine_caches_a_prompt_after_its_prefill() -> None:
    settings = from_env({}, sim_prefill_base_ms=5, sim_prefill_ms_per_token=1,
                        sim_decode_base_ms=2, sim_decode_ms_per_seq=0,
                        sim_prefix_cache_tokens=4096)
    prompt = list(range(64))

    async def main() -> list[float]:
        engine = SimEngine(settings)
        await engine.load()
        try:
            return [(await _run(engine, prompt, 2))[0] for _ in range(2)]
        finally:
            await engine.close()

    cold, warm = asyncio.run(main())
    assert cold == pytest.approx(0.005 + 0.064, abs=0.015)
    assert warm == pytest.approx(0.005, abs=0.015)


def test_lru_eviction_drops_the_least_recently_used_prefix_tail_first() -> None:
    cache = LruPrefixCache(capacity_tokens=64, block_tokens=16)  # 4 blocks
    a, b = list(range(48)), list(range(500, 548))  # 3 blocks each
    cache.insert(a)
    assert cache.cached_prefix_len(a) == 48
    cache.insert(b)  # 6 blocks > 4: a's two tail blocks go, its head stays
    assert cache.cached_tokens == 64
    assert cache.cached_prefix_len(b) == 48
    assert cache.cached_prefix_len(a) == 16
    cache.insert(a)  # a is now the most recent: b loses its tail
    assert cache.cached_prefix_len(a) == 48
    assert cache.cached_prefix_len(b) == 16
    # partial blocks are never cached
    assert cache.cached_prefix_len(a[:47]) == 32
    assert cache.stats()["hit_tokens"] == 48 + 48 + 16 + 48 + 16 + 32


def test_prefix_cache_capacity_zero_disables_it() -> None:
    settings = from_env({}, sim_prefill_base_ms=10, sim_prefill_ms_per_token=1)
    assert settings.sim_prefix_cache_tokens == 0  # off by default
    engine = SimEngine(settings)
    assert isinstance(engine.prefix_cache, NoPrefixCache)
    engine.prefix_cache.insert(list(range(100)))
    assert engine.prefill_seconds(list(range(100))) == pytest.approx(0.110)
    assert "prefix_cache" not in engine.model_card()
    zero = LruPrefixCache(capacity_tokens=0)
    zero.insert(list(range(100)))
    assert zero.cached_prefix_len(list(range(100))) == 0


def test_prefix_cache_settings_are_validated() -> None:
    from server.settings import SettingsError

    with pytest.raises(SettingsError, match="LLM_SIM_PREFIX_CACHE_TOKENS"):
        from_env({"LLM_SIM_PREFIX_CACHE_TOKENS": "-1"})
    s = from_env({"LLM_SIM_PREFIX_CACHE_TOKENS": "32768", "LLM_SIM_PREFIX_CACHE_BLOCK_TOKENS": "32"})
    cache = SimEngine(s).prefix_cache
    assert isinstance(cache, LruPrefixCache)
    assert cache.stats()["capacity_tokens"] == 32768 and cache.block_tokens == 32
