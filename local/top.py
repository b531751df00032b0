"""`python -m local top`: a live view of a running `local up`.

Every interval it reads each replica's /metrics (the ports come from the state
file `up` writes) and shows, per replica, sequences running and waiting and
the requests it finished and refused; over a rolling window, the TTFT p50/p99
(from the TTFT histogram's bucket increase, as `histogram_quantile` computes
it), requests/s and 429s/s; the replica count; the last autoscaling
decisions when the autoscaler writes its log; and the stack's pending and
firing alerts when `up --autoscale` runs Prometheus with them. q or Ctrl-C quits.

Metric names come from the server engine's profile (components/engines.py).
"""

from __future__ import annotations

import json
import math
import os
import select
import sys
import termios
import time
import tty
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from components.engines import PROFILES
from local.procs import read_state

PROFILE = PROFILES["server"]
DECISIONS_LOG = "autoscaler.jsonl"
"""Written by the local autoscaler into the workdir, one JSON decision per line."""
DECISIONS_SHOWN = 3
TITLE = "llm-serving local top"


@dataclass(frozen=True)
class Scrape:
    """What one replica's /metrics said at one instant."""

    running: float
    waiting: float
    finished: float
    refused: float
    ttft_buckets: dict[float, float]
    """Upper bound -> cumulative count."""


def parse_metrics(text: str) -> Scrape:
    values: dict[str, float] = {}
    buckets: dict[float, float] = {}
    refused = PROFILE.refused
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{PROFILE.ttft_histogram}_bucket":
                buckets[float(sample.labels["le"])] = sample.value
            elif refused is not None and sample.name == refused.name:
                if all(sample.labels.get(k) == v for k, v in refused.match):
                    values["refused"] = values.get("refused", 0.0) + sample.value
            else:
                values.setdefault(sample.name, sample.value)
    return Scrape(
        running=values.get(PROFILE.running_metric, 0.0),
        waiting=values.get(PROFILE.waiting_metric, 0.0),
        finished=values.get(f"{PROFILE.e2e_histogram}_count", 0.0),
        refused=values.get("refused", 0.0),
        ttft_buckets=buckets,
    )


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets; None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # the highest finite bound, as Prometheus does
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _increase(new: float, old: float) -> float:
    """Counter increase; a restarted replica starts again from zero."""
    return new - old if new >= old else new


@dataclass
class ReplicaRow:
    index: int
    port: int
    scrape: Scrape | None
    model: str = ""
    """The served name, shown when the cluster serves several models."""


@dataclass
class Frame:
    number: int
    rows: list[ReplicaRow]
    window_seconds: float
    finished_in_window: float
    refused_in_window: float
    ttft_p50: float | None
    ttft_p99: float | None
    decisions: list[dict[str, Any]] | None
    alerts: list[tuple[str, str]] | None = None
    """(alert name, state) from local mode's Prometheus; None when none runs."""

    @property
    def requests_per_second(self) -> float:
        return self.finished_in_window / self.window_seconds if self.window_seconds > 0 else 0.0

    @property
    def refused_per_second(self) -> float:
        return self.refused_in_window / self.window_seconds if self.window_seconds > 0 else 0.0


@dataclass
class Top:
    """Scrapes and keeps the history a rolling window needs; `frame()` makes one view."""

    workdir: Path
    window_seconds: float = 30.0
    clock: Callable[[], float] = time.monotonic
    history: deque[tuple[float, dict[int, Scrape]]] = field(default_factory=deque)
    frames: int = 0

    def replicas(self) -> list[tuple[int, int]]:
        return [(index, port) for index, port, _model in self._replicas()]

    def _replicas(self) -> list[tuple[int, int, str]]:
        """(index, port, served name: empty with one model) of every running replica."""
        state = read_state(self.workdir)
        if state is None:
            return []
        several = len(state.get("models") or []) > 1
        return [(r["index"], r["port"], r.get("model", "") if several else "")
                for r in state.get("replicas", []) if r.get("pid")]

    def alerts(self, client: httpx.Client) -> list[tuple[str, str]] | None:
        """Pending and firing alerts of the stack's rules, when `up --autoscale` runs Prometheus."""
        state = read_state(self.workdir) or {}
        prometheus = state.get("prometheus")
        if not prometheus or not prometheus.get("url"):
            return None
        try:
            answer = client.get(prometheus["url"] + "/api/v1/alerts").json()
            return sorted((a["labels"]["alertname"], a["state"])
                          for a in answer["data"]["alerts"])
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    def scrape(self, client: httpx.Client) -> list[ReplicaRow]:
        rows = []
        for index, port, model in self._replicas():
            try:
                answer = client.get(f"http://127.0.0.1:{port}{PROFILE.metrics_path}")
                answer.raise_for_status()
                rows.append(ReplicaRow(index, port, parse_metrics(answer.text), model))
            except httpx.HTTPError:
                rows.append(ReplicaRow(index, port, None, model))
        return rows

    def frame(self, rows: list[ReplicaRow]) -> Frame:
        now = self.clock()
        current = {r.port: r.scrape for r in rows if r.scrape is not None}
        self.history.append((now, current))
        # Keep the newest snapshot at least `window` old as the window's start.
        while len(self.history) > 2 and now - self.history[1][0] >= self.window_seconds:
            self.history.popleft()
        start_at, start = self.history[0]
        finished = refused = 0.0
        buckets: dict[float, float] = {}
        for port, scrape in current.items():
            old = start.get(port)
            finished += _increase(scrape.finished, old.finished if old else 0.0)
            refused += _increase(scrape.refused, old.refused if old else 0.0)
            for bound, count in scrape.ttft_buckets.items():
                before = old.ttft_buckets.get(bound, 0.0) if old else 0.0
                buckets[bound] = buckets.get(bound, 0.0) + _increase(count, before)
        if start is current:  # first frame: no window yet
            finished = refused = 0.0
            buckets = {}
        self.frames += 1
        return Frame(
            number=self.frames, rows=rows, window_seconds=now - start_at,
            finished_in_window=finished, refused_in_window=refused,
            ttft_p50=histogram_quantile(0.5, buckets), ttft_p99=histogram_quantile(0.99, buckets),
            decisions=read_decisions(self.workdir),
        )


def read_decisions(workdir: Path, last: int = DECISIONS_SHOWN) -> list[dict[str, Any]] | None:
    """The last autoscaling decisions, or None when no autoscaler writes a log."""
    log = workdir / DECISIONS_LOG
    if not log.exists():
        return None
    lines = log.read_text().splitlines()[-last:]
    decisions = []
    for line in lines:
        try:
            decisions.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written right now
    return decisions


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def render(frame: Frame) -> Group:
    up = [r for r in frame.rows if r.scrape is not None]
    head = Text.assemble(
        (f"{TITLE}", "bold"), f"  frame {frame.number}  ",
        time.strftime("%H:%M:%S"), "  (q or Ctrl-C quits)",
    )
    summary = Text(
        f"replicas {len(up)}/{len(frame.rows)} answering   "
        f"window {frame.window_seconds:.0f} s   "
        f"req/s {frame.requests_per_second:.2f}   "
        f"429/s {frame.refused_per_second:.2f}   "
        f"TTFT p50 {_seconds(frame.ttft_p50)}   p99 {_seconds(frame.ttft_p99)}"
    )
    window = Text(
        f"in window: finished {frame.finished_in_window:.0f}  refused {frame.refused_in_window:.0f}"
    )
    table = Table(box=None, pad_edge=False)
    models = any(row.model for row in frame.rows)  # a column only when several are served
    for column in ("replica", *(("model",) if models else ()), "port", "state", "running",
                   "waiting", "finished", "429s"):
        table.add_column(column, justify="left" if column in ("replica", "model", "state")
                         else "right")
    for row in frame.rows:
        s = row.scrape
        name = (row.model,) if models else ()
        if s is None:
            table.add_row(f"r{row.index + 1}", *name, str(row.port), "down", "-", "-", "-", "-")
        else:
            table.add_row(
                f"r{row.index + 1}", *name, str(row.port), "up", f"{s.running:.0f}",
                f"{s.waiting:.0f}", f"{s.finished:.0f}", f"{s.refused:.0f}",
            )
    if frame.decisions is None:
        scaling = Text("autoscaling off")
    elif not frame.decisions:
        scaling = Text("autoscaling: no decision yet")
    else:
        lines = ["autoscaling (last decisions):"] + [
            f"  t={d.get('t', '?')}s  {d.get('current', '?')} -> {d.get('desired', '?')}  "
            f"{d.get('reason', '')}"
            for d in frame.decisions
        ]
        scaling = Text("\n".join(lines))
    parts = [head, summary, window, table, scaling]
    if frame.alerts is not None:
        shown = ", ".join(f"{name} {state}" for name, state in frame.alerts) or "none"
        parts.append(Text(f"alerts (local Prometheus): {shown}"))
    return Group(*parts)


@dataclass
class _Keys:
    """q from a terminal in cbreak mode (no Enter needed); restores the terminal on exit."""

    saved: Any = None

    def __enter__(self) -> "_Keys":
        if sys.stdin.isatty():
            self.saved = termios.tcgetattr(sys.stdin)
            tty.setcbreak(sys.stdin.fileno())
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.saved is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, self.saved)

    def wait_for_quit(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True when q was pressed."""
        if self.saved is None:
            time.sleep(seconds)
            return False
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sys.stdin], [], [], left)
            if ready and os.read(sys.stdin.fileno(), 1).lower() == b"q":
                return True
        return False


def frames(top: Top, interval: float) -> Iterator[Frame]:
    with httpx.Client(timeout=min(interval, 2.0)) as client:
        while True:
            frame = top.frame(top.scrape(client))
            frame.alerts = top.alerts(client)
            yield frame


def run(workdir: Path, interval: float = 1.0, window: float = 30.0,
        max_frames: int | None = None, console: Console | None = None) -> int:
    """The terminal UI; returns the exit status (0 on q, Ctrl-C or after max_frames)."""
    console = console or Console()
    top = Top(workdir=workdir, window_seconds=window)
    if not top.replicas():
        console.print(f"no local cluster running from {workdir}; start one with python -m local up")
        return 1
    try:
        with _Keys() as keys, Live(console=console, auto_refresh=False) as live:
            for frame in frames(top, interval):
                live.update(render(frame), refresh=True)
                if max_frames is not None and frame.number >= max_frames:
                    break
                if keys.wait_for_quit(interval):
                    break
    except KeyboardInterrupt:
        pass
    return 0
