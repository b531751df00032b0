"""SSE parsing of a recorded stream, and one tiny end-to-end replay against a sim replica."""

from __future__ import annotations

import asyncio

from bench import client, trace
from server.bench import free_port, start_server

RECORDED = (
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"content":" the"},"finish_reason":null}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"content":" \\"fox\\""},"finish_reason":null}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{},"finish_reason":"length"}],"usage":{"prompt_tokens":5}}\n\n'
    b"data: [DONE]\n\n"
)


def test_sse_parser_handles_events_split_anywhere() -> None:
    for size in (1, 7, 64, len(RECORDED)):
        parser = client.SseParser()
        payloads = []
        for i in range(0, len(RECORDED), size):
            payloads += parser.feed(RECORDED[i:i + size])
        assert len(payloads) == 5
        assert [client.is_content(p) for p in payloads] == [False, True, True, False, False]
        assert payloads[-1] == b"[DONE]"


def test_replay_against_one_sim_replica() -> None:
    port = free_port()
    proc = start_server({"LLM_SIM_PREFILL_BASE_MS": "20", "LLM_SIM_PREFILL_MS_PER_TOKEN": "0",
                         "LLM_SIM_DECODE_BASE_MS": "10", "LLM_SIM_DECODE_MS_PER_SEQ": "0",
                         "LLM_MAX_CONCURRENCY": "4", "LLM_MAX_QUEUE": "0",
                         "LLM_LOG_LEVEL": "warning", "LLM_DRAIN_SECONDS": "1"}, port)
    try:
        wl = trace.Workload(prompt=trace.LogNormal(20, 0.3, 5, 40),
                            output=trace.LogNormal(8, 0.3, 2, 12))
        tr = trace.generate(20, 0.5, seed=4, workload=wl)
        reqs = tr.requests + (trace.Request(99, 0.6, tr.requests[0].messages, 500, 0),)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        records = asyncio.run(client.replay(reqs, lambda _r: url, "sim-llm", grace=10))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    good = [r for r in records if r.ok]
    assert len(good) + sum(r.status == 429 for r in records) == len(tr.requests)
    for r, q in zip(records, reqs):
        if r.ok:
            assert r.tokens == q.max_tokens
            assert 0.015 < r.ttft < 1.0
            assert len(r.gaps) == r.tokens - 1
    assert records[-1].status == 400 and not records[-1].ok  # max_tokens beyond LLM_MAX_TOKENS
