"""Benchmark the NGINX balancing policies on one seeded trace: ``python -m bench [--quick]``.

Starts a local cluster (``local.cluster.LocalCluster``: N sim replicas behind a real nginx),
measures its capacity, then for each load (a fraction of that capacity) replays the same
Poisson trace through nginx under every policy (nginx reloaded between runs) and straight to
the replicas (client-side round robin, for the proxy's own overhead). Writes a Markdown table
and a PNG plot to ``--out`` and prints, last, the ratio of round_robin's p99 TTFT to the
default policy's (``LoadBalancingConfig().method``) at 80% load.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from bench import capacity, client, report, trace
from bench.ports import free_ports
from bench.stats import Record, Summary, summarize
from components.balancing import LoadBalancingConfig

POLICIES = ("round_robin", "least_conn", "random_two_least_conn", "session_hash")
DEFAULT_POLICY: str = LoadBalancingConfig().method
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class SimModel:
    """Latency model of every replica (sim engine), chosen so that 4 replicas on 2 shared cores
    are bound by the model, not the CPU: ~40 ms decode steps keep the aggregate SSE rate under
    ~850 events/s at saturation."""

    slots: int = 8
    prefill_base_ms: float = 50
    prefill_ms_per_token: float = 0.25
    decode_base_ms: float = 30
    decode_ms_per_seq: float = 1.0
    prefix_cache_tokens: int = 65_536
    max_tokens: int = 384
    max_model_len: int = 16_384

    def env(self) -> dict[str, str]:
        return {
            "LLM_MAX_CONCURRENCY": str(self.slots), "LLM_MAX_QUEUE": "1024",
            "LLM_MAX_TOKENS": str(self.max_tokens), "LLM_MAX_MODEL_LEN": str(self.max_model_len),
            "LLM_SIM_PREFILL_BASE_MS": str(self.prefill_base_ms),
            "LLM_SIM_PREFILL_MS_PER_TOKEN": str(self.prefill_ms_per_token),
            "LLM_SIM_DECODE_BASE_MS": str(self.decode_base_ms),
            "LLM_SIM_DECODE_MS_PER_SEQ": str(self.decode_ms_per_seq),
            "LLM_SIM_PREFIX_CACHE_TOKENS": str(self.prefix_cache_tokens),
            "LLM_DRAIN_SECONDS": "2", "LLM_LOG_LEVEL": "warning",
        }

    def describe(self) -> str:
        return (f"sim: prefill {self.prefill_base_ms:g} ms + {self.prefill_ms_per_token:g} "
                f"ms/uncached token (cached free), decode step {self.decode_base_ms:g} ms + "
                f"{self.decode_ms_per_seq:g} ms × active; {self.slots} slots/replica, "
                f"prefix cache {self.prefix_cache_tokens} tokens/replica")


def say(msg: str) -> None:
    print(msg, flush=True)


def _scrape(url: str, key: str | None) -> tuple[float, dict | None]:
    """(requests that got a first token so far, prefix-cache counters) of one replica."""
    h = {"Authorization": f"Bearer {key}"} if key else {}
    count = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("llm_time_to_first_token_seconds_count"):
            count = float(line.rsplit(" ", 1)[1])
    card = httpx.get(f"{url}/v1/models", headers=h, timeout=5).json()["data"][0]
    return count, card.get("prefix_cache")


def _wait_idle(urls: Sequence[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = 0.0
        for url in urls:
            for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
                if line.startswith(("llm_requests_running ", "llm_requests_waiting ")):
                    busy += float(line.rsplit(" ", 1)[1])
        if busy == 0:
            return
        time.sleep(0.2)


def run_target(cluster, tr: trace.Trace, target: str, warmup: float, grace: float,
               salt: str) -> tuple[Summary, float, float | None, list[Record]]:
    urls = cluster.replica_urls
    if target == "direct":
        rr = itertools.cycle(urls)
        pick: Callable[[trace.Request], str] = (
            lambda _r: f"{next(rr)}/v1/chat/completions")
    else:
        cluster.reload_nginx(policy=LoadBalancingConfig(method=target))
        pick = lambda _r: f"{cluster.endpoint}/chat/completions"
    _wait_idle(urls)
    before = [_scrape(u, cluster.api_key) for u in urls]
    records = asyncio.run(client.replay(tr.requests, pick, cluster.model_name,
                                        api_key=cluster.api_key, salt=salt, grace=grace))
    after = [_scrape(u, cluster.api_key) for u in urls]
    per_replica = [a[0] - b[0] for a, b in zip(after, before)]
    busiest = max(per_replica) / (sum(per_replica) / len(per_replica)) if sum(per_replica) else 0
    hit = None
    if tr.workload.sessions and all(a[1] for a in after):
        hits = sum(a[1]["hit_tokens"] - b[1]["hit_tokens"] for a, b in zip(after, before))
        looked = sum(a[1]["lookup_tokens"] - b[1]["lookup_tokens"] for a, b in zip(after, before))
        hit = hits / looked if looked else 0.0
    measured = [r for r, q in zip(records, tr.requests) if q.arrival >= warmup]
    return summarize(measured), busiest, hit, records


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["faults"]:  # `python -m bench faults [...]`: the fault drills
        from bench import faults
        return faults.main(args_in[1:])
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--loads", default="0.5,0.8,0.95",
                    help="fractions of measured capacity (comma-separated)")
    ap.add_argument("--duration", type=float, default=30.0, help="trace seconds per run")
    ap.add_argument("--warmup", type=float, default=5.0,
                    help="requests arriving earlier are sent but not counted")
    ap.add_argument("--overhead-load", type=float, default=0.3,
                    help="load of the direct-vs-nginx comparison (0 skips it)")
    ap.add_argument("--sessions-load", type=float, default=0.8,
                    help="load of the multi-turn sessions runs (0 skips them)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--capacity-seconds", type=float, default=12.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true",
                    help="one load (80%%), short runs, shorter outputs, no sessions (< 1 min)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs",
                    help="directory for bench-results.md and bench-ttft.png")
    args = ap.parse_args(argv)

    model = SimModel()
    standalone = trace.Workload()
    sessions = trace.Workload(sessions=True)
    loads = [float(x) for x in args.loads.split(",")]
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        if p not in POLICIES:
            ap.error(f"unknown policy {p!r}; choose from {', '.join(POLICIES)}")
    if args.quick:
        loads, args.duration, args.warmup, args.capacity_seconds = [0.8], 6.0, 1.5, 3.0
        args.overhead_load, args.sessions_load = 0.0, 0.0
        standalone = replace(standalone, output=trace.LogNormal(24, 1.3, 1, 128))
        model = replace(model, max_tokens=128)
        name = "bench-quick"
    else:
        name = "bench"
    grace = model.max_tokens * (model.decode_base_ms + model.decode_ms_per_seq * model.slots) \
        / 1000 * 2 + 10
    rng = random.Random(args.seed)
    base = free_ports(args.replicas + 1, rng)

    from local.cluster import LocalCluster

    t_start = time.monotonic()
    say(f"{model.describe()}; {args.replicas} replicas on {os.cpu_count()} cores")
    rows: list[report.Row] = []
    overhead: list[report.Row] = []
    capacities: dict[str, float] = {}
    with LocalCluster(args.replicas, port=base + args.replicas, first_replica_port=base,
                      server_env=model.env(), max_output_tokens=model.max_tokens,
                      policy=LoadBalancingConfig(method=DEFAULT_POLICY)) as cluster:
        say(f"cluster up: {cluster.endpoint} -> {', '.join(cluster.replica_urls)}")
        run_no = itertools.count()
        workloads = [("standalone", standalone, loads)]
        if args.sessions_load > 0:
            workloads.append(("sessions", sessions, [args.sessions_load]))
        for wname, wl, wloads in workloads:
            pool = trace.generate(50, 40, args.seed + 1000, wl, model.max_model_len).requests
            cap, tps, errs = asyncio.run(capacity.measure(
                cluster.replica_urls, cluster.model_name, cluster.api_key, pool, model.slots,
                warmup=min(5.0, args.capacity_seconds / 2), duration=args.capacity_seconds,
                salt=f"cap-{wname}"))
            capacities[wname] = cap
            say(f"[{wname}] capacity: {cap:.2f} requests/s ({tps:.0f} tokens/s at saturation, "
                f"mean output {sum(r.max_tokens for r in pool) / len(pool):.1f} tokens, "
                f"{errs} errors)")
            # `direct` (the proxy-overhead reference) runs at 80% (or the first load) only.
            ref = 0.8 if 0.8 in wloads else wloads[0]
            plan = [(ld, t, args.duration) for ld in wloads
                    for t in policies + (["direct"] if ld == ref else [])]
            if wname == "standalone" and args.overhead_load > 0:
                short = min(args.duration, 20.0)
                plan = [(args.overhead_load, "direct", short),
                        (args.overhead_load, "round_robin", short)] + plan
            for load, target, duration in plan:
                tr = trace.generate(cap * load, duration, args.seed, wl, model.max_model_len)
                t0 = time.monotonic()
                summary, busiest, hit, _ = run_target(cluster, tr, target, args.warmup, grace,
                                                      salt=f"run{next(run_no)}")
                row = report.Row(wname, load, target, summary, busiest, hit)
                is_overhead = wname == "standalone" and load == args.overhead_load \
                    and load not in wloads
                (overhead if is_overhead else rows).append(row)
                s = summary
                say(f"[{wname} {load:.0%} {target}] {s.requests} req, {s.errors} err, TTFT p50 "
                    f"{s.ttft_p50 * 1e3:.0f} ms p99 {s.ttft_p99 * 1e3:.0f} ms, ITL p50 "
                    f"{s.itl_p50 * 1e3:.0f} ms, busiest {busiest:.2f}x"
                    + (f", cache hit {hit:.0%}" if hit is not None else "")
                    + f", send lag max {s.send_lag_max * 1e3:.0f} ms "
                      f"({time.monotonic() - t0:.0f} s)")
    elapsed = time.monotonic() - t_start

    args.out.mkdir(parents=True, exist_ok=True)
    std_rows = [r for r in rows if r.workload == "standalone"]
    png = args.out / f"{name}-ttft.png"
    report.plot(std_rows, png, f"{args.replicas} sim replicas behind nginx: TTFT vs load "
                               f"(seed {args.seed}, {args.duration:g} s per run)")
    table = report.markdown_table(rows)
    command = " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])])
    measured = ", ".join(f"{k} {v:.2f} req/s" for k, v in capacities.items())
    lines = [f"# Balancing benchmark results ({'quick' if args.quick else 'full'})", "",
             f"`{command}` — {elapsed:.0f} s on {os.cpu_count()} cores.", "",
             f"- {model.describe()}.",
             f"- Measured capacity: {measured}.",
             f"- Default policy (`LoadBalancingConfig().method`): `{DEFAULT_POLICY}`.", "",
             table, ""]
    if overhead:
        lines += [(f"Proxy overhead at {args.overhead_load:.0%} load (same trace, client-side "
                   "round robin vs nginx round_robin):"), "",
                  report.markdown_table(overhead), ""]
    lines.append(f"![TTFT per policy against load]({png.name})")
    (args.out / f"{name}-results.md").write_text("\n".join(lines) + "\n")
    say("")
    say(table)
    if overhead:
        d = {r.target: r.summary for r in overhead}
        diff = (d["round_robin"].ttft_p50 - d["direct"].ttft_p50) * 1e3
        say(f"proxy overhead at {args.overhead_load:.0%} load: p50 TTFT direct "
            f"{d['direct'].ttft_p50 * 1e3:.1f} ms, through nginx (round_robin) "
            f"{d['round_robin'].ttft_p50 * 1e3:.1f} ms: {diff:+.1f} ms")
    at80 = {r.target: r.summary for r in std_rows if abs(r.load - 0.8) < 1e-9}
    if "direct" in at80 and "round_robin" in at80 and not overhead:
        diff = (at80["round_robin"].ttft_p50 - at80["direct"].ttft_p50) * 1e3
        say(f"proxy overhead at 80% load: p50 TTFT nginx round_robin - direct: {diff:+.1f} ms")
    say(f"wrote {args.out / (name + '-results.md')} and {png} in {elapsed:.0f} s")
    if "round_robin" in at80 and DEFAULT_POLICY in at80:
        best = min((s.ttft_p99, t) for t, s in at80.items() if t != "direct")
        say(f"best p99 TTFT at 80% load: {best[1]} {best[0] * 1e3:.0f} ms")
        ratio = at80["round_robin"].ttft_p99 / at80[DEFAULT_POLICY].ttft_p99
        say(f"round_robin p99 TTFT / {DEFAULT_POLICY} p99 TTFT at 80% load: {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
