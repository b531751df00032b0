"""Asynchronous streaming client: replays a trace open-loop and records every request.

One task per request, started at its arrival time whatever the server is doing (open loop:
a slow server does not slow the arrivals down, as with real users). Each task streams a chat
completion, timestamps every content event as it is parsed, and records status and errors.
Bounded: every request has a timeout, and whatever is still running ``grace`` seconds after
the last arrival is cancelled and recorded as an error.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Sequence

import httpx

from bench.stats import Record
from bench.trace import Request

# A content delta carries at least one character; the first chunk's `"content":""` (the role
# announcement) is not a token. The server serializes with separators (',', ':').
_CONTENT = re.compile(rb'"content":"(?!")')
SESSION_HEADER = "X-Session-ID"


class SseParser:
    """Splits a byte stream into SSE events (``data: ...`` blocks ending in a blank line)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        """The payloads (after ``data: ``) of the events completed by ``data``."""
        self._buf += data.replace(b"\r\n", b"\n")
        *events, self._buf = self._buf.split(b"\n\n")
        out = []
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    out.append(line[5:].lstrip(b" "))
        return out


def is_content(payload: bytes) -> bool:
    return payload.startswith(b"{") and _CONTENT.search(payload) is not None


async def stream_one(client: httpx.AsyncClient, url: str, body: dict, headers: dict[str, str],
                     rec: Record, clock: Callable[[], float] = time.monotonic,
                     on_response: Callable[[httpx.Response], None] | None = None) -> None:
    """POST one streaming chat completion to ``url`` and fill ``rec``.

    ``on_response`` sees the response as soon as its headers arrive (before the body).
    """
    rec.sent = clock()
    parser = SseParser()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if on_response is not None:
                on_response(r)
            rec.status = r.status_code
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread())[:120]!r}"
                return
            async for data in r.aiter_raw():
                now = clock()
                for payload in parser.feed(data):
                    if payload == b"[DONE]":
                        rec.done = True
                    elif is_content(payload):
                        if rec.last is not None:
                            rec.gaps.append(now - rec.last)
                        else:
                            rec.first = now
                        rec.last = now
                        rec.tokens += 1
            if not rec.done:
                rec.error = "stream ended without [DONE]"
    except httpx.HTTPError as exc:
        rec.error = f"{type(exc).__name__}: {exc}"


def request_body(req: Request, model: str, salt: str = "") -> dict:
    """The chat request of ``req``. ``salt`` is prepended to the first message, so that one run
    can never hit prefix-cache blocks left by an earlier run of the same trace."""
    messages = [dict(m) for m in req.messages]
    if salt:
        messages[0]["content"] = f"{salt} {messages[0]['content']}"
    return {"model": model, "messages": messages, "max_tokens": req.max_tokens,
            "stream": True, "seed": req.index}


async def replay(requests: Sequence[Request], pick_url: Callable[[Request], str], model: str,
                 *, api_key: str | None = None, salt: str = "", grace: float = 60.0,
                 request_timeout: float = 120.0, on_progress: Callable[[str], None] | None = None,
                 ) -> list[Record]:
    """Send every request at its arrival time to ``pick_url(request)``; return the records."""
    headers_base = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=2048, max_keepalive_connections=256)
    timeout = httpx.Timeout(request_timeout, connect=10.0)
    records: list[Record] = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout, http2=False) as client:
        t0 = time.monotonic() + 0.2
        tasks = []
        for req in requests:
            url = pick_url(req)
            rec = Record(req.index, url, t0 + req.arrival)
            records.append(rec)
            headers = dict(headers_base)
            if req.session is not None:
                headers[SESSION_HEADER] = req.session
            delay = rec.scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(
                stream_one(client, url, request_body(req, model, salt), headers, rec)))
        if on_progress:
            on_progress(f"  all {len(tasks)} requests sent; waiting for the streams to end")
        _, pending = await asyncio.wait(tasks, timeout=grace) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for rec in records:
        if rec.error is None and not rec.done:
            rec.error = "cancelled: still running after the grace period"
    return records
