"""`python -m bench calibrate` against vLLM 0.33.0's OpenAI-compatible API: what it sends is
what that version accepts, and it reads the stream and the model card as that version writes
them (tests/contracts/data/vllm-0.33.0.streaming.json, each fact with its source line)."""

from __future__ import annotations

import asyncio
import json

import httpx

from bench import calibrate
from bench.calibrate_probe import Dialect, Runner, StreamRecord, _take
from tests.contracts import facts

STREAMING = facts.load("vllm", "0.33.0.streaming")


def test_the_facts_are_read_at_the_pinned_version():
    assert STREAMING["version"] == facts.pinned("vllm")["version"]
    for fact in ("request.StreamOptions", "usage.shouldIncludeUsage", "stream.finalUsageChunk",
                 "stream.continuousUsagePerChunk", "stream.mergedOutputs", "disconnect.abort",
                 "models.card", "version.route"):
        assert "vllm-project/vllm@v0.33.0:" in STREAMING["sources"][fact], fact


def test_calibrate_sends_only_fields_the_pinned_vllm_reads():
    body = Dialect().body("m", "hello", 64)
    request = STREAMING["request"]
    assert set(body) <= set(request["fieldsCalibrateSends"])
    assert set(body["stream_options"]) <= set(request["streamOptions"])
    # vLLM refuses stream_options without stream=True.
    assert body["stream"] is True or not request["streamOptionsRequireStream"]
    # Every request runs to its max_tokens (ignore_eos, min_tokens: sampling extensions).
    assert body["ignore_eos"] is True and body["min_tokens"] == body["max_tokens"]


def _vllm_stream() -> list[tuple[float, bytes]]:
    """A stream as vLLM 0.33.0 writes it with include_usage and continuous_usage_stats: the
    role chunk (usage 0 tokens), content chunks with the cumulative usage (the third merged
    from three tokens, as RequestOutputCollector merges when the API server lags), the finish
    chunk, the usage chunk with no choices, [DONE]."""
    first = STREAMING["stream"]["firstChunkDelta"]

    def chunk(delta, tokens, finish=None):
        return json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                           "created": 1, "model": "m",
                           "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                        "finish_reason": finish}],
                           "usage": {"prompt_tokens": 100, "completion_tokens": tokens,
                                     "total_tokens": 100 + tokens}}, separators=(",", ":"))
    final = json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                        "model": "m", "choices": STREAMING["stream"]["finalUsageChunkChoices"],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 6,
                                  "total_tokens": 106}})
    return [(0.00, chunk(first, 0).encode()), (0.05, chunk({"content": " a"}, 1).encode()),
            (0.06, chunk({"content": " b"}, 2).encode()),
            (0.09, chunk({"content": " c d e"}, 5).encode()),
            (0.10, chunk({"content": " f"}, 6, "length").encode()), (0.10, final.encode()),
            (0.10, STREAMING["stream"]["terminator"].removeprefix("data: ").encode())]


def test_calibrate_counts_vllm_tokens_exactly_from_the_cumulative_usage():
    rec = StreamRecord("fg", 0, 6)
    for t, payload in _vllm_stream():
        _take(rec, payload, t)
    assert rec.chunk_usage and rec.prompt_exact and rec.prompt_tokens == 100
    # The role chunk is not a token; the merged chunk brings three at once.
    assert rec.tokens == [(0.05, 1), (0.06, 2), (0.09, 5), (0.10, 6)]
    assert rec.usage_completion == 6 and rec.outcome == "finished"
    assert rec.content_events == 4  # fewer events than tokens: counting events would be wrong


def test_calibrate_reads_a_vllm_model_card_and_version():
    card = {"id": "llama", "object": "model", "created": 1,
            "owned_by": STREAMING["models"]["ownedBy"], "root": "/models/llama-3-8b",
            "parent": None, "max_model_len": 8192, "permission": []}
    assert set(card) == set(STREAMING["models"]["cardFields"])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            assert request.headers["authorization"] == "Bearer k"
            return httpx.Response(200, json={"object": "list", "data": [card]})
        if request.url.path == STREAMING["versionRoute"]["route"]:
            return httpx.Response(200, json=STREAMING["versionRoute"]["body"])
        return httpx.Response(404)

    async def discover():
        runner = Runner("http://vllm:8000", "k", 10, lambda _: None,
                        transport=httpx.MockTransport(handler))
        try:
            return await runner.discover(None, None)
        finally:
            await runner.close()

    info = asyncio.run(discover())
    assert info.model == "llama" and info.max_model_len == 8192 and info.version == "0.33.0"
    # A real endpoint reports no time dilation: times are taken as they are.
    assert not STREAMING["models"]["reportsTimeDilation"]
    assert info.time_dilation == 1.0 and "none reported" in info.dilation_source
    m = calibrate.Measurement(url=info.url, model=info.model, card=info.card,
                              version=info.version, hardware="1x H100", dilation=1.0,
                              dilation_source=info.dilation_source, accounting="exact",
                              notes=[], requests=0, seconds=0.0, probes=[], not_probed=[])
    assert calibrate._engine(m) == ("vllm", "0.33.0", "/models/llama-3-8b")
