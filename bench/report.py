"""Markdown table and PNG plot of a benchmark's results."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.stats import Summary


@dataclass(frozen=True)
class Row:
    workload: str
    """`standalone` or `sessions`."""
    load: float
    """Fraction of measured capacity."""
    target: str
    """A policy name, or `direct` (client-side round robin straight to the replicas)."""
    summary: Summary
    busiest_share: float
    """Requests of the busiest replica / the mean per replica (1.00 = perfectly even)."""
    cache_hit: float | None = None
    """Prompt tokens found in the prefix cache / prompt tokens, over the run."""


def _ms(x: float) -> str:
    return "—" if math.isnan(x) else f"{x * 1000:.0f}"


def _s(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.2f}"


def markdown_table(rows: Sequence[Row]) -> str:
    sessions = any(r.cache_hit is not None for r in rows)
    head = ["workload", "load", "target", "requests", "errors", "TTFT p50 ms", "TTFT p99 ms",
            "ITL p50 ms", "ITL p99 ms", "E2E p50 s", "E2E p99 s", "busiest replica"]
    if sessions:
        head.append("cache hit")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r.summary
        cells = [r.workload, f"{r.load:.0%}", r.target, str(s.requests), str(s.errors),
                 _ms(s.ttft_p50), _ms(s.ttft_p99), _ms(s.itl_p50), _ms(s.itl_p99),
                 _s(s.e2e_p50), _s(s.e2e_p99), f"{r.busiest_share:.2f}×"]
        if sessions:
            cells.append("—" if r.cache_hit is None else f"{r.cache_hit:.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path, title: str) -> None:
    """p50 (dashed) and p99 (solid) TTFT per target against load, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(r.target for r in rows))
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for i, target in enumerate(targets):
        pts = sorted((r.load, r.summary) for r in rows if r.target == target)
        if not pts:
            continue
        color = "0.45" if target == "direct" else f"C{i}"
        xs = [p[0] * 100 for p in pts]
        ax.plot(xs, [p[1].ttft_p99 * 1000 for p in pts], "-o", color=color,
                label=f"{target} p99")
        ax.plot(xs, [p[1].ttft_p50 * 1000 for p in pts], "--", marker=".", color=color,
                label=f"{target} p50")
    ax.set_yscale("log")
    ax.set_xlabel("offered load, % of measured capacity")
    ax.set_ylabel("time to first token, ms")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
