"""Routes: OpenAI-compatible `/v1/*`, plus `/health`, `/ready`, `/metrics`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from server.admission import Aborted, Overloaded
from server.api.generation import ADMITTED, Finished
from server.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    _SamplingRequest,
    field_names,
    new_id,
    now,
    usage,
)
from server.engines.base import SamplingParams
from server.errors import APIError, from_validation_errors, invalid
from server.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from server.state import AppState

_log = logging.getLogger(__name__)
router = APIRouter()


def _state(request: Request) -> AppState:
    return request.app.state.llm


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    st = _state(request)
    if st.load_error is not None:
        # The cause (exception text, paths) is in the replica's log; /health is not gated by
        # the API key, so it answers only a generic status.
        return JSONResponse({"status": "error"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    st = _state(request)
    if st.drain.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not st.loaded:
        status = "error" if st.load_error else "loading"
        return JSONResponse({"status": status}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    st = _state(request)
    card: dict[str, Any] = {
        "id": st.settings.model_name,
        "object": "model",
        "created": st.started,
        "owned_by": "llm-serving",
        "root": st.settings.model or st.settings.model_name,
        "max_model_len": st.engine.context_length,
        "engine": st.engine.kind,
        "ready": st.loaded,
    }
    card.update(st.engine.model_card())
    return JSONResponse({"object": "list", "data": [card]})


async def _parse(request: Request, model: type[_SamplingRequest]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"Malformed JSON body: {exc}", None, code="invalid_json") from None
    except RecursionError:  # nested deeper than the interpreter's recursion limit
        raise _too_deep() from None
    if json_depth_exceeds(data, raw, MAX_JSON_DEPTH):
        raise _too_deep()
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object.", None, code="invalid_json")
    if b"\\u" in raw:
        # JSON may escape a lone UTF-16 surrogate (`"\\ud800"`): valid JSON, but the str it
        # decodes to is not Unicode text; tokenizers and error messages echoing it would 500.
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise invalid("The request body contains an unpaired UTF-16 surrogate escape "
                          "(such as \\ud800), which is not valid Unicode text.", None,
                          code="invalid_json") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors(), field_names(model)) from None


MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays/objects a request body may have (OpenAI requests need about 6)."""


def _too_deep() -> Exception:
    return invalid(f"The request body is nested deeper than {MAX_JSON_DEPTH} levels.", None,
                   code="invalid_json")


def json_depth_exceeds(data: object, raw: bytes, limit: int) -> bool:
    """Whether ``data`` (parsed from ``raw``) nests arrays/objects more than ``limit`` deep.

    Iterative, so it cannot overflow the stack; skipped when ``raw`` has too few brackets to
    reach the limit at all (the common case costs two ``bytes.count`` calls).
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _check_common(st: AppState, req: _SamplingRequest, requested: int | None,
                  prompt_ids: list[int], prompt_param: str,
                  max_param: str = "max_tokens") -> SamplingParams:
    if req.model != st.settings.model_name:
        raise APIError(404, f"The model `{req.model}` does not exist; this server serves "
                       f"`{st.settings.model_name}`.", param="model", code="model_not_found")
    if not st.loaded:
        raise APIError(503, "The model is still loading.", type="service_unavailable_error",
                       code="model_not_ready",
                       headers={"Retry-After": str(st.settings.retry_after_seconds)})
    limit = st.settings.max_tokens
    context = st.engine.context_length
    n_prompt = len(prompt_ids)
    if n_prompt == 0:
        raise invalid("The prompt is empty.", prompt_param)
    if n_prompt >= context:
        raise invalid(f"This model's maximum context length is {context} tokens; the prompt has "
                      f"{n_prompt} tokens.", prompt_param, code="context_length_exceeded")
    if requested is None:
        max_tokens = min(limit, context - n_prompt)
    else:
        if requested > limit:
            raise invalid(f"{max_param} must be at most {limit} (LLM_MAX_TOKENS); got "
                          f"{requested}.", max_param)
        if n_prompt + requested > context:
            raise invalid(f"This model's maximum context length is {context} tokens; the prompt "
                          f"has {n_prompt} tokens and {max_param} is {requested}.",
                          max_param, code="context_length_exceeded")
        max_tokens = requested
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                          seed=req.seed)


async def _start(st: AppState, prompt_ids: list[int], params: SamplingParams,
                 stops: list[str], arrived: float) -> AsyncIterator[object]:
    """Admit the request (may queue); raise 429/503 before any byte of the answer is sent."""
    gen = st.generation.run(prompt_ids, params, stops, arrived)
    retry = {"Retry-After": str(st.settings.retry_after_seconds)}
    try:
        first = await gen.__anext__()
    except Overloaded:
        st.metrics.reject("overload")
        raise APIError(429, "The server is overloaded: every generation slot is busy and the "
                       "wait queue is full. Retry later.", type="rate_limit_error",
                       code="server_overloaded", headers=retry) from None
    except Aborted:
        st.metrics.reject("draining")
        raise APIError(503, "The server is shutting down.", type="service_unavailable_error",
                       code="draining", headers=retry) from None
    assert first is ADMITTED
    return gen


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _text_event(make_chunk, chat: bool) -> Callable[[str], str]:
    """A fast renderer of the per-token event: the chunk is rendered once around a marker and
    each token only JSON-encodes its text (this runs thousands of times per second)."""
    marker = "\x00token\x00"
    pre, post = _sse(make_chunk({"content": marker} if chat else marker, None)).split(
        json.dumps(marker))
    return lambda text: pre + json.dumps(text) + post


async def _stream(gen: AsyncIterator[object], make_chunk, head: dict | None,
                  n_prompt: int, include_usage: bool) -> AsyncIterator[str]:
    text_event = _text_event(make_chunk, chat=head is not None)
    try:
        if head is not None:
            yield _sse(make_chunk(head, None))
        async for item in gen:
            if isinstance(item, Finished):
                last = make_chunk({} if head is not None else "", item.reason)
                last["usage"] = usage(n_prompt, item.completion_tokens)
                yield _sse(last)
                if include_usage:
                    tail = make_chunk(None, None)
                    tail["choices"] = []
                    tail["usage"] = usage(n_prompt, item.completion_tokens)
                    yield _sse(tail)
            else:
                yield text_event(item)  # type: ignore[arg-type]
    except Exception:
        _log.exception("generation failed mid-stream")
        yield _sse(APIError(500, "The server had an error while generating.",
                            type="server_error", code="internal_error").body())
    finally:
        await gen.aclose()  # type: ignore[attr-defined]
    yield "data: [DONE]\n\n"


def _streaming_response(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _until_disconnect(request: Request) -> None:
    """Return when the client closes its connection (the body has been read already, so the
    next ASGI message is ``http.disconnect``)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    """The client disconnected before its non-streaming answer was ready."""


async def _collect_or_cancel(request: Request, gen: AsyncIterator[object]) -> tuple[str, Finished]:
    """Collect the whole answer, but cancel the generation (freeing its slot at once) when the
    client goes away: nobody would read the answer, and the slot serves someone else."""
    collect = asyncio.ensure_future(_collect(gen))
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not collect.done():
            collect.cancel()
    if collect.cancelled() or not collect.done():
        with contextlib.suppress(asyncio.CancelledError):
            await collect
        raise ClientGone
    return collect.result()


def _gone_response() -> Response:
    # Nobody reads it; 499 (nginx's "client closed request") keeps access logs honest.
    return Response(status_code=499)


async def _collect(gen: AsyncIterator[object]) -> tuple[str, Finished]:
    parts: list[str] = []
    try:
        async for item in gen:
            if isinstance(item, Finished):
                return "".join(parts), item
            parts.append(item)  # type: ignore[arg-type]
    finally:
        await gen.aclose()  # type: ignore[attr-defined]
    raise RuntimeError("generation ended without a finish event")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    arrived = time.monotonic()
    st = _state(request)
    req: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        prompt_ids = st.engine.encode_chat(messages) if st.loaded else []
    except Exception as exc:  # chat templates raise for e.g. unsupported roles or ordering
        _log.info("chat template rejected the messages: %s", exc)
        raise invalid(f"The model's chat template rejected the messages: {exc}",
                      "messages") from None
    limit = st.settings.max_tokens
    if req.max_completion_tokens and req.max_tokens and req.max_tokens > limit:
        # max_completion_tokens wins, but an out-of-range max_tokens is still an error:
        # every field a client sends is validated, none silently ignored.
        raise invalid(f"max_tokens must be at most {limit} (LLM_MAX_TOKENS); got "
                      f"{req.max_tokens}.", "max_tokens")
    requested = req.max_completion_tokens or req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    params = _check_common(st, req, requested, prompt_ids, "messages", param)
    gen = await _start(st, prompt_ids, params, req.stop_list(), arrived)
    cid, created, model = new_id("chatcmpl"), now(), st.settings.model_name

    if req.stream:
        def chunk(delta: dict | None, finish: str | None) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": [{"index": 0, "delta": delta or {},
                                                 "logprobs": None, "finish_reason": finish}]}

        include = bool(req.stream_options and req.stream_options.include_usage)
        return _streaming_response(_stream(gen, chunk, {"role": "assistant", "content": ""},
                                           len(prompt_ids), include))

    try:
        text, fin = await _collect_or_cancel(request, gen)
    except ClientGone:
        _log.info("client disconnected; generation %s cancelled", cid)
        return _gone_response()
    return JSONResponse({
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": fin.reason}],
        "usage": usage(len(prompt_ids), fin.completion_tokens),
    })


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    arrived = time.monotonic()
    st = _state(request)
    req: CompletionRequest = await _parse(request, CompletionRequest)
    prompt_ids = st.engine.encode_text(req.prompt_text()) if st.loaded else []
    params = _check_common(st, req, req.max_tokens, prompt_ids, "prompt")
    gen = await _start(st, prompt_ids, params, req.stop_list(), arrived)
    cid, created, model = new_id("cmpl"), now(), st.settings.model_name

    if req.stream:
        def chunk(text: str | None, finish: str | None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": text or "", "logprobs": None,
                                 "finish_reason": finish}]}

        include = bool(req.stream_options and req.stream_options.include_usage)
        return _streaming_response(_stream(gen, chunk, None, len(prompt_ids), include))

    try:
        text, fin = await _collect_or_cancel(request, gen)
    except ClientGone:
        _log.info("client disconnected; generation %s cancelled", cid)
        return _gone_response()
    return JSONResponse({
        "id": cid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None,
                     "finish_reason": fin.reason}],
        "usage": usage(len(prompt_ids), fin.completion_tokens),
    })
