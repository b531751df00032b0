"""Gate in front of `/v1/*`: API key, drain, body size, in-flight accounting.

A pure ASGI middleware (not a FastAPI dependency) so that it runs before the body is read:
an unauthenticated or oversized request is refused without parsing anything.
`/health`, `/ready` and `/metrics` are never gated.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from server.errors import APIError

if TYPE_CHECKING:
    from server.state import AppState

Scope = dict[str, Any]


def bearer_ok(header: bytes | None, key: bytes) -> bool:
    """Constant-time check of an ``Authorization: Bearer <key>`` header."""
    if not header:
        return False
    scheme, _, token = header.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(token.strip(), key)


class GateMiddleware:
    def __init__(self, app: Any, state: AppState) -> None:
        self.app = app
        self.state = state
        key = state.settings.api_key
        self.key = key.get_secret_value().encode() if key is not None else None

    async def _refuse(self, send: Any, err: APIError, reason: str) -> None:
        self.state.metrics.reject(reason)
        resp = err.response()
        await resp({"type": "http"}, _no_receive, send)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        st = self.state
        headers = dict(scope["headers"])
        if self.key is not None and not bearer_ok(headers.get(b"authorization"), self.key):
            await self._refuse(send, APIError(
                401, "Incorrect or missing API key. Send `Authorization: Bearer <key>`.",
                code="invalid_api_key"), "auth")
            return
        if st.drain.draining:
            await self._refuse(send, APIError(
                503, "The server is shutting down; retry on another replica.",
                type="service_unavailable_error", code="draining",
                headers={"Retry-After": str(st.settings.retry_after_seconds)}), "draining")
            return
        limit = st.settings.max_body_bytes
        too_large = APIError(413, f"The request body is larger than {limit} bytes "
                             "(LLM_MAX_BODY_BYTES).", code="request_too_large")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, too_large, "too_large")
            return
        # Read (at most `limit` bytes of) the body here, then replay it to the app. Bodies are
        # bounded by the limit, so buffering is safe.
        chunks: list[bytes] = []
        size = 0
        more = scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > limit:
                await self._refuse(send, too_large, "too_large")
                return
            chunks.append(body)
            more = msg.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for http.disconnect

        st.drain.enter()
        try:
            await self.app(scope, replay, send)
        finally:
            st.drain.leave()


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}
