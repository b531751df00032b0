"""Local-mode nginx under abuse, against the real nginx: a connection flood is answered (never
reset), a client trickling its body is cut off, and only the API prefix is published."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from components.policies.balancing import CLIENT_BODY_TIMEOUT_SECONDS, LoadBalancingConfig
from components.policies.nginx_conf import connection_limits, nginx_conf
from tests.infra.nginx_support import NGINX, nginx_runner, request

needs_nginx = pytest.mark.skipif(NGINX is None and not os.environ.get("CI"),
                                 reason="nginx binary not installed (apt-get install nginx-light)")

BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


class HoldingUpstreams:
    """Replicas that hold every request for ``hold`` seconds, on one asyncio loop in a thread."""

    def __init__(self, count: int, hold: float) -> None:
        self.hold = hold
        self.loop = asyncio.new_event_loop()
        self.servers: list[asyncio.base_events.Server] = []
        self.paths: Counter[str] = Counter()
        self.writers: set[asyncio.StreamWriter] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        for _ in range(count):
            server = asyncio.run_coroutine_threadsafe(
                asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=2048),
                self.loop).result(5)
            self.servers.append(server)

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in self.servers]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                self.paths[lines[0].split()[1]] += 1
                length = next((int(line.split(":", 1)[1]) for line in lines
                               if line.lower().startswith("content-length:")), 0)
                await reader.readexactly(length)
                await asyncio.sleep(self.hold)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    def stop(self) -> None:
        async def close() -> None:
            for server in self.servers:
                server.close()
            for writer in list(self.writers):
                writer.close()
            await asyncio.sleep(0.05)  # let the transports finish closing
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


@pytest.fixture
def nginx_for(tmp_path: Path) -> Iterator[Any]:
    with nginx_runner(tmp_path) as start:
        yield lambda addresses, **kwargs: start(LoadBalancingConfig(), addresses, 512, **kwargs)


async def _one(port: int) -> str:
    """Status code of one POST on its own connection, or what went wrong."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return f"connect: {type(exc).__name__}"
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nContent-Length: "
                     + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=20)
    except (OSError, TimeoutError) as exc:
        return type(exc).__name__
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if not data:
        return "closed without answer"
    status = data.split(b" ", 2)[1].decode()
    if status == "429":
        body = json.loads(data.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "rate_limit_exceeded"
        assert b"\r\nRetry-After: 1\r\n" in data
    return status


def flood(port: int, clients: int) -> Counter[str]:
    async def run() -> Counter[str]:
        return Counter(await asyncio.gather(*(_one(port) for _ in range(clients))))
    return asyncio.run(run())


@needs_nginx
def test_500_concurrent_connections_are_all_answered(nginx_for) -> None:
    # Three replicas with the server's defaults admit 3 x (32 + 128) = 480 requests.
    upstreams = HoldingUpstreams(3, hold=1.0)
    try:
        proxy = nginx_for(upstreams.addresses, admission_limit=480)
        outcomes = flood(proxy.port, 500)
    finally:
        upstreams.stop()
    assert outcomes == Counter({"200": 500}), outcomes
    assert "worker_connections are not enough" not in proxy.error_log()


@needs_nginx
def test_connections_beyond_the_cap_get_429_json_not_a_reset(nginx_for) -> None:
    upstreams = HoldingUpstreams(1, hold=1.0)
    per_client, _ = connection_limits(20, LoadBalancingConfig().keepalive_connections)
    try:
        proxy = nginx_for(upstreams.addresses, admission_limit=20)
        outcomes = flood(proxy.port, per_client + 30)
    finally:
        upstreams.stop()
    assert set(outcomes) == {"200", "429"}, outcomes
    assert outcomes["200"] == per_client and outcomes["429"] == 30


def test_connection_limits_grow_with_what_the_replicas_admit() -> None:
    small = connection_limits(20, 32)
    big = connection_limits(3 * (256 + 1024), 32)
    assert small == (36, 1024)
    assert big[0] == 3840 + 960 and big[1] == 3 * big[0] + 64
    with pytest.raises(ValueError, match="admission_limit"):
        connection_limits(0, 32)
    conf = nginx_conf(LoadBalancingConfig(), ["127.0.0.1:8000"] * 1 + ["127.0.0.1:8001"],
                      8080, 512)  # default: the server's own limits per upstream
    per_client, workers = connection_limits(2 * 160, 32)
    assert f"worker_connections {workers};" in conf
    assert f"limit_conn llm_conn_per_client {per_client};" in conf
    assert f"client_body_timeout {CLIENT_BODY_TIMEOUT_SECONDS}s;" in conf
    assert CLIENT_BODY_TIMEOUT_SECONDS < 75  # shorter than nginx's own client keep-alive


@needs_nginx
def test_a_client_trickling_its_body_is_cut_off(nginx_for) -> None:
    upstreams = HoldingUpstreams(1, hold=0.0)
    try:
        proxy = nginx_for(upstreams.addresses, client_body_timeout_seconds=1)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
                         b"Content-Length: 100\r\n\r\n{\"model\":")
            start = time.monotonic()
            received = b""
            with contextlib.suppress(ConnectionResetError):  # reset_timedout_connection on
                while chunk := sock.recv(4096):
                    received += chunk
            took = time.monotonic() - start
    finally:
        upstreams.stop()
    assert took < 3, f"connection held {took:.1f}s"
    assert received == b"" or received.startswith(b"HTTP/1.1 408")
    assert not upstreams.paths  # nothing reached the replica


@needs_nginx
def test_only_the_api_prefix_reaches_the_replicas(nginx_for) -> None:
    upstreams = HoldingUpstreams(1, hold=0.0)
    try:
        proxy = nginx_for(upstreams.addresses)
        for path in ("/metrics", "/tokenize", "/invocations", "/pooling", "/health", "/",
                     "/docs", "/v1x/models", "/V1/models", "/v1/../metrics"):
            status, headers, body = request(proxy.port, "POST", path, body=b"{}")
            assert status == 404, path
            assert headers["Content-Type"] == "application/json"
            assert json.loads(body)["error"]["code"] == "not_found"
        assert request(proxy.port, "POST", "/v1/chat/completions", body=b"{}")[0] == 200
        assert request(proxy.port, "GET", "/nginx-health")[0] == 200
    finally:
        upstreams.stop()
    assert list(upstreams.paths) == ["/v1/chat/completions"]


@needs_nginx
def test_a_long_prompt_reaches_the_replica_from_memory_not_a_temporary_file(nginx_for) -> None:
    # A body nginx writes to a temporary file (its default beyond 8-16k) reaches the replica in
    # a second small write that waits ~40 ms for a delayed ACK: 46.7 ms to the first event for
    # a 16 KiB prompt against 4.8 ms from memory (python -m bench.routing --pad-kib 16). nginx
    # logs every body it buffers to a file at `warn`, the level of local mode's error_log.
    upstreams = HoldingUpstreams(1, hold=0.0)
    try:
        proxy = nginx_for(upstreams.addresses)
        prompt = "word " * (200 * 1024 // 5)  # a 200 KiB RAG-sized prompt, under the 1m limit
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": prompt}]})
        assert request(proxy.port, "POST", "/v1/chat/completions", body=body.encode())[0] == 200
    finally:
        upstreams.stop()
    assert "buffered to a temporary file" not in proxy.error_log()


def test_tls_listener_needs_both_files(tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    conf = nginx_conf(LoadBalancingConfig(), ["127.0.0.1:8000"], 8443, 512,
                      tls_certificate=cert, tls_key=key)
    assert "listen 127.0.0.1:8443 ssl;" in conf
    assert f"ssl_certificate {cert};" in conf and f"ssl_certificate_key {key};" in conf
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in conf
    with pytest.raises(ValueError, match="go together"):
        nginx_conf(LoadBalancingConfig(), ["127.0.0.1:8000"], 8443, 512, tls_certificate=cert)
    assert " ssl;" not in nginx_conf(LoadBalancingConfig(), ["127.0.0.1:8000"], 8080, 512)
