"""The GPU-regime sim engine (server/engines/sim_batched.py): the scheduler in real time, behind
the real API, checked against the discrete-event model that runs the same scheduler."""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from bench import des
from server import from_env
from server.admission import for_engine
from server.api.generation import Finished, Generation
from server.engines.base import SamplingParams
from server.engines.scheduler import SchedulerConfig, block_keys
from server.engines.sim import sim_tokenize
from server.engines.sim_batched import SimBatchedEngine, scheduler_config
from server.metrics import Metrics

from .batched_app import spec_env, stand_in_step_seconds
from .support import FAST_SIM, wait_for


def engine(settings, dilation: float = 1.0, **limits) -> SimBatchedEngine:
    config = scheduler_config(settings, 65_536, **{"max_num_batched_tokens": 512, **limits})
    assert (config.max_num_seqs, config.max_model_len) == (settings.max_concurrency,
                                                           settings.max_model_len)
    return SimBatchedEngine(settings, config, stand_in_step_seconds, dilation)


def start(sim_server, dilation: float = 1.0, limits: dict | None = None, **overrides):
    settings = from_env({}, **{**FAST_SIM, **overrides})
    return sim_server(engine=engine(settings, dilation, **(limits or {})), **overrides)


def _completion(base: str, prompt: str, max_tokens: int, seed: int = 3) -> dict:
    r = httpx.post(base + "/v1/completions", json={"model": "sim-llm", "prompt": prompt,
                                                   "max_tokens": max_tokens, "seed": seed},
                   timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_same_text_as_the_sim_engine_and_the_card_says_dilation_and_limits(sim_server) -> None:
    slots = sim_server()
    batched = start(sim_server, dilation=2.0, max_concurrency=4)
    prompt = "the quick brown fox jumps over the lazy dog"
    a = _completion(slots.base_url, prompt, 12)
    b = _completion(batched.base_url, prompt, 12)
    assert b["choices"][0]["text"] == a["choices"][0]["text"]
    assert b["usage"] == a["usage"] and b["choices"][0]["finish_reason"] == "length"
    card = httpx.get(batched.base_url + "/v1/models").json()["data"][0]
    assert card["time_dilation"] == 2.0
    assert card["scheduler"]["max_num_seqs"] == 4
    assert card["prefix_cache"]["lookup_tokens"] == len(sim_tokenize(prompt))


def _stream(base: str, max_tokens: int) -> tuple[int, int]:
    n = 0
    with httpx.stream("POST", base + "/v1/completions", timeout=30,
                      json={"model": "sim-llm", "prompt": "hold on", "max_tokens": max_tokens,
                            "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"text":" ' in line:
                n += 1
        return r.status_code, n


def test_gauges_are_the_schedulers_queues_and_admission_bounds_their_total(sim_server) -> None:
    # max_num_seqs 2 running, 1 more waiting inside the engine, then 429.
    srv = start(sim_server, dilation=3.0, max_concurrency=2, max_queue=1)
    with ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(_stream, srv.base_url, 30) for _ in range(3)]
        wait_for(lambda: srv.metric("llm_requests_running") == 2
                  and srv.metric("llm_requests_waiting") == 1)
        assert len(srv.state.engine.scheduler.waiting) == 1
        refused = httpx.post(srv.base_url + "/v1/completions",
                             json={"model": "sim-llm", "prompt": "x", "max_tokens": 2})
        assert refused.status_code == 429
        assert [s.result() for s in streams] == [(200, 30)] * 3
    assert srv.metric("llm_requests_running") == 0 and srv.metric("llm_requests_waiting") == 0
    assert srv.metric("llm_requests_rejected_total", 'reason="overload"') == 1


def test_a_consumer_that_goes_away_leaves_the_batch_and_frees_its_blocks(sim_server) -> None:
    srv = start(sim_server, dilation=2.0)
    sched = srv.state.engine.scheduler
    with httpx.stream("POST", srv.base_url + "/v1/completions", timeout=30,
                      json={"model": "sim-llm", "prompt": "go away " * 40, "max_tokens": 250,
                            "stream": True}) as r:
        lines = r.iter_lines()
        while '"text":" ' not in next(lines):
            pass
        assert len(sched.running) == 1 and sched.free_blocks < sched.config.num_blocks
    wait_for(lambda: not sched.running, timeout=3)
    assert sched.free_blocks == sched.config.num_blocks


def test_drain_deadline_ends_sequences_still_waiting_in_the_engine() -> None:
    settings = from_env({}, max_concurrency=1, max_queue=4)

    async def main() -> Finished:
        eng = engine(settings, dilation=2.0)
        admission, running, waiting = for_engine(eng, 1, 4)
        gen = Generation(eng, admission, Metrics(running, waiting), aborting=lambda: False)
        await eng.load()

        async def run(n: int) -> Finished:
            async for item in gen.run(list(range(20)), SamplingParams(max_tokens=n), [], 0.0):
                if isinstance(item, Finished):
                    return item
            raise AssertionError("no Finished")

        first = asyncio.create_task(run(40))
        second = asyncio.create_task(run(5))
        while running() != 1 or waiting() != 1:
            await asyncio.sleep(0.005)
        eng.abort_waiting()  # what the drain deadline calls
        done = await second
        assert not first.done() and not eng.scheduler.waiting  # the running one goes on
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        assert not eng.scheduler.running  # cancelled: it left the batch
        await eng.close()
        return done

    assert asyncio.run(main()) == Finished("abort", 0)


def test_token_times_follow_the_scheduler_steps_times_dilation() -> None:
    """In process (no HTTP): every token lands at the end of the step the scheduler planned."""
    settings = from_env({}, max_concurrency=4, max_model_len=2048)
    d = 4.0
    prompts = [list(range(k * 1000, k * 1000 + n)) for k, n in enumerate((300, 40, 120, 60))]
    max_tokens = (6, 10, 4, 8)

    async def main() -> list[list[float]]:
        eng = engine(settings, dilation=d, max_num_batched_tokens=128)
        await eng.load()

        async def run(ids: list[int], n: int) -> list[float]:
            stamps = []
            async for _ in eng.generate(ids, SamplingParams(max_tokens=n)):
                stamps.append(time.monotonic())
            return stamps

        t0 = time.monotonic()
        out = await asyncio.gather(*[run(p, n) for p, n in zip(prompts, max_tokens)])
        await eng.close()
        return [[t - t0 for t in s] for s in out]

    live = asyncio.run(main())
    config = SchedulerConfig(kv_cache_tokens=65_536, max_model_len=2048, max_num_seqs=4,
                             max_num_batched_tokens=128)
    jobs = [des.Job(0.0, len(p), n) for p, n in zip(prompts, max_tokens)]
    model = des.simulate(jobs, des.BatchedParams(1, config, lambda b: stand_in_step_seconds(b) * d),
                         "fcfs")
    for k, stamps in enumerate(live):
        assert len(stamps) == max_tokens[k]
        assert stamps[0] == pytest.approx(model.ttft[k], abs=0.02)
        assert stamps[-1] == pytest.approx(model.e2e[k], abs=0.03)


# --- a real server process against the discrete-event model ----------------------------------

DILATION = 8.0
VALIDATION = SchedulerConfig(kv_cache_tokens=16_384, max_model_len=4096, max_num_seqs=6,
                             max_num_batched_tokens=256)


def _words(prefix: str, n: int) -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


class Client(threading.Thread):
    """One streaming completion, sent ``delay`` s after ``after`` is set; records when it was sent
    and when each token arrived, and sets ``cues[k]`` when its k-th token arrives."""

    def __init__(self, base: str, prompt: str, max_tokens: int, after: threading.Event,
                 delay: float = 0.0, cues: dict[int, threading.Event] | None = None) -> None:
        super().__init__(daemon=True)
        self.base, self.prompt, self.max_tokens = base, prompt, max_tokens
        self.after, self.delay, self.cues = after, delay, cues or {}
        self.t0 = 0.0
        self.sent = 0.0
        self.stamps: list[float] = []
        self.http = httpx.Client(timeout=60)  # built here: a client's setup takes milliseconds

    def run(self) -> None:
        body = {"model": "sim-llm", "prompt": self.prompt, "max_tokens": self.max_tokens,
                "stream": True}
        self.after.wait(30)
        time.sleep(self.delay)
        self.sent = time.monotonic() - self.t0
        with self.http, self.http.stream("POST", self.base + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    self.stamps.append(time.monotonic() - self.t0)
                    if len(self.stamps) in self.cues:
                        self.cues[len(self.stamps)].set()


def test_a_real_server_matches_the_discrete_event_model(server_process) -> None:
    """A long prompt alone; then a burst that overfills max_num_seqs and the token budget
    (chunked prefill, waiting); then three requests sharing a prefix with the burst
    (prefix-cache hits). TTFT and mean inter-token latency of every request, live (dilated, over
    HTTP), against the DES's prediction from the same send times.

    Each wave is sent just after a step boundary (cued by a token; one every 6 ms, so arrival
    order is send order), where live and model agree on which step a request joins."""
    sp = server_process({"LLM_MAX_MODEL_LEN": "4096", "LLM_MAX_TOKENS": "64",
                         "LLM_MAX_CONCURRENCY": "6", "LLM_MAX_QUEUE": "64",
                         "LLM_LOG_LEVEL": "warning", **spec_env(VALIDATION, DILATION)},
                        app="tests.server.batched_app:create", factory=True)
    go, burst_cue, late_cue = threading.Event(), threading.Event(), threading.Event()
    warm = Client(sp.base_url, "warm up", 2, go)  # the server's first request is slower
    shared = _words("ctx", 96)
    clients = [Client(sp.base_url, _words("solo", 600), 10, go, cues={1: burst_cue,
                                                                     6: late_cue})]
    clients += [Client(sp.base_url, f"{shared} {_words(f'q{k}x', 20 + 30 * k)}", 6 + 3 * k,
                       burst_cue, 0.006 * k) for k in range(8)]
    clients += [Client(sp.base_url, f"{shared} {_words(f'r{k}y', 10)}", 5, late_cue, 0.006 * k)
                for k in range(3)]
    go.set()
    warm.start()
    warm.join(30)
    go.clear()
    t0 = time.monotonic()
    for c in clients:
        c.t0 = t0
        c.start()
    go.set()
    for c in clients:
        c.join(60)
    assert all(len(c.stamps) == c.max_tokens for c in clients)

    clients.sort(key=lambda c: c.sent)
    jobs = [des.Job(c.sent, len(ids := sim_tokenize(c.prompt)), c.max_tokens,
                    tuple(block_keys(ids))) for c in clients]
    model = des.simulate(jobs, des.BatchedParams(
        1, VALIDATION, lambda b: stand_in_step_seconds(b) * DILATION), "fcfs")
    ttft_err, itl_err = [], []
    for c, ttft, e2e in zip(clients, model.ttft, model.e2e):
        ttft_err.append(abs(c.stamps[0] - c.sent - ttft))
        live_itl = (c.stamps[-1] - c.stamps[0]) / (c.max_tokens - 1)
        itl_err.append(abs(live_itl / ((e2e - ttft) / (c.max_tokens - 1)) - 1))
    card = httpx.get(sp.base_url + "/v1/models").json()["data"][0]
    print(f"validation: TTFT |live - DES| median {statistics.median(ttft_err) * 1e3:.1f} ms, "
          f"worst {max(ttft_err) * 1e3:.1f} ms over {len(clients)} requests (model TTFT "
          f"{min(model.ttft):.3f}-{max(model.ttft):.3f} s); mean ITL |live/DES - 1| median "
          f"{statistics.median(itl_err):.1%}, worst {max(itl_err):.1%}; prefix hits "
          f"{card['prefix_cache']['hit_tokens']} tokens")
    assert card["prefix_cache"]["hit_tokens"] >= 3 * 96 // 16 * 16  # the shared prefix hit
    assert max(model.ttft) > 5 * 0.010 * DILATION  # requests queued: a non-trivial check
    assert max(ttft_err) < 0.025, ttft_err
    assert max(itl_err) < 0.05, itl_err


def test_a_bad_dilation_or_a_context_other_than_the_servers_is_refused() -> None:
    settings = from_env({}, max_model_len=1024)
    with pytest.raises(ValueError, match="time_dilation must be > 0"):
        engine(settings, dilation=0.0)
    other = SchedulerConfig(kv_cache_tokens=4096, max_model_len=2048)
    with pytest.raises(ValueError, match="LLM_MAX_MODEL_LEN"):
        SimBatchedEngine(settings, other, stand_in_step_seconds)
