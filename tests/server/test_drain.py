"""Graceful drain with a real `uvicorn server:app` process and SIGTERM."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from .support import wait_ready

SLOW = {"LLM_ENGINE": "sim", "LLM_SIM_PREFILL_BASE_MS": "1", "LLM_SIM_PREFILL_MS_PER_TOKEN": "0",
        "LLM_SIM_DECODE_BASE_MS": "50", "LLM_SIM_DECODE_MS_PER_SEQ": "0"}


def _body(max_tokens: int, model: str = "sim-llm") -> dict:
    # greedy: the random-weight model then never ends early by chance
    return {"model": model, "messages": [{"role": "user", "content": "drain me"}],
            "max_tokens": max_tokens, "stream": True, "temperature": 0}


class StreamReader(threading.Thread):
    """Reads one SSE stream in the background; records tokens, finish reason and [DONE]."""

    def __init__(self, base: str, max_tokens: int, model: str = "sim-llm") -> None:
        super().__init__(daemon=True)
        self.base, self.max_tokens, self.model = base, max_tokens, model
        self.first_token = threading.Event()
        self.tokens = 0
        self.finish: str | None = None
        self.done = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.base + "/v1/chat/completions",
                              json=_body(self.max_tokens, self.model), timeout=60) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        choice = json.loads(line[6:])["choices"][0]
                        if choice["delta"].get("content"):
                            self.tokens += 1
                            self.first_token.set()
                        self.finish = choice["finish_reason"] or self.finish
        except BaseException as exc:  # reported by the test
            self.error = exc


def test_sigterm_lets_inflight_stream_finish_then_exits_0(server_process) -> None:
    sp = server_process({**SLOW, "LLM_DRAIN_SECONDS": "20"})
    reader = StreamReader(sp.base_url, max_tokens=30)  # ~1.5 s of decoding
    reader.start()
    assert reader.first_token.wait(10)
    sp.proc.send_signal(signal.SIGTERM)
    # draining: not ready, new work refused with 503, while the stream continues
    deadline = time.monotonic() + 2
    while httpx.get(sp.base_url + "/ready").status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert httpx.get(sp.base_url + "/ready").json() == {"status": "draining"}
    refused = httpx.post(sp.base_url + "/v1/chat/completions", json=_body(2))
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "draining"
    assert "retry-after" in refused.headers
    assert httpx.get(sp.base_url + "/health").status_code == 200
    assert reader.is_alive() and reader.tokens < 30

    reader.join(15)
    assert reader.error is None
    assert (reader.tokens, reader.finish, reader.done) == (30, "length", True)
    assert sp.proc.wait(timeout=10) == 0
    # after exit nothing listens any more
    try:
        httpx.get(sp.base_url + "/health", timeout=1)
        raise AssertionError("server still answering after exit")
    except httpx.TransportError:
        pass


def test_drain_deadline_cuts_long_streams_and_exits_0(server_process) -> None:
    sp = server_process({**SLOW, "LLM_DRAIN_SECONDS": "0.5"})
    reader = StreamReader(sp.base_url, max_tokens=200)  # ~10 s if left alone
    reader.start()
    assert reader.first_token.wait(10)
    t0 = time.monotonic()
    sp.proc.send_signal(signal.SIGTERM)
    assert sp.proc.wait(timeout=8) == 0
    assert time.monotonic() - t0 < 5
    reader.join(5)
    assert reader.error is None
    assert reader.finish == "abort" and reader.done and reader.tokens < 200
    assert "drain deadline passed" in sp.output()


def test_idle_sigterm_exits_0_quickly(server_process) -> None:
    sp = server_process({"LLM_DRAIN_SECONDS": "30"})
    t0 = time.monotonic()
    sp.proc.send_signal(signal.SIGTERM)
    assert sp.proc.wait(timeout=10) == 0
    assert time.monotonic() - t0 < 3


# --- the transformers engine: its step loop keeps serving the in-flight streams ----------------


def _transformers(model_dir, drain_seconds: str) -> dict:
    return {"LLM_ENGINE": "transformers", "LLM_MODEL": str(model_dir), "HF_HUB_OFFLINE": "1",
            "LLM_SERVED_MODEL_NAME": "small", "LLM_MAX_TOKENS": "400", "LLM_MAX_MODEL_LEN": "512",
            "LLM_DRAIN_SECONDS": drain_seconds, "LLM_DEVICE": "cpu"}


@pytest.mark.parametrize("drain_seconds, max_tokens, finish",
                         [("30", 100, "length"), ("0.3", 400, "abort")])
def test_transformers_engine_drains(server_process, small_llama_dir, drain_seconds: str,
                                    max_tokens: int, finish: str) -> None:
    # ~23 M parameters: each token is a real forward pass (over 10 ms on these CPUs). Loading
    # torch, transformers and the model can take long on a busy 2-core machine.
    sp = server_process(_transformers(small_llama_dir, drain_seconds), wait=False)
    wait_ready(sp.base_url, timeout=240, proc=sp.proc)
    reader = StreamReader(sp.base_url, max_tokens=max_tokens, model="small")
    reader.start()
    assert reader.first_token.wait(30)
    sp.proc.send_signal(signal.SIGTERM)
    at_signal = reader.tokens
    refused = httpx.post(sp.base_url + "/v1/chat/completions", json=_body(2, "small"))
    assert refused.status_code == 503
    assert sp.proc.wait(timeout=60) == 0
    reader.join(10)
    assert reader.error is None and reader.done
    assert at_signal < max_tokens
    assert reader.finish == finish
    if finish == "length":
        assert reader.tokens == max_tokens
    else:
        assert reader.tokens < max_tokens and "drain deadline passed" in sp.output()
