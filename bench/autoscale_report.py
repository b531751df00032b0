"""Figures of one autoscaling run (pure: records, samples and events in, numbers out), the
Markdown tables and the PNG over time."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.autoscale_trace import TimedTrace
from bench.stats import Record, percentile
from local.autoscaler import Sample

SCALE_DOWN_RACE_SECONDS = 2.0
"""A failed request sent up to this long after a replica was retired counts against
scale-down (it may have raced the nginx reload), as does one in flight at the retirement."""


@dataclass(frozen=True)
class Setting:
    name: str
    replicas: int | None = None
    """Static runs: the fixed replica count. None: autoscaled."""
    target_waiting: int = 2
    target_running: int = 6
    """6 of the sim's 8 slots: 75 %, as the prod stack's 96 of 128."""
    window_s: float = 300.0
    """Scale-down stabilization window, trace seconds."""
    min_replicas: int = 1
    running_average_s: float = 60.0
    """The running trigger's averaging range, trace seconds (0: the instant value)."""

    @property
    def autoscaled(self) -> bool:
        return self.replicas is None


@dataclass
class Run:
    setting: Setting
    trace: TimedTrace
    load_s: float
    """Model load time, trace seconds."""
    records: list[Record]
    t0: float
    """Monotonic time of trace second 0 (the records' clock)."""
    samples: list[Sample] = field(default_factory=list)
    """The cluster over time; `t` in wall seconds since the trace started."""
    events: list[tuple[float, str, int]] = field(default_factory=list)
    """(wall seconds since t0, kind, replica index) from the autoscaler."""

    # --- figures ---

    def arrival(self, rec: Record) -> float:
        return rec.scheduled - self.t0

    def phase_records(self, phase: str) -> list[Record]:
        return [r for r in self.records if self.trace.phase_of(self.arrival(r)) == phase]

    def slo_share(self, slo_s: float) -> float:
        """Requests whose first token came within `slo_s` (failures are misses)."""
        if not self.records:
            return math.nan
        good = sum(1 for r in self.records if r.ok and r.ttft is not None and r.ttft <= slo_s)
        return good / len(self.records)

    @property
    def rejected_429(self) -> int:
        return sum(1 for r in self.records if r.status == 429)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.records if not r.ok)

    def failed_by_scale_down(self) -> int:
        retired = [t for t, kind, _ in self.events if kind == "retired"]
        count = 0
        for rec in self.records:
            if rec.ok or math.isnan(rec.sent):
                continue
            sent = rec.sent - self.t0
            end = (rec.last if rec.last is not None else rec.sent + 120.0) - self.t0
            if any(sent <= t <= end or t <= sent <= t + SCALE_DOWN_RACE_SECONDS
                   for t in retired):
                count += 1
        return count

    def replica_seconds(self) -> float:
        """Replicas that existed (loading, serving, draining) integrated over the trace,
        in trace seconds."""
        if self.setting.replicas is not None:
            return self.setting.replicas * self.trace.shape.seconds
        wall = self.trace.wall_seconds
        pts = [s for s in self.samples if 0 <= s.t <= wall]
        if not pts:
            return math.nan
        total = 0.0
        for a, b in zip(pts, pts[1:]):
            total += a.processes * (b.t - a.t)
        total += pts[-1].processes * (wall - pts[-1].t) + pts[0].processes * pts[0].t
        return total * self.trace.factor

    def first_added_serving(self, phase: str) -> float | None:
        """Trace seconds from the start of `phase` to the first replica added after it
        serving (None: none was)."""
        start = self.trace.phase_start(phase)
        added = [t for t, kind, _ in self.events if kind == "added" and t >= start]
        if not added:
            return None
        serving = [t for t, kind, _ in self.events if kind == "serving" and t >= added[0]]
        return (serving[0] - start) * self.trace.factor if serving else None

    def phase_stats(self, phase: str) -> tuple[float, float, float, float]:
        """(TTFT p50, TTFT p99, E2E p50, E2E p99) in seconds of the requests arriving in it."""
        recs = [r for r in self.phase_records(phase) if r.ok]
        ttft = [r.ttft for r in recs if r.ttft is not None]
        e2e = [r.e2e for r in recs if r.e2e is not None]
        return (percentile(ttft, 50), percentile(ttft, 99), percentile(e2e, 50),
                percentile(e2e, 99))

    def max_replicas_seen(self) -> int:
        if self.setting.replicas is not None:
            return self.setting.replicas
        return max((s.serving + s.starting for s in self.samples), default=0)


def label(run: Run) -> str:
    s = run.setting
    if not s.autoscaled:
        return f"static {s.replicas}"
    low = f", min {s.min_replicas}" if s.min_replicas != 1 else ""
    average = (f" (avg {s.running_average_s:g} s)" if s.running_average_s
               else " (instant)")
    return (f"auto waiting {s.target_waiting}, running {s.target_running}{average}, "
            f"window {s.window_s:g} s{low}")


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{x * 100:.1f}%"


def _sec(x: float | None) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.2f}"


def summary_table(runs: Sequence[Run], slo_s: float, reference: dict[str, Run]) -> str:
    """One row per run; replica-seconds relative to `reference[shape]` (static max)."""
    head = ["trace", "setting", "load s", "requests", f"TTFT ≤ {slo_s:g} s", "429", "failed",
            "failed by scale-down", "replica-s", "of static max", "max replicas",
            "surge → added replica serving, s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        ref = reference.get(run.trace.shape.name)
        rs = run.replica_seconds()
        share = rs / ref.replica_seconds() if ref is not None else math.nan
        first_phase = run.trace.shape.phases[1].name
        first = run.first_added_serving(first_phase) if run.setting.autoscaled else None
        lines.append("| " + " | ".join([
            run.trace.shape.name, label(run), f"{run.load_s:g}", str(len(run.records)),
            _pct(run.slo_share(slo_s)), str(run.rejected_429), str(run.failed),
            str(run.failed_by_scale_down()) if run.setting.autoscaled else "—",
            f"{rs:,.0f}", _pct(share), str(run.max_replicas_seen()), _sec(first),
        ]) + " |")
    return "\n".join(lines)


def phase_table(runs: Sequence[Run]) -> str:
    head = ["trace", "setting", "load s", "phase", "requests", "TTFT p50 s", "TTFT p99 s",
            "E2E p50 s", "E2E p99 s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        for phase in run.trace.shape.phases:
            t50, t99, e50, e99 = run.phase_stats(phase.name)
            lines.append("| " + " | ".join([
                run.trace.shape.name, label(run), f"{run.load_s:g}", phase.name,
                str(len(run.phase_records(phase.name))), _sec(t50), _sec(t99), _sec(e50),
                _sec(e99)]) + " |")
    return "\n".join(lines)


def rolling_p99_ttft(run: Run, window_s: float, step_s: float) -> tuple[list[float], list[float]]:
    """(wall t, p99 TTFT of requests sent in the `window_s` before t), NaN where none."""
    ts, ys = [], []
    t = window_s
    pts = sorted((r.sent - run.t0, r.ttft) for r in run.records
                 if r.ok and r.ttft is not None)
    while t <= run.trace.wall_seconds + step_s:
        vals = [v for s, v in pts if t - window_s <= s < t]
        ts.append(t)
        ys.append(percentile(vals, 99) if vals else math.nan)
        t += step_s
    return ts, ys


def plot(runs: Sequence[Run], path: Path, title: str) -> None:
    """Offered rate, replicas, queue depth and rolling p99 TTFT over trace time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(8, 9), dpi=100, sharex=True)
    first = runs[0].trace
    minutes = first.factor / 60
    xs = [i * first.wall_seconds / 400 for i in range(401)]
    axes[0].plot([x * minutes for x in xs], [first.shape.load_at(x * first.factor) for x in xs],
                 color="k")
    axes[0].set_ylabel("offered load,\nx one replica's\ncapacity")
    for i, run in enumerate(runs):
        color = f"C{i}"
        name = f"{label(run)}, load {run.load_s:g} s"
        if run.samples:
            axes[1].step([s.t * minutes for s in run.samples],
                         [s.serving + s.starting for s in run.samples], where="post",
                         color=color, label=name)
            axes[2].plot([s.t * minutes for s in run.samples],
                         [math.nan if s.waiting is None else s.waiting for s in run.samples],
                         color=color)
        else:
            axes[1].hlines(run.setting.replicas, 0, first.shape.seconds / 60, color=color,
                           label=name)
        ts, ys = rolling_p99_ttft(run, window_s=max(2.0, 60 / first.factor), step_s=0.5)
        axes[3].plot([t * minutes for t in ts], ys, color=color)
    axes[1].set_ylabel("replicas\n(incl. loading)")
    axes[1].legend(fontsize=7)
    axes[2].set_ylabel("queued requests\n(all replicas)")
    axes[3].set_ylabel("p99 TTFT, s\n(rolling)")
    axes[3].set_yscale("log")
    axes[3].set_xlabel(f"trace time, minutes (run {first.factor:g}x faster)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
