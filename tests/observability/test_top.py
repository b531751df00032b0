"""`python -m local top` in a pseudo-terminal against a real local cluster: the
figures it shows match the replicas' own /metrics, and q or Ctrl-C end it."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import httpx
import pytest

from local.top import TITLE, histogram_quantile
from tests.local.conftest import make_cluster  # noqa: F401  (fixture; skips without nginx)
from tests.local.support import FAST_SIM

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]|\r")
ROW = re.compile(r"^r(\d+)\s+(\d+)\s+(up|down)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$")
# One running and one queued request per replica, the rest refused (429), and
# generations slow enough that a burst overlaps.
OVERLOADABLE = {**FAST_SIM, "LLM_MAX_CONCURRENCY": "1", "LLM_MAX_QUEUE": "1",
                "LLM_SIM_DECODE_BASE_MS": "15"}


class Terminal:
    """`python -m local top` on a pty of 120x40 characters."""

    def __init__(self, *args: str) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "local", "top", *args],
            stdin=slave, stdout=slave, stderr=slave, close_fds=True, start_new_session=True,
            cwd=Path(__file__).resolve().parents[2],
            env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"},
            preexec_fn=self._child_setup,
        )
        os.close(slave)
        self.raw = b""

    @staticmethod
    def _child_setup() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty is its terminal: Ctrl-C reaches it
        # A suite started in the background (nohup, `&`) ignores SIGINT, and children
        # inherit that; a terminal program expects the default.
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    def read(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.master], [], [], left)
            if not ready:
                break
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the child closed the pty
                break
            if not chunk:
                break
            self.raw += chunk

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode(errors="replace"))

    def frame_numbers(self) -> list[int]:
        return [int(n) for n in re.findall(rf"{TITLE}\s+frame (\d+)", self.text)]

    def wait_frame(self, number: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(n >= number for n in self.frame_numbers()):
                return
            self.read(0.2)
        raise AssertionError(f"no frame {number} within {timeout} s:\n{self.text[-2000:]}")

    def drain(self) -> None:
        """Consume what is already buffered in the pty: frames drawn while nobody read."""
        while select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.raw += chunk

    def last_frame(self) -> str:
        return self.text.rsplit(TITLE, 1)[-1]

    def send(self, data: bytes) -> int:
        os.write(self.master, data)
        try:
            code = self.proc.wait(timeout=10)
        finally:
            self.read(0.5)
            os.close(self.master)
        return code


def _scrape(url: str) -> dict[str, object]:
    text = httpx.get(url + "/metrics", timeout=5).text
    out: dict[str, object] = {"buckets": {}}
    for line in text.splitlines():
        if line.startswith("llm_time_to_first_token_seconds_bucket{"):
            le = re.search(r'le="([^"]+)"', line).group(1)
            out["buckets"][float(le)] = float(line.split()[-1])  # type: ignore[index]
        elif line.startswith(("llm_requests_running ", "llm_requests_waiting ",
                              "llm_e2e_request_latency_seconds_count ")):
            name, value = line.split()
            out[name] = float(value)
        elif line.startswith('llm_requests_rejected_total{reason="overload"}'):
            out["refused"] = float(line.split()[-1])
    return out


def _wait_idle(urls: list[str], timeout: float = 10.0) -> None:
    """Until every replica reports nothing running or waiting (a response can reach
    the client a moment before the server's gauges drop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(s["llm_requests_running"] == s["llm_requests_waiting"] == 0
               for s in map(_scrape, urls)):
            return
        time.sleep(0.1)
    raise AssertionError("replicas still busy after the load")


def _burst(endpoint: str, key: str, model: str, count: int) -> None:
    def one() -> None:
        httpx.post(f"{endpoint}/chat/completions", timeout=30,
                   headers={"Authorization": f"Bearer {key}"},
                   json={"model": model, "max_tokens": 16,
                         "messages": [{"role": "user", "content": "hello there"}]})
    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _seconds(shown: str) -> float:
    value, unit = shown.split()
    return float(value) / 1000 if unit == "ms" else float(value)


def _bucket_bounds(q: float, buckets: dict[float, float]) -> tuple[float, float]:
    """The (lower, upper] bucket holding the q-quantile's rank."""
    bounds = sorted(buckets)
    rank, lower = q * buckets[bounds[-1]], 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            return lower, bound
        lower = bound
    return lower, bounds[-1]


def test_top_shows_what_the_replicas_export_and_quits_on_q(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster(2, workdir=tmp_path / "run", server_env=OVERLOADABLE)
    urls = cluster.replica_urls
    before = [_scrape(u) for u in urls]
    term = Terminal("--workdir", str(tmp_path / "run"), "--interval", "0.5", "--window", "120")
    term.wait_frame(1)  # the window starts here, before any load
    for _ in range(2):
        _burst(cluster.endpoint, cluster.api_key, cluster.model_name, 10)
    _wait_idle(urls)
    # Frames drawn during the load sit unread in the pty; count them before waiting.
    term.drain()
    seen = max(term.frame_numbers())
    term.wait_frame(seen + 2)  # a frame drawn entirely after the load
    after = [_scrape(u) for u in urls]
    assert term.send(b"q") == 0

    frame = term.last_frame()
    rows = {int(m.group(2)): m for line in frame.splitlines() if (m := ROW.match(line.strip()))}
    assert len(rows) == 2, frame
    total_finished = total_refused = 0.0
    for url, b, a in zip(urls, before, after):
        row = rows[int(url.rsplit(":", 1)[1])]
        assert row.group(3) == "up"
        assert int(row.group(4)) == a["llm_requests_running"] == 0
        assert int(row.group(5)) == a["llm_requests_waiting"] == 0
        assert int(row.group(6)) == a["llm_e2e_request_latency_seconds_count"]
        assert int(row.group(7)) == a["refused"]
        total_finished += a["llm_e2e_request_latency_seconds_count"] - b["llm_e2e_request_latency_seconds_count"]
        total_refused += a["refused"] - b["refused"]
    assert total_refused > 0, "the burst should overload a replica (the 429 path is untested)"
    window = re.search(r"in window: finished (\d+)\s+refused (\d+)", frame)
    assert window and (int(window.group(1)), int(window.group(2))) == (total_finished, total_refused)
    assert "replicas 2/2 answering" in frame and "autoscaling off" in frame

    # TTFT percentiles of the window: within the bucket the quantile's rank falls in.
    delta: dict[float, float] = {}
    for b, a in zip(before, after):
        for le, count in a["buckets"].items():  # type: ignore[union-attr]
            delta[le] = delta.get(le, 0.0) + count - b["buckets"].get(le, 0.0)  # type: ignore[union-attr]
    shown = re.search(r"TTFT p50 (\d+(?:\.\d+)? m?s)\s+p99 (\d+(?:\.\d+)? m?s)", frame)
    assert shown, frame
    for q, text in ((0.5, shown.group(1)), (0.99, shown.group(2))):
        lower, upper = _bucket_bounds(q, delta)
        assert lower - 0.001 <= _seconds(text) <= upper + 0.001, (q, text, lower, upper)
        assert _seconds(text) == pytest.approx(histogram_quantile(q, delta), abs=0.001)


def test_top_exits_cleanly_on_ctrl_c_and_shows_autoscaling_decisions(
    make_cluster, tmp_path: Path
) -> None:
    workdir = tmp_path / "run"
    make_cluster(1, workdir=workdir)
    (workdir / "autoscaler.jsonl").write_text(
        '{"t": 12.5, "current": 1, "desired": 2, "raw": 2, "reason": "waiting 5.0 > 2 per replica"}\n'
    )
    term = Terminal("--workdir", str(workdir), "--interval", "0.3")
    term.wait_frame(2)
    assert term.send(b"\x03") == 0
    frame = term.last_frame()
    assert "t=12.5s  1 -> 2  waiting 5.0 > 2 per replica" in frame
    assert "Traceback" not in term.text


def test_top_without_a_cluster_says_so(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "local", "top", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=30,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 1 and "no local cluster running" in result.stdout
