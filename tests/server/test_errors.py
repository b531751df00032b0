"""Bad input -> 400 naming the field; 413; 404/405; 500 without a stack trace; settings."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import pytest
from pydantic import ValidationError
from starlette.testclient import TestClient

from server import SettingsError, create_app, from_env
from server.engines.base import SamplingParams, Token
from server.engines.sim import SimEngine

from .support import FAST_SIM, REPO, parse_metric

MODEL = "sim-llm"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    app = create_app(from_env({}, max_body_bytes=4096, max_model_len=64, max_tokens=16,
                              **FAST_SIM))
    with TestClient(app) as c:
        yield c


def post(client: TestClient, body: object, path: str = "/v1/chat/completions", **kw):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.post(path, content=content, headers={"content-type": "application/json"},
                       **kw)


def assert_error(resp, status: int, param: str | None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    if code:
        assert err["code"] == code
    return err


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL}, "messages"),
        ({"messages": USER}, "model"),
        ({"model": MODEL, "messages": "hi"}, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": MODEL, "messages": USER, "max_tokens": "5"}, "max_tokens"),
        ({"model": MODEL, "messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": USER, "max_tokens": 17}, "max_tokens"),
        ({"model": MODEL, "messages": USER, "max_completion_tokens": 99},
         "max_completion_tokens"),
        # max_completion_tokens wins, yet an out-of-range max_tokens is not silently ignored.
        ({"model": MODEL, "messages": USER, "max_completion_tokens": 4, "max_tokens": 99},
         "max_tokens"),
        ({"model": MODEL, "messages": USER, "temperature": 2.5}, "temperature"),
        ({"model": MODEL, "messages": USER, "top_p": 0}, "top_p"),
        ({"model": MODEL, "messages": USER, "stream": "yes"}, "stream"),
        ({"model": MODEL, "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": MODEL, "messages": USER, "stop": [""]}, "stop"),
        ({"model": MODEL, "messages": USER, "seed": 1.5}, "seed"),
        ({"model": MODEL, "messages": USER, "n": 2}, "n"),
    ],
)
def test_bad_chat_input_is_400_naming_the_field(client: TestClient, body: dict,
                                                param: str) -> None:
    err = assert_error(post(client, body), 400, param)
    assert param.split("[")[0] in err["message"]


@pytest.mark.parametrize("raw", ["{bad json", "", "[1, 2]", '"text"', b"\xff\xfe"])
def test_malformed_json_is_400(client: TestClient, raw: str | bytes) -> None:
    assert_error(post(client, raw), 400, None, "invalid_json")


def test_prompt_longer_than_context(client: TestClient) -> None:
    long = " ".join(["word"] * 80)  # 80 sim tokens > LLM_MAX_MODEL_LEN=64
    err = assert_error(post(client, {"model": MODEL, "messages": [
        {"role": "user", "content": long}]}), 400, "messages", "context_length_exceeded")
    assert "64" in err["message"]
    assert_error(post(client, {"model": MODEL, "prompt": long}, "/v1/completions"), 400,
                 "prompt", "context_length_exceeded")
    # fits alone, but not with the requested completion
    mid = " ".join(["word"] * 55)
    assert_error(post(client, {"model": MODEL, "prompt": mid, "max_tokens": 16},
                      "/v1/completions"), 400, "max_tokens", "context_length_exceeded")
    # without max_tokens the completion is clamped to what is left of the context
    ok = post(client, {"model": MODEL, "prompt": mid}, "/v1/completions")
    assert ok.status_code == 200
    assert ok.json()["usage"]["total_tokens"] == 64


@pytest.mark.parametrize(("body", "param"), [
    ({"model": MODEL, "prompt": 5}, "prompt"),
    ({"model": MODEL, "prompt": ["a", "b"]}, "prompt"),
    ({"model": MODEL, "prompt": "x", "echo": True}, "echo"),
])
def test_bad_completion_input(client: TestClient, body: dict, param: str) -> None:
    assert_error(post(client, body, "/v1/completions"), 400, param)


def test_invalid_requests_are_counted(client: TestClient) -> None:
    before = parse_metric(client.get("/metrics").text, "llm_requests_rejected_total",
                          'reason="invalid"')
    post(client, {"model": MODEL, "messages": []})
    post(client, "{")
    after = parse_metric(client.get("/metrics").text, "llm_requests_rejected_total",
                         'reason="invalid"')
    assert after == before + 2


def test_body_over_limit_is_413(client: TestClient) -> None:
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_error(post(client, big), 413, None, "request_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
        for _ in range(10):
            yield b" " * 1000

    resp = client.post("/v1/chat/completions", content=chunked())
    assert_error(resp, 413, None, "request_too_large")
    assert parse_metric(client.get("/metrics").text, "llm_requests_rejected_total",
                        'reason="too_large"') == 2
    # just under the limit is fine
    ok = post(client, {"model": MODEL, "messages": [{"role": "user", "content": "x" * 3000}],
                       "max_tokens": 1})
    assert ok.status_code == 200


def test_unknown_route_and_method_are_openai_errors(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing"), 404, None, "not_found")
    assert_error(client.get("/v1/chat/completions"), 405, None, "method_not_allowed")


class ExplodingEngine(SimEngine):
    async def generate(self, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[Token]:
        yield Token(" first")
        raise RuntimeError("secret-internal-detail")


def test_engine_crash_is_generic_500_and_process_survives() -> None:
    settings = from_env({}, **FAST_SIM)
    app = create_app(settings, engine=ExplodingEngine(settings))
    with TestClient(app, raise_server_exceptions=False) as c:
        resp = post(c, {"model": MODEL, "messages": USER})
        assert resp.status_code == 500
        assert "secret" not in resp.text and "Traceback" not in resp.text
        assert resp.json()["error"]["type"] == "server_error"
        streamed = post(c, {"model": MODEL, "messages": USER, "stream": True})
        assert streamed.status_code == 200
        assert "secret" not in streamed.text
        assert '"server_error"' in streamed.text and streamed.text.endswith("data: [DONE]\n\n")
        assert c.get("/health").status_code == 200
        # the slot was released both times
        assert c.app.state.llm.admission.running == 0


class PickyTemplateEngine(SimEngine):
    def encode_chat(self, messages):
        if messages[0]["role"] == "system":
            raise ValueError("System role not supported")
        return super().encode_chat(messages)


def test_chat_template_rejection_is_400_on_messages() -> None:
    settings = from_env({}, **FAST_SIM)
    app = create_app(settings, engine=PickyTemplateEngine(settings))
    with TestClient(app) as c:
        err = assert_error(post(c, {"model": MODEL, "messages": [
            {"role": "system", "content": "be brief"}]}), 400, "messages")
        assert "System role not supported" in err["message"]
        assert post(c, {"model": MODEL, "messages": USER, "max_tokens": 1}).status_code == 200


def test_blank_api_key_fails_closed_and_whitespace_is_trimmed() -> None:
    with pytest.raises(SettingsError, match="LLM_API_KEY is set but blank"):
        from_env({"LLM_API_KEY": " \n"})
    assert from_env({"LLM_API_KEY": "k3y\n"}).api_key.get_secret_value() == "k3y"
    assert from_env({}).api_key is None


def test_settings_errors_name_the_variable() -> None:
    with pytest.raises(SettingsError, match="LLM_MAX_QUEUE"):
        from_env({"LLM_MAX_QUEUE": "lots"})
    with pytest.raises(SettingsError, match="LLM_ENGINE"):
        from_env({"LLM_ENGINE": "vllm"})
    with pytest.raises(SettingsError, match="LLM_MODEL is required"):
        from_env({"LLM_ENGINE": "transformers"})
    s = from_env({"LLM_MAX_CONCURRENCY": "3", "LLM_API_KEY": "k", "LLM_PORT": "tcp://1.2.3.4:80"})
    assert s.max_concurrency == 3 and s.api_key.get_secret_value() == "k"
    with pytest.raises(ValidationError, match="frozen"):
        s.max_queue = 5


@pytest.mark.parametrize("command", [["-m", "server"], ["-m", "uvicorn", "server:app"]])
def test_bad_setting_fails_startup_of_the_real_command(command: list[str]) -> None:
    env = {"PATH": "/usr/bin:/bin", "LLM_DRAIN_SECONDS": "-1"}
    proc = subprocess.run([sys.executable, *command, "--port", "1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "LLM_DRAIN_SECONDS" in proc.stderr
    assert "Traceback" not in proc.stderr
