"""Tables (with 95 % intervals), the model check, the bars and the plot of a balancing run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from bench import ci
from bench.balance import DEFAULT_METHOD, LIMIT_DISPATCHER as LIMIT, Cell, cell

MODEL_LABEL = {"fcfs": "limit: central FCFS (model)", "round_robin": "round_robin (model)",
               "least_conn": "least_conn (model)",
               "random_two_least_conn": "random_two_least_conn (model)"}


def _ms(iv: ci.Interval) -> str:
    if math.isnan(iv.value):
        return "—"
    return f"{iv.value * 1e3:.0f} ({iv.lo * 1e3:.0f}–{iv.hi * 1e3:.0f})"


def _x(iv: ci.Interval) -> str:
    if math.isnan(iv.value):
        return "—"
    return f"{iv.value:.2f}× ({iv.lo:.2f}–{iv.hi:.2f})"


def table(cells: Sequence[Cell], modelled: dict) -> str:
    """One row per cell, plus the model's rows under each standalone load."""
    head = ["workload", "load", "NGINX", "target", "requests", "errors", "TTFT p50 ms (95% CI)",
            "TTFT p99 ms (95% CI)", "p99 / limit (95% CI)", "E2E p50 s", "busiest",
            "cache hit", "spilled"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    done_model: set = set()
    for c in cells:
        limit = modelled.get((c.workload, c.load), {}).get(LIMIT)
        to_limit = ci.ratio(c.ttft, limit, 99, strata=c.strata) if limit is not None else ci.NAN
        s = c.summary
        lines.append("| " + " | ".join([
            c.workload, f"{c.load:.0%}", str(c.pods) if c.pods else "—", c.target,
            str(s.requests), str(s.errors), _ms(c.quantile(50)), _ms(c.quantile(99)),
            _x(to_limit),
            "—" if math.isnan(s.e2e_p50) else f"{s.e2e_p50:.2f}", f"{c.busiest:.2f}×",
            "—" if c.hit is None else f"{c.hit:.0%}", str(c.spilled) if c.pods else "—",
        ]) + " |")
        key = (c.workload, c.load)
        if key in modelled and key not in done_model and _last_of(cells, c):
            done_model.add(key)
            st = modelled.get("strata", {}).get(key)
            for d, ttft in modelled[key].items():
                lim = ci.ratio(ttft, modelled[key][LIMIT], 99, strata=st)
                lines.append("| " + " | ".join([
                    c.workload, f"{c.load:.0%}", "—", MODEL_LABEL[d], str(len(ttft)), "0",
                    _ms(ci.quantile(ttft, 50, strata=st)), _ms(ci.quantile(ttft, 99, strata=st)),
                    _x(lim),
                    "—", "—", "—", "—"]) + " |")
    return "\n".join(lines)


def _last_of(cells: Sequence[Cell], c: Cell) -> bool:
    same = [x for x in cells if x.workload == c.workload and math.isclose(x.load, c.load)]
    return same[-1] is c


def model_check(cells: Sequence[Cell], modelled: dict) -> list[str]:
    """Does the model's round robin / least_conn fall inside the live intervals?"""
    out = []
    for key, rows in modelled.items():
        if not isinstance(key, tuple):
            continue
        wname, load = key
        for method in ("round_robin", "least_conn"):
            live = cell(cells, wname, load, 1, method)
            if live is None:
                continue
            for q in (50, 99):
                iv = live.quantile(q)
                modelled_q = ci.quantile(rows[method], q).value
                verdict = "inside" if iv.contains(modelled_q) else "OUTSIDE"
                out.append(f"model check {wname} {load:.0%} {method} p{q}: model "
                           f"{modelled_q * 1e3:.0f} ms, live {_ms(iv)} ms: {verdict}")
    return out


def _ratio(a: Cell | None, b: Cell | None, q: float) -> ci.Interval:
    if a is None or b is None or len(a.ttft) != len(b.ttft) or a.strata != b.strata:
        return ci.NAN
    return ci.ratio(a.ttft, b.ttft, q, strata=a.strata)


def bars(cells: Sequence[Cell], modelled: dict) -> list[str]:
    """The performance targets, each with its measured interval and a verdict on the upper
    end ("reached" / "not reached": they do not fail the run), and the correctness bar of the
    overload cell (nothing lost: a miss exits 1)."""
    out = []
    default = cell(cells, "standalone", 0.8, 1, DEFAULT_METHOD)
    limit = modelled.get(("standalone", 0.8), {}).get(LIMIT)
    if default is not None and limit is not None:
        r = ci.ratio(default.ttft, limit, 99, strata=default.strata)
        out.append(f"default ({DEFAULT_METHOD}) p99 TTFT / limit at 80%: {_x(r)} — "
                   f"target ≤ 1.25×: {_verdict(r, 1.25)}")
    rr = _ratio(cell(cells, "standalone", 0.8, 1, "round_robin"), default, 99)
    if not math.isnan(rr.value):
        out.append(f"round_robin / default p99 TTFT at 80%: {_x(rr)}")
    sh = cell(cells, "sessions", 0.8, 1, "session_hash")
    bd = cell(cells, "sessions", 0.8, 1, "session_hash_bounded")
    lc = cell(cells, "sessions", 0.8, 1, "least_conn")
    if sh is not None and bd is not None and sh.hit and bd.hit is not None:
        share = bd.hit / sh.hit
        out.append(f"sessions: bounded cache hit {bd.hit:.0%} = {share:.0%} of session_hash's "
                   f"{sh.hit:.0%} (counters, no interval) — target ≥ 90%: "
                   f"{'reached' if share >= 0.9 else 'not reached'}")
        p50 = _ratio(bd, sh, 50)
        out.append(f"sessions: bounded / session_hash p50 TTFT: {_x(p50)} — target ≤ 1.2×: "
                   f"{_verdict(p50, 1.2)}")
    if bd is not None and lc is not None:
        p99 = _ratio(bd, lc, 99)
        out.append(f"sessions: bounded / least_conn p99 TTFT: {_x(p99)} — target ≤ 1.1×: "
                   f"{_verdict(p99, 1.1)}")
    sa = _ratio(cell(cells, "standalone", 0.8, 1, "session_hash_bounded"),
                cell(cells, "standalone", 0.8, 1, "least_conn"), 99)
    if not math.isnan(sa.value):
        out.append(f"standalone: bounded / least_conn p99 TTFT: {_x(sa)} — target ≤ 1.2×: "
                   f"{_verdict(sa, 1.2)}")
    for k in sorted({c.pods for c in cells if c.pods > 1}):
        for t in sorted({c.target for c in cells if c.pods == k}):
            kc, one = cell(cells, "standalone", 0.8, k, t), cell(cells, "standalone", 0.8, 1, t)
            if kc is not None and one is not None:
                out.append(f"K={k} NGINX {t}: p99 TTFT {_ms(kc.quantile(99))} ms vs "
                           f"K=1 {_ms(one.quantile(99))} ms; ratio {_x(_ratio(kc, one, 99))}")
    for c in cells:
        if c.target.startswith("session_hash_bounded") and c.load > 1:
            out.append(f"overload {c.load:.0%} {c.target}: {c.summary.errors} of "
                       f"{c.summary.requests} requests lost, {c.spilled} found every replica "
                       f"at its bound — bar 0 lost: {'met' if c.summary.errors == 0 else 'NOT met'}")
    return out


def _verdict(iv: ci.Interval, target: float) -> str:
    if math.isnan(iv.value):
        return "not measured"
    if iv.hi <= target:
        return "reached (upper end of the interval)"
    if iv.value <= target:
        return "point estimate reaches it, the interval does not"
    return "not reached"


def lost_in_overload(cells: Sequence[Cell]) -> int:
    """Requests lost in the overload cells (the correctness bar: any makes the run exit 1)."""
    return sum(c.summary.errors for c in cells
               if c.target.startswith("session_hash_bounded") and c.load > 1)


def conclusion(cells: Sequence[Cell], modelled: dict, *, quick: bool) -> str:
    """The run in one plain sentence, last of its output."""
    parts = []
    default = cell(cells, "standalone", 0.8, 1, DEFAULT_METHOD)
    limit = modelled.get(("standalone", 0.8), {}).get(LIMIT)
    if default is not None and limit is not None:
        r = ci.ratio(default.ttft, limit, 99, strata=default.strata)
        if not math.isnan(r.value):
            where = ("within" if r.hi <= 1.25 else "at, within noise," if r.value <= 1.25
                     else "over")
            parts.append(f"the slowest 1% of first tokens through the default {DEFAULT_METHOD} "
                         f"took {r.value:.2f}x as long as through the best possible balancer "
                         f"(a modelled central queue), {where} the 1.25x target")
    rr = _ratio(cell(cells, "standalone", 0.8, 1, "round_robin"), default, 99)
    if not math.isnan(rr.value):
        parts.append(f"round_robin's took {rr.value:.2f}x the default's")
    sh = cell(cells, "sessions", 0.8, 1, "session_hash")
    bd = cell(cells, "sessions", 0.8, 1, "session_hash_bounded")
    if sh is not None and bd is not None and sh.hit and bd.hit is not None:
        parts.append(f"session_hash_bounded kept {bd.hit / sh.hit:.0%} of session_hash's "
                     "prefix-cache hits")
    over = [c for c in cells if c.target.startswith("session_hash_bounded") and c.load > 1]
    if over:
        lost = lost_in_overload(cells)
        parts.append("above capacity no request was lost" if not lost
                     else f"above capacity {lost} requests were lost (bar: none)")
    head = ("Conclusion (quick run: a smoke test with wide intervals, the full run in "
            "docs/load-balancing.md decides)" if quick else "Conclusion")
    if not parts:
        return f"{head}: this plan measured none of the headline cells; see the table above."
    return f"{head}: at 80% load, " + "; ".join(parts) + "."


def last_lines(cells: Sequence[Cell]) -> list[str]:
    """The two closing lines of every run (the issue fixes their form)."""
    sh = cell(cells, "sessions", 0.8, 1, "session_hash")
    bd = cell(cells, "sessions", 0.8, 1, "session_hash_bounded")
    lc = cell(cells, "sessions", 0.8, 1, "least_conn")
    share = (bd.hit / sh.hit * 100) if sh and bd and sh.hit and bd.hit is not None else math.nan
    p99 = _ratio(bd, lc, 99).value
    rr = _ratio(cell(cells, "standalone", 0.8, 1, "round_robin"),
                cell(cells, "standalone", 0.8, 1, DEFAULT_METHOD), 99)
    return [f"affinity: hit {share:.0f}% of session_hash, p99 {p99:.2f}x least_conn",
            f"round_robin/default p99 TTFT: {rr.value:.2f}x (95% CI {rr.lo:.2f}-{rr.hi:.2f})"]


def plot(cells: Sequence[Cell], modelled: dict, path: Path, title: str) -> None:
    """p99 TTFT with its interval per target, standalone 80% (one NGINX and more) and
    sessions 80%, beside the model's limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("standalone", [c for c in cells if c.workload == "standalone"
                              and math.isclose(c.load, 0.8) and c.pods >= 1]),
              ("sessions", [c for c in cells if c.workload == "sessions"])]
    groups = [(g, cs) for g, cs in groups if cs]
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), dpi=110,
                             squeeze=False)
    for ax, (g, cs) in zip(axes[0], groups):
        labels, vals, lo, hi = [], [], [], []
        for c in cs:
            iv = c.quantile(99)
            labels.append(f"{c.target}\nx{c.pods}" if c.pods > 1 else c.target)
            vals.append(iv.value * 1e3)
            lo.append((iv.value - iv.lo) * 1e3)
            hi.append((iv.hi - iv.value) * 1e3)
        ax.bar(range(len(vals)), vals, yerr=[lo, hi], capsize=3, color="C0")
        limit = modelled.get((g, 0.8), {}).get(LIMIT)
        if limit is not None:
            ax.axhline(ci.quantile(limit, 99, strata=modelled.get("strata", {}).get((g, 0.8)))
                       .value * 1e3, color="C3", ls="--",
                       label="limit: central FCFS (model)")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(vals)), labels, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("p99 TTFT, ms (95% CI)")
        ax.set_title(f"{g}, 80% load", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
