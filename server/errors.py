"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}``.

Every failure path (validation, auth, overload, drain, unknown route, unexpected exception) ends
here, so clients such as the official ``openai`` package map them to their usual exceptions and
no stack trace ever reaches a client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

_log = logging.getLogger(__name__)


class APIError(Exception):
    """An error to send to the client as-is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _param(loc: tuple, fields: frozenset[str] | None = None) -> str | None:
    # FastAPI prefixes "body"/"query"; drop it. List indices render as messages[0].content.
    # Union members add their type as a step ("str", "list[TextPart]"); when the model's field
    # names are known, keep only those so the param names the field, not pydantic internals.
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    if fields is not None:
        parts = [p for p in parts if isinstance(p, int) or p in fields]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or None


def from_validation_errors(errors: list[dict], fields: frozenset[str] | None = None) -> APIError:
    """Turn pydantic's error list into a 400 naming the first offending field."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return invalid("Malformed JSON body: " + str(first.get("ctx", {}).get("error", "")),
                       None, code="invalid_json")
    param = _param(tuple(first.get("loc", ())), fields)
    msgs: list[str] = []
    for e in errors[:5]:
        where = _param(tuple(e.get("loc", ())), fields) or "body"
        msg = f"{where}: {e.get('msg')}"
        if msg not in msgs:
            msgs.append(msg)
    code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_type" \
        if first.get("type", "").endswith("_type") else "invalid_value"
    return invalid("Invalid request: " + "; ".join(msgs), param, code=code)


def install_handlers(app: FastAPI, on_invalid) -> None:
    """Register the handlers; ``on_invalid()`` is called for every 400 (metrics)."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        if exc.status == 400:
            on_invalid()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        on_invalid()
        return from_validation_errors(list(exc.errors())).response()

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> JSONResponse:
        on_invalid()
        return from_validation_errors(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code,
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        _log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, "The server had an error while processing your request.",
                        type="server_error", code="internal_error").response()
