"""Real-nginx helpers for the load-balancing tests: a tiny upstream and an nginx runner.

Everything binds 127.0.0.1, every wait is bounded, and processes are stopped by the PID this
module started - never by name.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _FakeHandler(BaseHTTPRequestHandler):
    """What both fakes answer with: plain bodies, chunked SSE, and a held stream."""

    protocol_version = "HTTP/1.1"  # keep-alive, chunked responses
    # Headers and body leave in separate writes: without TCP_NODELAY every answer on a
    # kept-alive connection waits ~40 ms for the proxy's delayed ACK.
    disable_nagle_algorithm = True

    def log_message(self, *args: object) -> None:
        pass

    def _read_body(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)

    def _plain(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _start_events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _stream(self, release: threading.Event, finished: threading.Event) -> None:
        """The first event, then the rest once `release` is set (bounded: the test has seen
        the first event by then); `finished` when the whole stream went out."""
        self._start_events()
        self._chunk(b"data: first\n\n")
        release.wait(timeout=5)
        try:
            self._chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            finished.set()
        except OSError:
            pass  # the test hung up after the first event


def _serve(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, threading.Thread]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    return server, thread


def _shutdown(server: ThreadingHTTPServer | None, thread: threading.Thread | None) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()
    if thread is not None:
        thread.join(timeout=5)


@dataclass
class Upstream:
    """A fake replica. `mode`: "ok" answers, "draining" answers 503, "slow" stalls,
    "no_key" refuses every key (401)."""

    name: str
    mode: str = "ok"
    hits: int = 0
    stream_release: threading.Event = field(default_factory=threading.Event)
    stream_finished: threading.Event = field(default_factory=threading.Event)
    big_finished: threading.Event = field(default_factory=threading.Event)
    server: ThreadingHTTPServer | None = None
    thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> Upstream:
        upstream = self

        class Handler(_FakeHandler):
            def _answer(self) -> None:
                self._read_body()
                upstream.hits += 1
                if upstream.mode == "draining":
                    self._plain(503, b"draining")
                elif upstream.mode == "no_key":
                    self._plain(401, b"wrong key")
                elif upstream.mode == "slow":
                    time.sleep(3)  # longer than the test's read timeout
                    self._plain(200, upstream.name.encode())
                elif self.path.endswith("/stream"):
                    self._stream(upstream.stream_release, upstream.stream_finished)
                elif self.path.endswith("/big"):
                    self._big()
                else:
                    self._plain(200, upstream.name.encode())

            do_GET = do_POST = _answer

            def _big(self) -> None:
                # 48 MiB, more than loopback socket buffers hold: it only completes quickly
                # if the proxy reads ahead of its client (spools to a temp file).
                self._start_events()
                piece = b"data: " + b"x" * (64 * 1024 - 8) + b"\n\n"
                try:
                    for _ in range(768):
                        self._chunk(piece)
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                    upstream.big_finished.set()
                except OSError:
                    pass  # the test hung up, as intended

        self.server, self.thread = _serve(Handler)
        return self

    def stop(self) -> None:
        self.stream_release.set()
        _shutdown(self.server, self.thread)


class FakeGateway:
    """Stands in for NGINX Gateway Fabric behind the model router: answers with the name that
    `answers` gives the request's X-Gateway-Model-Name (as each model's HTTPRoute would send it
    to that model's pods), 404 when none matches (the catch-all route); records every request's
    headers; a path ending in /stream streams its first event, then waits for `stream_release`."""

    def __init__(self, answers: Mapping[str, str]) -> None:
        self.answers = dict(answers)
        self.seen: list[dict[str, str]] = []
        self.stream_release = threading.Event()
        self.stream_finished = threading.Event()
        gateway = self

        class Handler(_FakeHandler):
            def do_POST(self) -> None:
                self._read_body()
                headers = {k.lower(): v for k, v in self.headers.items()}
                gateway.seen.append(headers)
                answer = gateway.answers.get(headers.get("x-gateway-model-name", ""))
                if answer is None:
                    self._plain(404, b"no route")
                elif self.path.endswith("/stream"):
                    self._stream(gateway.stream_release, gateway.stream_finished)
                else:
                    self._plain(200, answer.encode())

            do_GET = do_POST

        self.server, self.thread = _serve(Handler)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def stop(self) -> None:
        self.stream_release.set()
        _shutdown(self.server, self.thread)


class Nginx:
    """nginx in the foreground (`daemon off`) under a private prefix."""

    def __init__(self, prefix: Path, conf: str, port: int) -> None:
        self.prefix = prefix
        self.port = port
        self.conf_path = prefix / "nginx.conf"
        self.conf_path.write_text(conf)
        self.proc: subprocess.Popen[bytes] | None = None

    def args(self, *extra: str) -> list[str]:
        assert NGINX is not None
        # -e: nginx opens its compiled-in error log before reading the config; keep it private.
        return [NGINX, "-p", f"{self.prefix}/", "-c", str(self.conf_path),
                "-e", str(self.prefix / "error.log"), *extra]

    def check(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.args("-t"), capture_output=True, text=True, timeout=20,
                              check=False)

    def start(self, *extra: str, health_path: str = "/nginx-health",
              health_port: int | None = None) -> Nginx:
        """Start it (`extra`: more command-line arguments) and wait, at most 5 s, until
        `health_path` on `health_port` (default: its own port) answers 200."""
        self.proc = subprocess.Popen(self.args(*extra), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        port = self.port if health_port is None else health_port
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: {err}")
            try:
                status, _, _ = request(port, "GET", health_path, timeout=1)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not answer {health_path} within 5 s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # SIGTERM: fast shutdown of the master we started
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        if self.proc.stderr:
            self.proc.stderr.close()

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text() if path.exists() else ""


def request(port: int, method: str, path: str, body: bytes = b"",
            headers: dict[str, str] | None = None, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; returns status, headers, body."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@contextmanager
def nginx_runner(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    """`start(policy, addresses, tokens=512, **render)`: a real nginx on a free port running the
    policy's local-mode nginx.conf (one worker; as root, workers as root so they can write the
    private prefix); every one started is stopped on exit. `addresses`: the replicas, or a
    mapping of served model name -> its replicas."""
    from components.policies.balancing import LoadBalancingConfig
    from components.policies.nginx_conf import nginx_conf

    running: list[Nginx] = []

    def start(policy: LoadBalancingConfig,
              addresses: Sequence[str] | Mapping[str, Sequence[str]], tokens: int = 512,
              **render: object) -> Nginx:
        port = free_port()
        prefix = tmp_path / f"nginx{len(running)}"
        prefix.mkdir()
        render.setdefault("worker_processes", 1)
        render.setdefault("user", "root" if os.geteuid() == 0 else None)
        upstreams = addresses if isinstance(addresses, Mapping) else list(addresses)
        conf = nginx_conf(policy, upstreams, port, tokens, prefix=prefix, **render)
        proxy = Nginx(prefix, conf, port)
        running.append(proxy)
        return proxy.start()

    try:
        yield start
    finally:
        for proxy in running:
            proxy.stop()
