"""``python -m bench plan --validate [--quick]``: the planner's model against local mode.

Plans (bench/plan.py), then replays two of the planned load points through local mode: sim
replicas running the plan's profile behind a real nginx with the chosen method
(local.cluster.LocalCluster, bench/ingress_pool.py), the load sent open loop by the balancing
benchmark's client and cell machinery (bench/balance.py ``run_cell``):

* **peak**: the plan's rate on ``maxReplicas`` (autoscaling) or ``replicas`` (fixed);
* **base**: the base rate (``rate / peak-to-base``; fixed plans: half the rate) on
  ``minReplicas`` (fixed plans: the same replicas).

A GPU-regime profile runs time-dilated: by the factor local mode would pick for those replicas
(local/dilation.py: the full batch's event rate within this machine's measured headroom), raised
until the live request rate is within ``LIVE_REQUESTS_PER_S`` (the figures are beside it); the
arrivals slow down by the same factor, so the live run is the regime at ``1/D`` speed. Each
point's live p99 TTFT comes with its 95 % interval (balance.Cell.quantile: a moving-block
bootstrap over the measured requests); the discrete-event model replays the very same trace
(same arrivals, same lengths, same dilation) ``REPLAYS`` times, each arrival a few ms late as
live (``JITTER_S`` says why one replay is not enough), and the point is inside when the mean of
those replays' p99s lies in the live interval and no request failed. Every measured request,
live and modelled, goes to ``--out``/plan-validate[-quick].json (default build/bench/). The
last line is ``plan validate: <k> of 2 points inside the live 95% CI``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bench import balance, des, plan, plan_workload, trace
from bench.command import shown

DEFAULTS = {"profile": "h200-llama8b", "rate": 240.0, "slo_ttft_p99": 0.08,
            "peak_to_base": 2.0, "output_tokens": "median=24,high=128"}
"""The planned load ``--validate`` checks: each of --profile, --rate and --slo-ttft-p99 not
given takes its value here; when none of them is given, --peak-to-base and --output-tokens
too (short outputs, as ``python -m bench --quick`` uses: a point ends when its last stream
does, and a dilated stream of 384 tokens lasts minutes)."""

LIVE_REQUESTS_PER_S = 10.0
"""New requests per second this 2-core machine replays faithfully with the continuous-batching
sim engine, nginx and the client (docs/capacity-planning.md): at 33/s (local mode's dilation,
4.8, for 2 replicas of h200-llama8b) the client fell 200 ms behind its schedule and the live
p50 TTFT was 20 % above the model's on the same trace; at 10/s (dilation 24) 7 ms and 3.6 %.
Local mode's dilation bounds the SSE event rate only; the validation raises it until the
request rate is within this too."""


@dataclass(frozen=True)
class Replay:
    seconds: float
    """Wall seconds of arrivals per point."""
    warmup: float
    """Wall seconds of arrivals sent but not counted (the replicas start empty)."""
    seeds: int
    """Seeds of the plan run before the replay."""


QUICK = Replay(seconds=75.0, warmup=10.0, seeds=5)
FULL = Replay(seconds=240.0, warmup=20.0, seeds=8)
JITTER_S = 0.005
"""Wall seconds by which a live request may reach its replica later than its arrival time:
the client's send lag (median 1 ms, 90th percentile 2 ms in the quick validation), nginx and
the server's parsing. A step boundary is 150-250 ms apart at dilation 24, so a request that
arrives a few ms off lands in the step before or after, the batches change, and from then on
the live replica's steps run out of phase with the model's: the TTFT of each request moves by
up to one step either way. The model's p99 of one replay is therefore one draw among many
(sd 69 ms, 7 %, at the quick base point, 310 requests); the prediction is the mean over
``REPLAYS`` replays with arrivals 0 to JITTER_S late. 1, 5 and 20 ms gave the same mean within
its noise."""
REPLAYS = 16
"""Jittered replays of the model per point (about 0.05 s each for the quick points)."""
MAX_ERROR_SHARE = 0.0
"""A point with failed requests is not inside: a failure has no TTFT to count."""


@dataclass(frozen=True)
class Point:
    name: str
    rate: float
    """Requests/s in the regime's own time (the live rate is rate / dilation)."""
    replicas: int
    planned: plan.Cell | None
    """The plan's cell at this load, when the plan modelled it."""


def points(p: plan.Plan) -> list[Point]:
    assert p.targets is not None and p.method is not None
    t = p.targets

    def planned(s: plan.Search | None, n: int) -> plan.Cell | None:
        return s.rows.get(n, {}).get(p.method) if s else None  # type: ignore[arg-type]

    if p.autoscaling:
        return [Point("peak", p.rate, t.max_replicas, planned(p.peak, t.max_replicas)),
                Point("base", p.base_rate, t.min_replicas, planned(p.base, t.min_replicas))]
    return [Point("peak", p.rate, t.max_replicas, planned(p.peak, t.max_replicas)),
            Point("base", p.rate / 2, t.max_replicas, None)]


def dilation_for(setup: plan.Setup, replicas: int, peak_rate: float) -> tuple[float, str]:
    """The dilation local mode picks for ``replicas`` of the profile, raised until the peak's
    live request rate is within ``LIVE_REQUESTS_PER_S``; and why."""
    from local import dilation

    profile = setup.model().profile
    headroom = dilation.load_headroom()
    local = dilation.pick_dilation(profile, replicas, headroom)
    rate = dilation.full_batch_event_rate(profile, replicas)
    budget = dilation.TARGET_SHARE * headroom.for_this_machine()
    why = (f"local mode's dilation for {replicas} replicas is {local:g} (full batch "
           f"{rate:,.0f} SSE events/s against a budget of {budget:,.0f}/s)")
    need = peak_rate / LIVE_REQUESTS_PER_S
    if need <= local:
        return local, why
    digits = 10 ** (math.floor(math.log10(need)) - 1)
    d = round(math.ceil(need / digits) * digits, 6)
    return d, (f"dilation {d:g}: {why}; raised so the peak's {peak_rate:g} requests/s arrive at "
               f"most {LIVE_REQUESTS_PER_S:g}/s live")


def model_ttft(tr: trace.Trace, setup: plan.Setup, replicas: int, method: str,
               warmup: float, jitter: int | None = None) -> list[float]:
    """TTFT the discrete-event model gives each measured request of ``tr`` (arrival order).
    ``jitter``: a seed; each arrival then reaches its replica ``uniform(0, JITTER_S)`` late, as
    in the live run (the client's send lag, nginx, the server's parsing)."""
    jobs = plan_workload.jobs_from_trace(tr, setup.block_size())
    measured = [j.arrival >= warmup for j in jobs]
    if jitter is not None:
        rng = random.Random(jitter)
        jobs = [replace(j, arrival=j.arrival + rng.uniform(0, JITTER_S)) for j in jobs]
    order = sorted(range(len(jobs)), key=lambda k: jobs[k].arrival)
    res = des.simulate([jobs[k] for k in order], setup.params(replicas), method, seed=1)
    ttft = [0.0] * len(jobs)
    for k, t in zip(order, res.ttft):
        ttft[k] = t
    return [t for t, m in zip(ttft, measured) if m]


@dataclass(frozen=True)
class Expected:
    """The model's p99 TTFT on one trace: the mean over ``REPLAYS`` jittered replays."""

    p99: float
    p99_sd: float
    """Standard deviation of the replays' p99s: how far one replay's p99 strays."""
    p50: float
    exact_p99: float
    """The p99 of the replay without jitter."""
    ttft: list[float]
    """Each measured request's TTFT in the replay without jitter."""


def model_expected(tr: trace.Trace, setup: plan.Setup, replicas: int, method: str,
                   warmup: float, replays: int = REPLAYS) -> Expected:
    """What the model predicts for the live run of ``tr``: the mean of the p99 (and p50) over
    ``replays`` replays whose arrivals are each 0 to ``JITTER_S`` late (seeds 1..replays)."""
    exact = model_ttft(tr, setup, replicas, method, warmup)
    runs = [model_ttft(tr, setup, replicas, method, warmup, jitter=k)
            for k in range(1, replays + 1)]
    p99s = [float(np.percentile(r, 99)) for r in runs]
    return Expected(float(np.mean(p99s)), float(np.std(p99s, ddof=1)),
                    float(np.mean([np.percentile(r, 50) for r in runs])),
                    float(np.percentile(exact, 99)), exact)


def _fill_defaults(args: argparse.Namespace) -> None:
    bare = all(getattr(args, k) is None for k in ("profile", "rate", "slo_ttft_p99"))
    for key in ("profile", "rate", "slo_ttft_p99"):
        if getattr(args, key) is None:
            setattr(args, key, DEFAULTS[key])
    if bare and args.peak_to_base == 1.0:
        args.peak_to_base = DEFAULTS["peak_to_base"]
    if bare and args.output_tokens is None:
        args.output_tokens = DEFAULTS["output_tokens"]


def main(ap: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> int:
    t_start = time.monotonic()
    replay = QUICK if args.quick else FULL
    _fill_defaults(args)
    if args.seeds == ap.get_default("seeds"):
        args.seeds = replay.seeds
    setup = plan.setup_from_args(ap, args)
    say = balance.say
    command = shown("python -m bench plan", argv)
    say(f"{command}: planning {args.rate:g} requests/s under {setup.profile}, TTFT p99 <= "
        f"{args.slo_ttft_p99 * 1e3:.0f} ms, peak-to-base {args.peak_to_base:g} ...")
    p = plan.make_plan(setup, args.rate, args.slo_ttft_p99, args.peak_to_base,
                       max_replicas=args.max_replicas, jobs=args.jobs)
    if p.method is None or p.targets is None:
        say(f"plan: no replica count meets the objective ({p.peak.stop}); nothing to validate")
        say("plan validate: 0 of 2 points inside the live 95% CI")
        return 1
    pts = points(p)
    n_max = max(pt.replicas for pt in pts)
    say(f"plan (modelled, {p.seconds:.0f} s): {p.method}, "
        + ", ".join(f"{pt.name} {pt.rate:g} requests/s on {pt.replicas}" for pt in pts))
    if args.time_dilation is not None:
        d, why = args.time_dilation, f"dilation {args.time_dilation:g} (given)"
    else:
        d, why = dilation_for(setup, n_max, max(pt.rate for pt in pts))
    live = replace(setup, time_dilation=d)
    model = live.model()
    env = model.env() | {"LLM_MAX_CONCURRENCY": str(live.slots())}
    mean_out = float(np.mean([j.max_tokens for j in plan_workload.jobs(
        100, 50, 1, setup.workload, setup.max_model_len)]))
    say(f"live: {why}")
    for pt in pts:
        say(f"  {pt.name}: {pt.rate / d:.1f} requests/s live ({pt.rate:g} in the regime), "
            f"~{pt.rate * mean_out / d:,.0f} SSE events/s, {replay.seconds:g} s of arrivals "
            f"(first {replay.warmup:g} s not counted)")
    workload = setup.workload
    if workload.sessions:  # think times are wall time too
        workload = replace(workload, think_mean_s=workload.think_mean_s * d,
                           reply_s_per_token=workload.reply_s_per_token * d)

    from bench.ingress_pool import NginxPool
    from local.cluster import LocalCluster

    base = balance.free_base_port(n_max + 1 + 2, 17)
    results: list[bool] = []
    dumps: list[dict] = []
    with LocalCluster(n_max, port=base + n_max, first_replica_port=base, server_env=env,
                      max_output_tokens=model.nginx_output_tokens) as cluster:
        upstreams = [u.removeprefix("http://") for u in cluster.replica_urls]
        queue = int(env["LLM_MAX_QUEUE"])
        pools: dict[int, NginxPool] = {}
        try:
            for i, pt in enumerate(pts):
                if pt.replicas not in pools:
                    pools[pt.replicas] = NginxPool(
                        upstreams[:pt.replicas], 1, base + n_max + 1 + len(pools),
                        max_output_tokens=model.nginx_output_tokens,
                        replica_slots=live.slots(),
                        admission_limit=pt.replicas * (live.slots() + queue))
                tr = trace.generate(pt.rate / d, replay.seconds, 100 + i, workload,
                                    setup.max_model_len)
                expected = model_expected(tr, live, pt.replicas, p.method, replay.warmup)
                cell = balance.run_cell(cluster, pools[pt.replicas], tr, "plan", pt.rate,
                                        p.method, replay.warmup, grace=120.0,
                                        salt=f"validate{i}", seed=100 + i)
                results.append(_report(pt, cell, expected, d, p.method))
                dumps.append(_dump(pt, tr, cell, expected, replay.warmup, d, results[-1]))
        finally:
            for pool in pools.values():
                pool.close()
    inside = sum(results)
    out = Path(args.out) / f"plan-validate{'-quick' * args.quick}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "profile": setup.profile,
                               "method": p.method, "dilation": d, "points": dumps}, indent=1))
    say(f"per-request live and modelled TTFT: {out}")
    say(f"validated in {time.monotonic() - t_start:.0f} s on {os.cpu_count()} cores")
    say(f"plan validate: {inside} of {len(pts)} points inside the live 95% CI")
    return 0 if inside == len(pts) else 1


def _report(pt: Point, cell: balance.Cell, m: Expected, d: float, method: str) -> bool:
    live = cell.quantile(99)
    s = cell.summary
    m99 = m.p99
    ok = live.contains(m99) and s.errors <= MAX_ERROR_SHARE * s.requests
    planned = ""
    if pt.planned is not None:
        iv = pt.planned.p99.scaled(d)
        planned = (f"; the plan's own interval at this load {iv.lo * 1e3:.0f}-"
                   f"{iv.hi * 1e3:.0f} ms (dilated)")
    balance.say(
        f"[{pt.name}] {pt.rate:g} requests/s on {pt.replicas} replicas, {method}, dilation "
        f"{d:g}: live TTFT p99 {live.value * 1e3:.0f} ms (95 % CI {live.lo * 1e3:.0f}-"
        f"{live.hi * 1e3:.0f}), p50 {s.ttft_p50 * 1e3:.0f} ms, {s.requests} requests, "
        f"{s.errors} errors, client send lag <= {s.send_lag_max * 1e3:.0f} ms "
        f"({cell.seconds:.0f} s); model on the same trace p99 {m99 * 1e3:.0f} ms (mean of "
        f"{REPLAYS} replays with arrivals 0-{JITTER_S * 1e3:g} ms late; one replay's sd "
        f"{m.p99_sd * 1e3:.0f} ms, unjittered {m.exact_p99 * 1e3:.0f}), p50 {m.p50 * 1e3:.0f} "
        f"ms: {'inside' if ok else 'OUTSIDE'}"
        + (f" ({s.errors} failed)" if s.errors else "") + planned
        + f"; undilated: live p99 {live.value / d * 1e3:.1f} ms, model {m99 / d * 1e3:.1f} ms")
    return ok


def _dump(pt: Point, tr: trace.Trace, cell: balance.Cell, m: Expected, warmup: float,
          d: float, ok: bool) -> dict:
    """One point's measured requests, live and modelled (the unjittered replay) side by side,
    in live seconds."""
    live = cell.quantile(99)
    reqs = [r for r in tr.requests if r.arrival >= warmup]
    rows = []
    for q, rec, t in zip(reqs, cell.records, m.ttft):
        rows.append({"arrival": q.arrival, "prompt_tokens": q.prompt_tokens,
                     "max_tokens": q.max_tokens, "live_ttft": rec.ttft if rec.ok else None,
                     "model_ttft": t, "send_lag": rec.sent - rec.scheduled})
    return {"name": pt.name, "rate": pt.rate, "live_rate": pt.rate / d,
            "replicas": pt.replicas, "live_p99": [live.value, live.lo, live.hi],
            "model_p99": m.p99, "model_p99_sd": m.p99_sd, "model_exact_p99": m.exact_p99,
            "inside": ok, "requests": rows}
