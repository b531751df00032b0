"""``python -m bench calibrate``: the probe plan's bounds, the fit of both scheduler kinds on
synthetic probes, refusal, the fall-back without stream usage, and one short real calibration
of a sim server process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from bench import calibrate, calibrate_fit, calibrate_probe
from bench.calibrate_probe import PlannedProbe, plan_probes
from bench.profile_cli import steady_latency
from server.engines.profile import load_profile, parse_profile
from tests.bench.calibrate_sim import SimEndpoint, run
from tests.server.support import REPO, free_port, wait_ready

GRID = [(p, c) for c in (1, 8, 32, 128) for p in (128, 512, 2048)]


def _probes(grid: list[tuple[int, int]], hold: tuple[int, int] | None = (2048, 128)
            ) -> list[tuple[int, int, int]]:
    return [(p, c, calibrate_probe.HOLD_TOKENS if (p, c) == hold else 0) for p, c in grid]


# --- the plan --------------------------------------------------------------------------------


def test_the_plan_stays_within_the_request_cap_dropping_the_highest_concurrency_first():
    full = plan_probes([128, 512, 2048], [1, 8, 32, 128], 5, 10_000)
    assert full.requests == calibrate_probe.SIZING_REQUESTS + sum(p.requests for p in full.probes)
    assert len(full.probes) == 12 and not full.dropped
    capped = plan_probes([128, 512, 2048], [1, 8, 32, 128], 5, 200)
    assert capped.requests <= 200
    assert {p.concurrency for p in capped.probes} == {1, 8, 32}
    assert "concurrency 128" in capped.dropped[0] and "cap is 200" in capped.dropped[0]
    tiny = plan_probes([128, 512], [1, 8], 5, 20)
    assert tiny.requests <= 20 and {p.concurrency for p in tiny.probes} == {1}
    with pytest.raises(ValueError, match="cannot hold even one probe"):
        plan_probes([128], [1], 5, 5)


def test_each_probe_gets_a_deadline_and_the_last_one_ends_within_the_minutes():
    plan = plan_probes([128, 512, 2048], [1, 8, 32, 128], 2, 10_000)
    start = 1000.0
    end = start + plan.seconds - calibrate_probe.FIT_SECONDS
    now = start
    for i in range(len(plan.probes)):  # the worst case: every probe runs to its deadline
        deadline = plan.deadline(i, now, end)
        assert now < deadline <= end
        now = deadline
    assert now <= start + 2 * 60
    # The largest probe holds its streams for the KV bound; the others do not.
    held = [p for p in plan.probes if p.hold]
    assert held == [PlannedProbe(2048, 128, calibrate_probe.HOLD_TOKENS)]


# --- the fit on synthetic probes --------------------------------------------------------------


def test_the_fit_recovers_a_slots_profile_from_synthetic_probes():
    truth = load_profile("cpu-sim")
    observed = calibrate_fit.observe(run(SimEndpoint(truth, cached_fraction=1.0), _probes(GRID)))
    choice = calibrate_fit.choose(observed)
    assert choice.kind == "slots"
    assert choice.other is not None and choice.other.rms_log > 20 * choice.best.rms_log
    p = choice.best.params
    assert p["decode_base_ms"] == pytest.approx(30, rel=0.01)
    assert p["decode_ms_per_seq"] == pytest.approx(1.0, rel=0.01)
    assert p["prefill_ms_per_token"] == pytest.approx(0.25, rel=0.01)
    assert p["prefill_base_ms"] == pytest.approx(51, rel=0.01)  # 50 + the request's 1 ms way
    assert set(observed.limits.values()) == {8}  # 32 and 128 streams queued behind 8
    assert observed.caching


def test_the_fit_recovers_a_continuous_profile_from_synthetic_probes():
    truth = load_profile("h200-llama8b")
    records = run(SimEndpoint(truth, cached_fraction=1.0), _probes(GRID))
    observed = calibrate_fit.observe(records)
    choice = calibrate_fit.choose(observed)
    assert choice.kind == "continuous"
    assert choice.other is not None and choice.other.rms_log > 20 * choice.best.rms_log
    assert choice.best.worst_abs < 0.01
    lo, hi = observed.budget
    assert lo <= truth.scheduler.max_num_batched_tokens < hi
    assert not observed.limits and observed.most_running == 128
    # The KV lower bound covers 128 requests of 2048 + 128 tokens (the held probe).
    assert observed.kv_held >= 128 * (2048 + 128)
    data = calibrate.profile_data(choice, _measurement(records), "fitted")
    fitted = parse_profile(data)
    for prompt in (128, 512, 2048):
        for streams in (1, 8, 32, 128):
            for a, b in zip(steady_latency(fitted, prompt, streams),
                            steady_latency(truth, prompt, streams), strict=True):
                assert a == pytest.approx(b, rel=0.02), (prompt, streams)


def test_a_continuous_engine_that_queues_shows_its_max_num_seqs():
    truth = load_profile("h200-llama8b")
    small = truth.model_copy(update={"scheduler": truth.scheduler.model_copy(
        update={"max_num_seqs": 24})})
    observed = calibrate_fit.observe(run(SimEndpoint(small), _probes([(512, 1), (512, 8),
                                                                       (512, 32)], None)))
    assert observed.limits == {"prompt 512 x 32 streams": 24}
    choice = calibrate_fit.choose(observed)
    assert choice.kind == "continuous"
    data = calibrate.profile_data(choice, _measurement([]), "fitted")
    assert data["scheduler"]["max_num_seqs"] == 24
    assert "queued behind 24" in data["scheduler"]["notes"]


def _measurement(records: list[calibrate_probe.ProbeRecord], **kw) -> calibrate.Measurement:
    base = dict(url="http://127.0.0.1:1/v1", model="m", card={}, version=None,
                hardware="unknown", dilation=1.0, dilation_source="none reported",
                accounting="exact", notes=[], requests=0, seconds=1.0, probes=records,
                not_probed=[])
    return calibrate.Measurement(**(base | kw))


# --- refusal ---------------------------------------------------------------------------------


def test_a_fit_that_misses_is_refused_naming_the_probes_that_disagree(tmp_path, capsys):
    records = run(SimEndpoint(load_profile("cpu-sim")), _probes(GRID[:6], None))
    odd = records[4]  # prompt 512 x 8 streams, as if everything had run 1.5 times slower
    assert odd.name == "prompt 512 x 8 streams"
    for s in odd.streams:
        s.sent *= 1.5
        s.ended = None if s.ended is None else 1.5 * s.ended
        s.tokens = [(1.5 * t, n) for t, n in s.tokens]
    odd.marks = {k: 1.5 * v for k, v in odd.marks.items()}
    raw, out = tmp_path / "m.json", tmp_path / "p.yaml"
    _measurement(records).save(raw)
    code = calibrate.main(["--refit", str(raw), "--out", str(out), "--max-error", "15"])
    err = capsys.readouterr().err
    assert code == calibrate.EXIT_REFUSED
    assert not out.exists()
    assert "refusing the fit" in err and "prompt 512 x 8 streams" in err
    assert "prompt 128 x 8 streams" not in err  # the others agree
    # The same measurement with that probe left out fits.
    _measurement(records[:4] + records[5:]).save(raw)
    assert calibrate.main(["--refit", str(raw), "--out", str(out)]) == 0
    assert load_profile(out).provenance.source == "measured-endpoint"


# --- no usage in the stream -------------------------------------------------------------------


def _no_usage_endpoint() -> httpx.MockTransport:
    """An OpenAI-compatible endpoint that ignores stream_options and reports no usage at all:
    each request prefills 4 ms + 20 us a word alone, then streams a token every 5 ms."""

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "plain"}]})
        if request.url.path != "/v1/chat/completions":
            return httpx.Response(404, json={"error": "not found"})
        body = json.loads(request.content)
        words = len(body["messages"][0]["content"].split())
        if not body.get("stream"):
            return httpx.Response(200, json={"choices": [{"index": 0, "message": {
                "role": "assistant", "content": "x"}, "finish_reason": "length"}]})

        async def events():
            yield b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
            await asyncio.sleep(0.004 + 2e-5 * words)
            for _ in range(body["max_tokens"]):
                yield b'data: {"choices":[{"index":0,"delta":{"content":" w"}}]}\n\n'
                await asyncio.sleep(0.005)
            yield b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n'
            yield b"data: [DONE]\n\n"

        return httpx.Response(200, content=events(),
                              headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handler)


def test_without_stream_usage_calibrate_falls_back_and_says_so(tmp_path):
    plan = plan_probes([16], [1, 2], 0.6, 100)
    measured = asyncio.run(calibrate.measure("http://fake:1", None, None, None, "unknown", plan,
                                             transport=_no_usage_endpoint()))
    assert measured.accounting.startswith("APPROXIMATE")
    assert "no usage" in measured.accounting and "unverified" in measured.accounting
    assert any("ASSUMED at one token per word" in n for n in measured.notes)
    assert len(measured.probes) == 2 and measured.dilation == 1.0
    out = tmp_path / "p.yaml"
    code = calibrate.analyse(measured, out, "plain", 0.5)
    assert code == 0
    notes = load_profile(out).provenance.notes or ""
    assert "Token counts: APPROXIMATE" in notes and "ASSUMED" in notes


# --- a real sim server ------------------------------------------------------------------------

TINY = {
    "name": "tiny-slots",
    "summary": "A small slots profile for the calibration test.",
    "provenance": {"source": "chosen", "engine": {"name": "sim", "version": "slots"},
                   "model": "none", "hardware": "any", "date": "2026-12-04",
                   "method": "chosen for a fast test"},
    "scheduler": {"kind": "slots", "slots": 4, "prefix_cache_tokens": 8192},
    "cost": {"form": "slots-linear", "params": {
        "prefill_base_ms": 40, "prefill_ms_per_token": 0.1, "prefill_ms_per_cached_token": 0,
        "decode_base_ms": 10, "decode_ms_per_seq": 1.0}},
}
DILATION = 2.0
SHARED_MACHINE = 60
"""--max-error (percent) of the real-server tests: they share 2 cores with whatever else runs,
and a TTFT there is a single request of tens of milliseconds. Refusal is tested on synthetic
probes; these check that a calibration runs end to end and finds what it should."""


@contextlib.contextmanager
def sim_server(profile: str, dilation: float, concurrency: int):
    """One sim server process on 127.0.0.1 (a free port), stopped at the end."""
    port = free_port()
    env = {**os.environ, "LLM_ENGINE": "sim", "LLM_SIM_PROFILE": profile,
           "LLM_SIM_TIME_DILATION": str(dilation), "LLM_MAX_CONCURRENCY": str(concurrency),
           "LLM_MAX_MODEL_LEN": "2048", "LLM_API_KEY": "test-key"}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "server:app", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning",
                             "--no-access-log"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def tiny_server(tmp_path):
    path = tmp_path / "tiny-slots.yaml"
    path.write_text(yaml.safe_dump(TINY))
    with sim_server(str(path), DILATION, 4) as url:
        yield url


def test_a_short_calibration_of_a_dilated_sim_server_recovers_its_profile(tiny_server, tmp_path,
                                                                           capsys):
    out = tmp_path / "fitted.yaml"
    started = time.monotonic()
    code = calibrate.main(["--url", tiny_server, "--api-key", "test-key", "--out", str(out),
                           "--prompts", "32,256", "--concurrency", "1,4,8", "--minutes", "1",
                           "--hardware", "test machine", "--max-error", str(SHARED_MACHINE)])
    elapsed = time.monotonic() - started
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert elapsed < 60
    assert "time dilation 2 (the endpoint's /v1/models card)" in printed
    assert "fit per probe (slots model" in printed and "prompt 256 x 8 streams" in printed
    assert "one content event per token, confirmed by the final usage" in printed
    fitted = load_profile(out)
    v = fitted.provenance
    assert v.source == "measured-endpoint" and v.hardware == "test machine"
    assert v.engine.name == "sim" and "tiny-slots" in v.engine.version
    assert "Time dilation 2" in (v.notes or "")
    assert fitted.kind == "slots" and fitted.scheduler.slots == 4  # 8 streams queued behind 4
    p = fitted.cost.params
    # Undilated: the profile's own numbers, not twice them.
    assert p.decode_base_ms == pytest.approx(10, rel=0.25)
    assert p.decode_ms_per_seq == pytest.approx(1.0, abs=0.5)
    assert p.prefill_ms_per_token == pytest.approx(0.1, rel=0.5)
    assert 36 <= p.prefill_base_ms <= 60  # plus the request's way in and out
    assert {c.file for c in fitted.fit.cells} >= {"prompt 32 x 1 stream", "prompt 256 x 4 streams"}


def test_a_short_calibration_of_a_dilated_continuous_sim_server(tmp_path, capsys):
    """The GPU regime: h200-llama8b's step model under vLLM's scheduler, dilated 4x."""
    out = tmp_path / "fitted.yaml"
    with sim_server("h200-llama8b", 4.0, 1024) as url:
        code = calibrate.main(["--url", url, "--api-key", "test-key", "--out", str(out),
                               "--prompts", "128,1024", "--concurrency", "1,8",
                               "--minutes", "1", "--hold", "16",
                               "--max-error", str(SHARED_MACHINE)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    fitted, truth = load_profile(out), load_profile("h200-llama8b")
    assert fitted.kind == "continuous"
    assert "latency profile h200-llama8b (continuous)" in fitted.provenance.engine.version
    s = fitted.scheduler
    assert s.max_num_seqs == 8 and "LOWER BOUND" in (s.notes or "")  # nothing queued at 8
    assert s.enable_prefix_caching
    # Undilated and close to the profile it came from where it was probed (requests of 16
    # output tokens: the KV lower bound covers what the probes held). Inter-token times come
    # from windows of steps; a TTFT here rests on single requests of ~10 ms undilated on a
    # shared machine, so it gets a wider band (the round trip in docs/latency-profiles.md runs
    # alone on the machine, with the full grid).
    assert s.kv_cache_tokens >= 8 * (1024 + 16)
    for prompt in (128, 1024):
        for streams in (1, 8):
            (ttft, itl), (ttft0, itl0) = (steady_latency(fitted, prompt, streams, 16),
                                          steady_latency(truth, prompt, streams, 16))
            assert itl == pytest.approx(itl0, rel=0.1), (prompt, streams)
            assert ttft == pytest.approx(ttft0, rel=0.3), (prompt, streams)
