"""Which regime are you in: the balancing comparison in the CPU regime and the GPU regime, in the
discrete-event model (bench/des.py), with intervals over seeds.

``python -m bench regime [--regimes cpu,gpu] [--seeds 20] [--workloads standalone,sessions]
[--out DIR]`` replays, per regime, workload, load and seed, one seeded trace through every
dispatcher below and prints (and writes as Markdown) the p50 and p99 TTFT, the prefix-cache hit
rate and the ratios the docs quote, each as the median over seeds with a 95 % interval of that
median (order statistics: the interval holds the median of the ratio's distribution over traces
with at least 95 % confidence), and p10-p90 over the seeds.

Regimes (``REGIMES``):

* ``cpu``: the CPU study's setup, 4 replicas of the ``cpu-sim`` profile (8 slots each),
  290-second traces, the first 30 s dropped.
* ``gpu``: what Pulumi.prod.yaml deploys, on the ``h200-llama8b`` profile: 2 replicas
  (autoscaling's minReplicas), ``max_num_seqs`` 128 (model.maxConcurrency), max_model_len 8192
  (model.maxContextLength); 60-second traces (about 12,000 requests at 80 % load), the first
  10 s dropped. ``gpu4``: the same at 4 replicas (maxReplicas).

Capacity, in both regimes, is what ``python -m bench`` measures live (bench/capacity.py): the
request rate the replicas sustain with every one of them holding its full batch (8 slots, or
``max_num_seqs``), modelled here by one central queue under overload (``model_capacity``). Load
is a fraction of it. In the GPU regime nothing queues until the batches fill, so the points that
matter are up to the edge: 50 %, 80 % and 95 %.

``python -m bench regime headroom`` measures, live, whether this machine keeps a dilated
GPU-regime run's timing (see ``headroom``). Pure computation otherwise (no servers).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import des, trace
from bench.command import OUT, OUT_HELP, shown
from bench.dispatch import Epp, Nginx, epp_block_hashes, epp_prompt_text
from bench.simmodel import SimModel
from bench.stats import percentile
from server.engines.scheduler import block_keys
from server.engines.sim import sim_chat_prompt, sim_tokenize

MODEL_NAME = "sim"
"""The model name the EPP seeds its prefix hashes with (any fixed name)."""


@dataclass(frozen=True)
class Regime:
    name: str
    profile: str
    replicas: int
    max_num_seqs: int | None
    max_model_len: int
    duration: float
    warmup: float
    loads: tuple[float, ...]
    """Standalone loads (fractions of capacity)."""
    sessions_loads: tuple[float, ...]
    instances: tuple[int, ...] = (2, 4)
    """NGINX instance counts beside one."""
    what: str = ""

    def model(self) -> SimModel:
        return SimModel.named(self.profile, 1.0, self.max_num_seqs,
                              max_model_len=self.max_model_len)


REGIMES = {
    "cpu": Regime("cpu", "cpu-sim", 4, None, 16_384, 290.0, 30.0, (0.8,), (0.8,),
                  what="4 replicas of cpu-sim (8 slots each): the CPU study's setup"),
    "gpu": Regime("gpu", "h200-llama8b", 2, 128, 8192, 60.0, 10.0, (0.5, 0.8, 0.95), (0.8, 0.95),
                  what="prod: 2 replicas of h200-llama8b, max_num_seqs 128, max_model_len 8192"),
    "gpu4": Regime("gpu4", "h200-llama8b", 4, 128, 8192, 60.0, 10.0, (0.8, 0.95), (),
                   what="prod at maxReplicas: 4 replicas of h200-llama8b, max_num_seqs 128"),
}

REPORT = "regime-results.md"
"""The report's file name in the --out folder (default build/bench/, ignored by git)."""

LIMIT = "limit"
WORKLOADS = {"standalone": trace.Workload(), "sessions": trace.Workload(sessions=True)}


@dataclass(frozen=True)
class Target:
    label: str
    dispatcher: des.Dispatcher


def targets(workload: str, instances: Sequence[int]) -> list[Target]:
    """What each workload compares: the limit, the NGINX methods (at one instance and at K),
    the bounded hash's factor, and the endpoint picker."""
    out = [Target(LIMIT, "fcfs")]
    if workload == "standalone":
        out += [Target(m, m) for m in ("round_robin", "least_conn", "random_two_least_conn")]
        out.append(Target("session_hash_bounded*1.25", Nginx("session_hash_bounded")))
        for k in instances:
            out += [Target(f"least_conn x{k}", Nginx("least_conn", k)),
                    Target(f"random_two_least_conn x{k}", Nginx("random_two_least_conn", k))]
    else:
        out += [Target("least_conn", "least_conn"), Target("session_hash", Nginx("session_hash"))]
        out += [Target(f"session_hash_bounded*{f:g}", Nginx("session_hash_bounded", 1, f))
                for f in (1.0, 1.25, 1.5, 2.0)]
        for k in instances:
            out += [Target(f"least_conn x{k}", Nginx("least_conn", k)),
                    Target(f"session_hash_bounded*1.25 x{k}",
                           Nginx("session_hash_bounded", k, 1.25))]
    out += [Target("EPP", Epp()), Target("EPP + flow control", Epp(flow_control=True))]
    return out


# --- traces as the model's jobs -------------------------------------------------------------------


def jobs_of(tr: trace.Trace, block_tokens: int = 16) -> list[des.Job]:
    """The model's jobs of a trace. Sessions carry what the dispatchers and caches key on: the
    session header, the prompt's block keys (the replicas' prefix caches) and the endpoint
    picker's hashes of the prompt text; standalone prompts share nothing, so they carry none."""
    if not tr.workload.sessions:
        return [des.Job(r.arrival, r.prompt_tokens, r.max_tokens) for r in tr.requests]
    out = []
    for r in tr.requests:
        ids = sim_tokenize(sim_chat_prompt(r.messages))
        out.append(des.Job(r.arrival, r.prompt_tokens, r.max_tokens,
                           tuple(block_keys(ids, block_tokens)), r.session,
                           epp_block_hashes(epp_prompt_text(r.messages), MODEL_NAME)))
    return out


def model_capacity(model: SimModel, replicas: int, workload: trace.Workload,
                   duration: float, warmup: float, seed: int = 1000) -> float:
    """Requests/s the replicas sustain with every one of them holding its full batch, as
    bench/capacity.py measures it live (tokens/s at saturation over the mean output tokens of
    the same request pool, seed + 1): here one central queue (``fcfs``) under overload, tokens
    counted after ``warmup`` (each request's spread evenly between its first and last). The
    arrival rate is an upper bound of the throughput (every step as short as one sequence's),
    so the queue never empties."""
    mean_out = trace.generate(50, 40, seed + 1, workload, model.max_model_len).mean_output_tokens
    step = model.profile.decode_step_seconds(1, 0)
    rate = replicas * model.slots / (mean_out * step)
    if workload.sessions:  # turns arrive later than their session starts
        rate *= 1.5
    tr = trace.generate(rate, duration, seed, workload, model.max_model_len)
    jobs = jobs_of(tr, model.prefix_block_tokens)
    res = des.simulate(jobs, model.des_params(replicas), "fcfs", seed=seed)
    tokens = 0.0
    for job, f, e in zip(jobs, res.ttft, res.e2e):
        a, b, n = job.arrival + f, job.arrival + e, job.max_tokens
        if n == 1 or b == a:
            tokens += warmup <= a < duration
            continue
        k = (n - 1) / (b - a)  # tokens k = 0..n-1 at a + k / rate
        lo = max(0, math.ceil((warmup - a) * k))
        hi = min(n - 1, math.ceil((duration - a) * k) - 1)
        tokens += max(0, hi - lo + 1)
    cap = tokens / (duration - warmup) / mean_out
    served = sum(1 for job, e in zip(jobs, res.e2e) if job.arrival + e < duration)
    if served > 0.9 * len(jobs):
        raise RuntimeError(f"the capacity run was not saturated ({served} of {len(jobs)} "
                           "requests served within it)")
    return cap


# --- one cell: a regime, workload, load and seed --------------------------------------------------


@dataclass
class Run:
    p50: float
    p99: float
    hit: float | None
    all_full: float
    """Share of requests that found every replica at its bound."""
    ttft: list[float] = field(repr=False)
    e2e: list[float] = field(repr=False)
    tokens: list[int] = field(repr=False)


def run_cell(model: SimModel, replicas: int, tr: trace.Trace, warmup: float, seed: int,
             chosen: Sequence[Target]) -> dict[str, Run]:
    jobs = jobs_of(tr, model.prefix_block_tokens)
    params = model.des_params(replicas)
    keep = [i for i, j in enumerate(jobs) if j.arrival >= warmup]
    out = {}
    for t in chosen:
        res = des.simulate(jobs, params, t.dispatcher, seed=seed)
        ttft = [res.ttft[i] for i in keep]
        hit = res.hit_tokens / res.lookup_tokens if res.lookup_tokens else None
        out[t.label] = Run(percentile(ttft, 50), percentile(ttft, 99),
                           hit if tr.workload.sessions else None, res.all_full / len(jobs),
                           ttft, [res.e2e[i] for i in keep], [jobs[i].max_tokens for i in keep])
    return out


# --- intervals over seeds -------------------------------------------------------------------------


def median_interval(xs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(median, lo, hi): the order-statistic interval that holds the distribution's median with
    probability >= ``level`` (binomial; with fewer than 6 values it is (min, max), below 95 %)."""
    ys = sorted(xs)
    n = len(ys)
    k, acc = 0, 0.0
    while True:  # largest k with P(Binomial(n, 1/2) < k) <= (1 - level) / 2
        p = math.comb(n, k) / 2 ** n
        if acc + p > (1 - level) / 2:
            break
        acc += p
        k += 1
    lo, hi = ys[max(0, k - 1)], ys[min(n - 1, n - k)]
    return percentile(ys, 50), lo, hi


def fmt_interval(xs: Sequence[float], unit: str = "×", scale: float = 1.0, digits: int = 2) -> str:
    if not xs:
        return "—"
    m, lo, hi = median_interval([x * scale for x in xs])
    return f"{m:.{digits}f}{unit} ({lo:.{digits}f}–{hi:.{digits}f})"


# --- the study ------------------------------------------------------------------------------------


@dataclass
class Study:
    regime: Regime
    capacity: dict[str, float]
    runs: dict[tuple[str, float], list[dict[str, Run]]]
    """(workload, load) -> one dict per seed."""
    seconds: float = 0.0

    def values(self, workload: str, load: float, fn: Callable[[dict[str, Run]], float | None]
               ) -> list[float]:
        out = []
        for per_seed in self.runs.get((workload, load), []):
            try:
                v = fn(per_seed)
            except KeyError:
                continue
            if v is not None and not math.isnan(v):
                out.append(v)
        return out


def study(regime: Regime, seeds: Sequence[int], workloads: Sequence[str],
          say: Callable[[str], None] = print) -> Study:
    t0 = time.monotonic()
    model = regime.model()
    capacity = {}
    runs: dict[tuple[str, float], list[dict[str, Run]]] = {}
    for wname in workloads:
        loads = regime.loads if wname == "standalone" else regime.sessions_loads
        if not loads:
            continue
        wl = WORKLOADS[wname]
        cap_s = 120.0 if regime.name == "cpu" else 40.0
        capacity[wname] = model_capacity(model, regime.replicas, wl, cap_s, cap_s / 4)
        say(f"[{regime.name} {wname}] capacity {capacity[wname]:.2f} requests/s (model)")
        chosen = targets(wname, regime.instances)
        for load in loads:
            cells = []
            for seed in seeds:
                tr = trace.generate(capacity[wname] * load, regime.duration, seed, wl,
                                    model.max_model_len)
                cells.append(run_cell(model, regime.replicas, tr, regime.warmup, seed, chosen))
                say(f"[{regime.name} {wname} {load:.0%} seed {seed}] {len(tr.requests)} requests: "
                    + ", ".join(f"{k} {v.p99 * 1e3:.0f}" for k, v in cells[-1].items())
                    + " (p99 ms)")
            runs[(wname, load)] = cells
    return Study(regime, capacity, runs, time.monotonic() - t0)


def _ratio(a: str, b: str, q: int = 99) -> Callable[[dict[str, Run]], float]:
    def fn(r: dict[str, Run]) -> float:
        x, y = (r[a].p99, r[b].p99) if q == 99 else (r[a].p50, r[b].p50)
        return x / y
    return fn


def table(s: Study) -> list[str]:
    """One row per (workload, load, target): p50, p99, p99 / limit, p99 / least_conn, hit."""
    head = ["workload", "load", "target", "TTFT p50 ms", "TTFT p99 ms", "p99 / limit",
            "p99 / least_conn", "cache hit", "every replica at its bound"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (wname, load), per_seed in s.runs.items():
        for label in per_seed[0]:
            hits = s.values(wname, load, lambda r: r[label].hit)
            full = s.values(wname, load, lambda r: r[label].all_full)
            lines.append("| " + " | ".join([
                wname, f"{load:.0%}", label + " (model)",
                fmt_interval(s.values(wname, load, lambda r: r[label].p50), "", 1e3, 0),
                fmt_interval(s.values(wname, load, lambda r: r[label].p99), "", 1e3, 0),
                fmt_interval(s.values(wname, load, _ratio(label, LIMIT))),
                fmt_interval(s.values(wname, load, _ratio(label, "least_conn"))),
                fmt_interval(hits, " %", 100, 0) if hits else "—",
                fmt_interval(full, " %", 100, 1) if full and max(full) > 0 else "—",
            ]) + " |")
    return lines


def headline(s: Study) -> list[str]:
    """The ratios docs/load-balancing.md's regime table quotes."""
    out = []
    for (wname, load), _ in s.runs.items():
        def row(name: str, fn: Callable[[dict[str, Run]], float | None], unit: str = "×",
                scale: float = 1.0) -> None:
            xs = s.values(wname, load, fn)
            if xs:
                lo10, hi90 = percentile(xs, 10), percentile(xs, 90)
                out.append(f"{s.regime.name} {wname} {load:.0%}: {name}: "
                           f"{fmt_interval(xs, unit, scale)} median over {len(xs)} seeds "
                           f"(95% CI); p10-p90 {lo10 * scale:.2f}-{hi90 * scale:.2f}")
        if wname == "standalone":
            row("round_robin / least_conn p99", _ratio("round_robin", "least_conn"))
            row("least_conn / limit p99", _ratio("least_conn", LIMIT))
            row("random_two_least_conn / least_conn p99",
                _ratio("random_two_least_conn", "least_conn"))
            for k in s.regime.instances:
                row(f"least_conn x{k} / x1 p99", _ratio(f"least_conn x{k}", "least_conn"))
            row("session_hash_bounded*1.25 (no key) / least_conn p99",
                _ratio("session_hash_bounded*1.25", "least_conn"))
        else:
            for f in ("1", "1.25", "1.5", "2"):
                b = f"session_hash_bounded*{f}"
                row(f"bounded {f}: hits / session_hash's",
                    lambda r, b=b: r[b].hit / r["session_hash"].hit, " %", 100)
                row(f"bounded {f}: p50 / session_hash's", _ratio(b, "session_hash", 50))
                row(f"bounded {f}: p99 / least_conn's", _ratio(b, "least_conn"))
                row(f"bounded {f}: every replica at its bound", lambda r, b=b: r[b].all_full,
                    " %", 100)
            row("least_conn / limit p99", _ratio("least_conn", LIMIT))
            for k in s.regime.instances:
                row(f"least_conn x{k} / x1 p99", _ratio(f"least_conn x{k}", "least_conn"))
                row(f"bounded 1.25 x{k} / x1 p99",
                    _ratio(f"session_hash_bounded*1.25 x{k}", "session_hash_bounded*1.25"))
        for e in ("EPP", "EPP + flow control"):
            row(f"{e} / least_conn p99", _ratio(e, "least_conn"))
            row(f"{e} / least_conn p50", _ratio(e, "least_conn", 50))
            row(f"{e} / limit p99", _ratio(e, LIMIT))
    return out


def timeouts(s: Study) -> list[str]:
    """What the read timeout must cover in this regime: the longest wait for a first token
    (a stream's longest silence before its first event) and the slowest generation per output
    token (a non-streamed answer sends nothing until it is done), worst over seeds, at each
    load: over the NGINX targets (what the Ingress path deploys), the endpoint picker's and
    the picker's with flow control (which the Gateway stack does not enable), separately."""
    out = []
    for (wname, load), per_seed in s.runs.items():
        for group, pick in (("NGINX targets", lambda k: not k.startswith("EPP")),
                            ("endpoint picker", lambda k: k == "EPP"),
                            ("endpoint picker with flow control",
                             lambda k: k == "EPP + flow control")):
            runs = [r for cell in per_seed for k, r in cell.items() if pick(k)]
            if not runs:
                continue
            ttft = max(max(r.ttft) for r in runs)
            per_token = max(e / n for r in runs for e, n in zip(r.e2e, r.tokens) if n >= 32)
            out.append(f"{s.regime.name} {wname} {load:.0%}: longest TTFT {ttft:.2f} s, slowest "
                       f"generation {per_token * 1e3:.1f} ms per output token (requests of >= 32 "
                       f"tokens), worst over seeds and the {group}")
    return out


def report(studies: Sequence[Study], seeds: Sequence[int], command: str) -> str:
    lines = ["# Balancing in both regimes (discrete-event model)", "",
             f"`{command}` — modelled, not measured; {len(seeds)} seeds "
             f"({seeds[0]}–{seeds[-1]}) per cell.", "",
             "Every figure: the median over seeds with a 95 % interval of that median (order "
             "statistics), from one seeded trace per seed replayed through every target. "
             "EPP rows are the Gateway API Inference Extension's endpoint picker v1.5.0 as "
             "modelled in bench/dispatch.py; no endpoint picker ran.", ""]
    for s in studies:
        r = s.regime
        caps = ", ".join(f"{k} {v:.2f} req/s" for k, v in s.capacity.items())
        lines += [f"## {r.name}: {r.what}", "",
                  f"- {r.model().describe()}.",
                  f"- Capacity (model, every replica at its full batch): {caps}.",
                  f"- {r.duration:g}-second traces, the first {r.warmup:g} s dropped; "
                  f"{s.seconds:.0f} s of computation.", "", *table(s), "",
                  *(f"- {x}" for x in headline(s)), "", *(f"- {x}" for x in timeouts(s)), ""]
    return "\n".join(lines)


# --- live: does this machine keep a dilated run's timing? -----------------------------------------


def headroom(argv: Sequence[str]) -> int:
    """``python -m bench regime headroom [--profile h200-llama8b] [--max-num-seqs 128]
    [--replicas 2] [--dilations 2,4,8] [--seconds 15]``: local-mode sim replicas of a continuous
    profile at each time dilation D, closed loop at full batch through local mode's nginx (one
    client process, as a benchmark runs), against the model's capacity for the same batch: the
    CPU keeps the timing while live requests/s x D match the model. Run it alone on the machine."""
    import asyncio
    import random

    from bench import capacity as live_capacity
    from bench.ports import free_ports
    from local.cluster import LocalCluster

    ap = argparse.ArgumentParser(prog="python -m bench regime headroom",
                                 description=headroom.__doc__)
    ap.add_argument("--profile", default="h200-llama8b", help="latency profile (default h200-llama8b)")
    ap.add_argument("--max-num-seqs", type=int, default=128,
                    help="the profile's max_num_seqs (default 128, prod's maxConcurrency)")
    ap.add_argument("--replicas", type=int, default=2, help="sim replicas (default 2)")
    ap.add_argument("--dilations", default="2,4,8",
                    help="time dilations to try, comma-separated (default 2,4,8)")
    ap.add_argument("--seconds", type=float, default=15.0,
                    help="measured seconds per dilation (default 15)")
    args = ap.parse_args(argv)
    wl = WORKLOADS["standalone"]
    base = SimModel.named(args.profile, 1.0, args.max_num_seqs)
    want = model_capacity(base, args.replicas, wl, 40.0, 10.0)
    print(f"model: {want:.1f} requests/s at full batch ({base.describe()})", flush=True)
    pool = trace.generate(50, 40, 1001, wl, base.max_model_len).requests
    for d in (float(x) for x in args.dilations.split(",")):
        model = SimModel.named(args.profile, d, args.max_num_seqs)
        port = free_ports(args.replicas + 1, random.Random(f"regime-headroom-{d}"))
        with LocalCluster(args.replicas, port=port + args.replicas, first_replica_port=port,
                          server_env=model.env(),
                          max_output_tokens=model.nginx_output_tokens) as cluster:
            urls = [cluster.endpoint.removesuffix("/v1")] * args.replicas
            cap, tps, errs = asyncio.run(live_capacity.measure(
                urls, cluster.model_name, cluster.api_key, pool, model.slots,
                warmup=max(5.0, 2 * d), duration=args.seconds, salt=f"headroom-{d}"))
        events = tps
        print(f"dilation {d:g}: live {cap * d:.1f} requests/s undilated ({cap:.1f} wall, "
              f"{events:,.0f} SSE events/s), model {want:.1f}: {cap * d / want:.3f}x, "
              f"{errs} errors", flush=True)
    return 0


def beside(argv: Sequence[str]) -> int:
    """``python -m bench regime beside [--capacity 9.74] [--sessions-capacity 9.08] [--seed 1]
    [--load 0.8]``: the endpoint picker's rows for docs/load-balancing.md's measured table, on
    the very trace the full run measured (cpu-sim, 4 replicas, 290 s, the first 30 s dropped,
    the capacities it measured), with the same intervals (moving-block bootstrap over requests,
    paired with the model's limit)."""
    from bench import ci
    from bench.balance_report import _ms, _x

    ap = argparse.ArgumentParser(prog="python -m bench regime beside",
                                 description=beside.__doc__)
    ap.add_argument("--capacity", type=float, default=9.74,
                    help="standalone requests/s the full run measured (default 9.74)")
    ap.add_argument("--sessions-capacity", type=float, default=9.08,
                    help="sessions requests/s the full run measured (default 9.08)")
    ap.add_argument("--seed", type=int, default=1, help="the full run's trace seed (default 1)")
    ap.add_argument("--load", type=float, default=0.8,
                    help="fraction of the capacity (default 0.8)")
    args = ap.parse_args(argv)
    r = REGIMES["cpu"]
    model = r.model()
    chosen = [Target(LIMIT, "fcfs"), Target("least_conn", "least_conn"), Target("EPP", Epp()),
              Target("EPP + flow control", Epp(flow_control=True))]
    ratios = []
    for wname, cap in (("standalone", args.capacity), ("sessions", args.sessions_capacity)):
        tr = trace.generate(cap * args.load, r.duration, args.seed, WORKLOADS[wname],
                            model.max_model_len)
        cells = run_cell(model, r.replicas, tr, r.warmup, 1, chosen)
        lim = cells[LIMIT].ttft
        for label in (LIMIT, "least_conn", "EPP", "EPP + flow control"):
            c = cells[label]
            hit = "—" if c.hit is None else f"{c.hit:.0%}"
            shown_as = "limit: central FCFS" if label == LIMIT else label
            print("| " + " | ".join([
                wname, f"{args.load:.0%}", "—", f"{shown_as} (model)", str(len(c.ttft)), "0",
                _ms(ci.quantile(c.ttft, 50)), _ms(ci.quantile(c.ttft, 99)),
                _x(ci.ratio(c.ttft, lim, 99)), "—", "—", hit, "—"]) + " |")
        lc = cells["least_conn"].ttft
        ratios.append(f"{wname} {args.load:.0%}: / least_conn (model, same trace, paired): "
                      + "; ".join(f"{label} p{q} {_x(ci.ratio(cells[label].ttft, lc, q))}"
                                  for label in ("EPP", "EPP + flow control") for q in (50, 99)))
    for line in ratios:
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["headroom"]:
        return headroom(args_in[1:])
    if args_in[:1] == ["beside"]:
        return beside(args_in[1:])
    ap = argparse.ArgumentParser(prog="python -m bench regime", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regimes", default="cpu,gpu",
                    help=f"comma-separated, of {', '.join(REGIMES)} (default cpu,gpu)")
    ap.add_argument("--seeds", type=int, default=20,
                    help="traces per cell, seeds 1..N (default 20)")
    ap.add_argument("--workloads", default="standalone,sessions",
                    help="comma-separated, of standalone,sessions (default both)")
    ap.add_argument("--duration", type=float, default=None,
                    help="trace seconds per cell, instead of each regime's")
    ap.add_argument("--out", type=Path, default=OUT, help=OUT_HELP)
    args = ap.parse_args(args_in)
    names = [x for x in args.regimes.split(",") if x]
    bad = [x for x in names if x not in REGIMES]
    if bad:
        ap.error(f"--regimes: {', '.join(bad)} not one of {', '.join(REGIMES)}")
    wls = [x for x in args.workloads.split(",") if x]
    if any(w not in WORKLOADS for w in wls):
        ap.error(f"--workloads: one of {', '.join(WORKLOADS)}")
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    seeds = list(range(1, args.seeds + 1))
    studies = []
    for name in names:
        r = REGIMES[name]
        if args.duration is not None:
            from dataclasses import replace
            r = replace(r, duration=args.duration, warmup=min(r.warmup, args.duration / 4))
        studies.append(study(r, seeds, wls, say=lambda m: print(m, flush=True)))
    text = report(studies, seeds, shown("python -m bench regime", args_in))
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / REPORT).write_text(text + "\n")
    print(f"wrote {args.out / REPORT}")
    return 0


if __name__ == "__main__":  # `headroom` starts replicas and nginx: stop them on a signal
    from local.procs import run_command

    raise SystemExit(run_command(main, what="python -m bench regime"))
