"""Fuzzing the OpenAI-compatible server in-process (ASGI, no ports): never a 5xx, never a crash.

The app is built with ``openapi_url=None`` and its generation handlers parse the raw body
themselves (``routes._parse``), so FastAPI's own schema has no request bodies and only a bare
``200``. The schema fuzzed here is FastAPI's ``app.openapi()`` completed with what the server
documents (server/README.md): the request bodies are the pydantic request models' JSON schemas,
and the responses list the documented status codes with the OpenAI error body. Schemathesis
then generates bodies that match that schema (positive) and that violate it (negative); both go
through the server's real validation.

A second part posts arbitrary JSON values, mutated valid bodies and arbitrary bytes with
Hypothesis directly. Every test counts the requests it sent (``conftest.REQUESTS``) and asserts
its own minimum, and ``test_request_budget`` checks the planned total is at least 1,000.
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.testclient import TestClient

from server import create_app, from_env
from server.api.schemas import ChatCompletionRequest, CompletionRequest

from .conftest import REQUESTS

API_KEY = "fuzz-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_TOKENS = 32
MAX_MODEL_LEN = 256
# Generation takes microseconds: the fuzzer, not the sim, sets the pace.
FAST = {
    "engine": "sim", "api_key": API_KEY, "max_tokens": MAX_TOKENS, "max_model_len": MAX_MODEL_LEN,
    "sim_prefill_base_ms": 0.0, "sim_prefill_ms_per_token": 0.0, "sim_decode_base_ms": 0.01,
    "sim_decode_ms_per_seq": 0.0, "retry_after_seconds": 1,
}
SETTINGS = from_env({}, **FAST)
MODEL = SETTINGS.model_name

HYPOTHESIS = {
    "derandomize": True, "deadline": None, "database": None, "print_blob": True,
    "suppress_health_check": list(HealthCheck),
    # No shrinking budget worth waiting for in CI; Hypothesis still reports the failing input.
    "phases": [Phase.explicit, Phase.generate, Phase.shrink],
}


# --- the schema --------------------------------------------------------------------------

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string", "minLength": 1},
                "type": {"type": "string", "minLength": 1},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {k: {"type": "integer", "minimum": 0}
                   for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
}
FINISH = {"enum": ["stop", "length"]}
CHAT_RESPONSE = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "object": {"const": "chat.completion"},
        "model": {"const": MODEL},
        "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
            "type": "object", "required": ["index", "message", "finish_reason"],
            "properties": {
                "message": {"type": "object", "required": ["role", "content"],
                            "properties": {"role": {"const": "assistant"},
                                           "content": {"type": "string"}}},
                "finish_reason": FINISH,
            }}},
        "usage": USAGE,
    },
}
COMPLETION_RESPONSE = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "object": {"const": "text_completion"},
        "model": {"const": MODEL},
        "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
            "type": "object", "required": ["index", "text", "finish_reason"],
            "properties": {"text": {"type": "string"}, "finish_reason": FINISH}}},
        "usage": USAGE,
    },
}
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
MODELS_RESPONSE = {
    "type": "object", "required": ["object", "data"],
    "properties": {"object": {"const": "list"}, "data": {
        "type": "array", "minItems": 1,
        "items": {"type": "object", "required": ["id", "object"],
                  "properties": {"id": {"const": MODEL}, "object": {"const": "model"}}}}},
}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": ERROR_SCHEMA}}}


def _body_schema(model: type, components: dict) -> dict:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    # Aim most positive cases at the served model and within LLM_MAX_TOKENS (bounds the README
    # documents), so they reach generation instead of stopping at 404/400.
    schema["properties"]["model"] = {"type": "string", "enum": [MODEL]}
    for name in ("max_tokens", "max_completion_tokens"):
        if name in schema["properties"]:
            schema["properties"][name] = {"anyOf": [
                {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS}, {"type": "null"}]}
    return schema


def build_schema(app: Any) -> dict:
    doc = copy.deepcopy(app.openapi())
    components: dict = {}
    bodies = {"/v1/chat/completions": (ChatCompletionRequest, CHAT_RESPONSE),
              "/v1/completions": (CompletionRequest, COMPLETION_RESPONSE)}
    for path, (model, ok) in bodies.items():
        op = doc["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": _body_schema(model, components)}}}
        op["responses"] = {
            "200": {"description": "completion, or its chunks when `stream` is true", "content": {
                "application/json": {"schema": ok},
                # Schemathesis validates each SSE event ({"event", "data"}) against this.
                "text/event-stream": {"schema": SSE_EVENT}}},
            "400": _error("invalid request"), "401": _error("missing or wrong API key"),
            "404": _error("unknown model"), "413": _error("body too large"),
            "429": _error("overloaded"), "503": _error("draining or loading"),
        }
    doc["paths"]["/v1/models"]["get"]["responses"] = {
        "200": {"description": "the served model",
                "content": {"application/json": {"schema": MODELS_RESPONSE}}},
        "401": _error("missing or wrong API key"), "503": _error("draining"),
    }
    for path in ("/health", "/ready"):
        doc["paths"][path]["get"]["responses"] = {
            code: {"description": code, "content": {"application/json": {"schema": {
                "type": "object", "required": ["status"],
                "properties": {"status": {"type": "string"}}}}}}
            for code in ("200", "503")}
    doc["paths"]["/metrics"]["get"]["responses"] = {
        "200": {"description": "Prometheus text", "content": {"text/plain": {"schema": {
            "type": "string"}}}}}
    doc.setdefault("components", {})["schemas"] = components
    return doc


APP = create_app(SETTINGS)
SCHEMA = schemathesis.openapi.from_dict(build_schema(APP))
SCHEMA.app = APP  # requests go to the app in-process, lifespan included

POSITIVE_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
                   response_schema_conformance]
NEGATIVE_CHECKS = [*POSITIVE_CHECKS, negative_data_rejection]

P, N = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
# (path, method, mode, max_examples). Parameterless GETs have a single distinct request, which
# Hypothesis sends once; the POST bodies carry the volume.
PLAN = [
    ("/v1/chat/completions", "POST", P, 300),
    ("/v1/chat/completions", "POST", N, 220),
    ("/v1/completions", "POST", P, 300),
    ("/v1/completions", "POST", N, 220),
    ("/v1/models", "GET", P, 5),
    ("/health", "GET", P, 5),
    ("/ready", "GET", P, 5),
    ("/metrics", "GET", P, 5),
]
UNAUTHENTICATED_EXAMPLES = 40
MIN_SCHEMA_REQUESTS = 1000


@pytest.fixture(autouse=True)
def app_ready() -> None:
    """Start the app's lifespan (schemathesis runs it per test) and wait for the model."""
    ready = SCHEMA["/ready"]["GET"].Case()
    deadline = time.monotonic() + 10
    while ready.call().status_code != 200:
        assert time.monotonic() < deadline, "the sim engine did not become ready"
        time.sleep(0.01)


def test_request_budget() -> None:
    planned = sum(n for _, method, _, n in PLAN if method == "POST")
    assert planned >= MIN_SCHEMA_REQUESTS


@pytest.mark.parametrize(("path", "method", "mode", "examples"), PLAN,
                         ids=[f"{m} {p} {mode.value}" for p, m, mode, _ in PLAN])
def test_schema_fuzz(path: str, method: str, mode: GenerationMode, examples: int) -> None:
    operation = SCHEMA[path][method]
    checks = POSITIVE_CHECKS if mode is P else NEGATIVE_CHECKS
    statuses: Counter[int] = Counter()

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, **HYPOTHESIS)
    def run(case: schemathesis.Case) -> None:
        response = case.call_and_validate(headers=AUTH, checks=checks)
        statuses[response.status_code] += 1
        if response.status_code == 200 and "text/event-stream" in response.headers.get(
                "content-type", ""):
            # A failure after the first byte is an SSE error event inside a 200.
            assert "server_error" not in response.text, response.text
            assert response.text.endswith("data: [DONE]\n\n"), response.text[-200:]

    run()
    sent = sum(statuses.values())
    REQUESTS[f"schemathesis {method} {path} {mode.value}"] += sent
    assert not [s for s in statuses if s >= 500], statuses
    if method == "POST":
        assert sent >= examples, f"only {sent} of {examples} examples ran: {statuses}"
        if mode is P:
            # Schema-valid bodies must mostly get through validation to the engine.
            assert statuses[200] >= sent // 3, statuses
    else:
        assert sent >= 1


@pytest.mark.parametrize("path,method", sorted({(p, m) for p, m, _, _ in PLAN}))
def test_schema_fuzz_without_api_key(path: str, method: str) -> None:
    """Without (or with a fuzzed) Authorization header, /v1/* is always 401, never a 5xx."""
    operation = SCHEMA[path][method]
    statuses: Counter[int] = Counter()

    @given(case=operation.as_strategy(generation_mode=P),
           auth=st.none() | st.text(max_size=40).map(lambda t: {"Authorization": t})
           | st.text(max_size=20).map(lambda t: {"Authorization": "Bearer " + t}))
    @settings(max_examples=UNAUTHENTICATED_EXAMPLES, **HYPOTHESIS)
    def run(case: schemathesis.Case, auth: dict | None) -> None:
        if auth is not None:
            try:
                auth["Authorization"].encode("latin-1")
            except UnicodeEncodeError:
                auth = None  # not sendable as an HTTP header
        if auth is not None and API_KEY in auth["Authorization"]:
            auth = None
        response = case.call_and_validate(
            headers=auth, checks=[not_a_server_error, status_code_conformance])
        statuses[response.status_code] += 1
        if path.startswith("/v1/"):
            assert response.status_code == 401, response.text
            assert response.json()["error"]["code"] == "invalid_api_key"

    run()
    REQUESTS[f"schemathesis {method} {path} no-key"] += sum(statuses.values())
    assert not [s for s in statuses if s >= 500], statuses


# --- arbitrary bodies, straight to the routes -----------------------------------------------

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
VALID = {
    "/v1/chat/completions": {"model": MODEL, "max_tokens": 4,
                             "messages": [{"role": "user", "content": "hello there"}]},
    "/v1/completions": {"model": MODEL, "max_tokens": 4, "prompt": "hello there"},
}
FIELDS = sorted(set(ChatCompletionRequest.model_fields) | set(CompletionRequest.model_fields)
                | {"role", "content", "type", "text", "include_usage"})

# Any code point, lone surrogates included (json.dumps escapes them as \udXXX, which is valid
# JSON text that decodes to a str Python cannot encode as UTF-8).
any_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF,
                                 exclude_categories=()), max_size=30)
scalars = (st.none() | st.booleans() | st.integers() | st.integers(-3, 300)
           | st.floats(allow_nan=True, allow_infinity=True) | any_text
           | st.sampled_from(["", MODEL, "user", "text", "\ud800", "hi \udfff there"]))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(FIELDS) | any_text, inner, max_size=5),
    max_leaves=25,
)


@st.composite
def mutated_bodies(draw: st.DrawFn, path: str) -> Any:
    """A valid body with one (possibly nested) field replaced, added or removed."""
    body = copy.deepcopy(VALID[path])
    target = body
    if path.endswith("chat/completions") and draw(st.booleans()):
        target = body["messages"][0]
        if draw(st.booleans()):
            body["messages"] = draw(st.lists(st.just(target), min_size=1, max_size=3))
    key = draw(st.sampled_from(FIELDS) | any_text)
    if draw(st.integers(0, 9)) == 0:
        target.pop(key, None)
    else:
        target[key] = draw(json_values)
    if draw(st.booleans()):
        body["stream"] = True
    return body


def _dump(value: Any) -> bytes:
    # NaN/Infinity are not JSON; json.dumps writes them anyway, as Python's json.loads accepts.
    return json.dumps(value).encode()


@pytest.fixture(scope="module")
def raw_client():
    """A second app with its own lifespan, driven by Starlette's TestClient (no sockets)."""
    app = create_app(SETTINGS)
    with TestClient(app, raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 10
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield client


def check_answer(response: Any) -> None:
    """Never a 5xx; 4xx carry an OpenAI error body; 200 streams end cleanly."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        err = response.json()["error"]
        assert isinstance(err["message"], str) and err["message"], err
        assert isinstance(err["type"], str) and err["type"], err
        assert "param" in err and "code" in err, err
        assert err["type"] != "server_error", err
    else:
        assert response.status_code == 200, response.text[:500]
        if "text/event-stream" in response.headers["content-type"]:
            assert "server_error" not in response.text, response.text
            assert response.text.endswith("data: [DONE]\n\n"), response.text[-200:]
        else:
            assert response.json()["choices"], response.text


def _post(client: TestClient, path: str, content: bytes, label: str) -> Any:
    response = client.post(path, content=content,
                           headers={**AUTH, "Content-Type": "application/json"})
    REQUESTS[label] += 1
    check_answer(response)
    return response


@pytest.mark.parametrize("path", GENERATION_PATHS)
@settings(max_examples=150, **HYPOTHESIS)
@given(value=json_values)
def test_arbitrary_json_body(raw_client: TestClient, path: str, value: Any) -> None:
    _post(raw_client, path, _dump(value), f"hypothesis POST {path} json")


@pytest.mark.parametrize("path", GENERATION_PATHS)
@settings(max_examples=200, **HYPOTHESIS)
@given(data=st.data())
def test_mutated_valid_body(raw_client: TestClient, path: str, data: st.DataObject) -> None:
    _post(raw_client, path, _dump(data.draw(mutated_bodies(path))),
          f"hypothesis POST {path} mutated")


@pytest.mark.parametrize("path", GENERATION_PATHS)
@settings(max_examples=60, **HYPOTHESIS)
@given(body=st.binary(max_size=300)
       | st.builds(lambda b, tail: json.dumps(b).encode()[:-1] + tail,
                   st.just(VALID["/v1/completions"]), st.binary(max_size=10)))
def test_arbitrary_bytes_body(raw_client: TestClient, path: str, body: bytes) -> None:
    _post(raw_client, path, body, f"hypothesis POST {path} bytes")


@pytest.mark.parametrize("path", GENERATION_PATHS)
@pytest.mark.parametrize("text", ["\ud800", "a \udfff b", "\udc80\ud800"])
def test_lone_surrogate_in_text_is_a_client_error(raw_client: TestClient, path: str,
                                                  text: str) -> None:
    """Regression (found by the fuzzer): JSON like {"prompt": "\\ud800"} is valid JSON text but
    decodes to a str that is not valid Unicode; it must be a 400, not a 500."""
    for field in ("prompt", "model", "stop", "user", "content"):
        body = copy.deepcopy(VALID[path])
        if field == "content":
            if "messages" not in body:
                continue
            body["messages"][0]["content"] = text
        elif field == "prompt" and "prompt" not in body:
            continue
        else:
            body[field] = text
        response = _post(raw_client, path, _dump(body), f"regression POST {path} surrogate")
        assert response.status_code == 400, (field, response.text)
