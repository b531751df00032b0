"""The balancing benchmark behind ``python -m bench``: every method on the same seeded traces,
through 1..K NGINX instances, with 95 % intervals and the distance to the limit.

A cell is (workload, load, NGINX instances, target). For each workload the capacity of the
replicas is measured first (closed loop, see bench/capacity.py); a cell replays one Poisson
trace at a fraction of it, open loop, through K fresh nginx processes (bench/ingress_pool.py;
the client spreads requests over them at random), or straight to the replicas (``direct``,
client-side round robin: the proxy's own cost). Requests arriving during the warm-up are sent
but not counted. Every interval is a paired moving-block bootstrap over the measured requests
(bench/ci.py): cells of one workload and load replay the same trace, so request i is the same
request in every cell. With several seeds (``--seeds 1,2,3``) every cell is run once per seed's
trace and the runs are pooled (``pooled``): one cell per (workload, load, NGINX, target) whose
requests are the seeds' in order, and whose ``strata`` keep the bootstrap's blocks inside each
seed's run.

The limit: the same trace through a discrete-event model of the sim engine with one central
FCFS queue over all slots (bench/des.py). The model also replays round robin and least_conn
(sessions with their prefix caches); the check reports whether those fall inside the live
intervals.

Targets: a method name, optionally ``@body`` (session key from the body, no header used) and
``*F`` (session_hash_bounded's boundFactor), e.g. ``session_hash_bounded@body*1.5``.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench import capacity, ci, client, des, trace
from bench.simmodel import SimModel
from bench.stats import Record, Summary, summarize
from components.policies.balancing import LoadBalancingConfig

METHODS = ("round_robin", "least_conn", "random_two_least_conn", "session_hash",
           "session_hash_bounded")
DEFAULT_METHOD: str = LoadBalancingConfig().method
LIMIT_DISPATCHER = "fcfs"


def say(msg: str) -> None:
    print(msg, flush=True)


def parse_target(target: str) -> LoadBalancingConfig | None:
    """The policy a target names; None for ``direct``. Raises ValueError naming the target."""
    if target == "direct":
        return None
    spec, _, factor = target.partition("*")
    method, _, key = spec.partition("@")
    if method not in METHODS:
        raise ValueError(f"target {target!r}: method must be one of {', '.join(METHODS)}")
    values: dict[str, object] = {"method": method}
    if key:
        if key != "body" or not method.startswith("session_hash"):
            raise ValueError(f"target {target!r}: only session methods take '@body'")
        values["sessionKey"] = "body"
    if factor:
        if method != "session_hash_bounded":
            raise ValueError(f"target {target!r}: only session_hash_bounded takes '*factor'")
        try:
            values["boundFactor"] = float(factor)
        except ValueError:
            raise ValueError(f"target {target!r}: '*{factor}' is not a number") from None
    return LoadBalancingConfig.model_validate(values)


@dataclass
class Cell:
    workload: str
    load: float
    pods: int
    target: str
    summary: Summary
    ttft: list[float | None]
    """TTFT of every measured request in arrival order; None where it failed."""
    busiest: float
    """Requests of the busiest replica / the mean per replica."""
    hit: float | None = None
    """Prompt tokens found in the replicas' prefix caches / prompt tokens looked up."""
    spilled: int = 0
    """Requests that found every replica at its bound (nginx's "no live upstreams")."""
    seconds: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    """The measured requests, as the client saw them."""
    strata: tuple[int, ...] = ()
    """Requests per pooled seed, in order (empty: one seed)."""

    @property
    def key(self) -> tuple[str, float, int, str]:
        return self.workload, round(self.load, 6), self.pods, self.target

    def quantile(self, q: float) -> ci.Interval:
        return ci.quantile(self.ttft, q, strata=self.strata)


def pooled(runs: Sequence[Sequence[Cell]]) -> list[Cell]:
    """One cell per (workload, load, NGINX, target) of several seeds' runs of the same plan:
    requests concatenated seed by seed, counts summed, ``strata`` the per-seed request counts."""
    if len(runs) == 1:
        return list(runs[0])
    by_key = [{c.key: c for c in run} for run in runs]
    out = []
    for first in runs[0]:
        group = [run[first.key] for run in by_key]
        records = [r for c in group for r in c.records]
        n = [len(c.ttft) for c in group]
        hits = [c.hit for c in group]
        hit = None if any(h is None for h in hits) else \
            sum(h * k for h, k in zip(hits, n)) / sum(n)  # type: ignore[operator]
        out.append(Cell(first.workload, first.load, first.pods, first.target,
                        summarize(records), [t for c in group for t in c.ttft],
                        max(c.busiest for c in group), hit, sum(c.spilled for c in group),
                        sum(c.seconds for c in group), records=records, strata=tuple(n)))
    return out


def pooled_models(runs: Sequence[dict]) -> dict:
    """The model rows of several seeds, concatenated like ``pooled`` does the cells; the
    per-seed lengths go under ``"strata"``."""
    out: dict = {"capacity": runs[0]["capacity"], "strata": {}}
    for key in runs[0]:
        if not isinstance(key, tuple):
            continue
        out[key] = {d: [t for run in runs for t in run[key][d]] for d in runs[0][key]}
        if len(runs) > 1:
            out["strata"][key] = tuple(len(run[key][LIMIT_DISPATCHER]) for run in runs)
    return out


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


def run_cell(cluster, pool, tr: trace.Trace, wname: str, load: float, target: str,
             warmup: float, grace: float, salt: str, seed: int) -> Cell:
    urls = cluster.replica_urls
    policy = parse_target(target)
    if policy is None:
        rr = itertools.cycle(urls)
        pick: Callable[[trace.Request], str] = lambda _r: f"{next(rr)}/v1/chat/completions"
    else:
        pool.start(policy)
        pick = pool.picker(seed)
    _wait_idle(urls)
    spilled_before = pool.spill_count() if policy is not None else 0
    before = [_scrape(u, cluster.api_key) for u in urls]
    t0 = time.monotonic()
    records = asyncio.run(client.replay(tr.requests, pick, cluster.model_name,
                                        api_key=cluster.api_key, salt=salt, grace=grace))
    seconds = time.monotonic() - t0
    after = [_scrape(u, cluster.api_key) for u in urls]
    per_replica = [a[0] - b[0] for a, b in zip(after, before)]
    busiest = max(per_replica) / (sum(per_replica) / len(per_replica)) if sum(per_replica) else 0
    hit = None
    if tr.workload.sessions and all(a[1] for a in after):
        hits = sum(a[1]["hit_tokens"] - b[1]["hit_tokens"] for a, b in zip(after, before))
        looked = sum(a[1]["lookup_tokens"] - b[1]["lookup_tokens"] for a, b in zip(after, before))
        hit = hits / looked if looked else 0.0
    spilled = pool.spill_count() - spilled_before if policy is not None else 0
    measured = [r for r, q in zip(records, tr.requests) if q.arrival >= warmup]
    return Cell(wname, load, pool.instances if policy is not None else 0, target,
                summarize(measured), [_ttft(r) for r in measured], busiest, hit, spilled,
                seconds, records=measured)


def _ttft(r: Record) -> float | None:
    return r.ttft if r.ok else None


def model_cells(tr: trace.Trace, model: SimModel, replicas: int, warmup: float, wname: str,
                load: float) -> dict[str, list[float | None]]:
    """Per-request TTFT of the measured requests under each DES dispatcher. Sessions replay
    with their prompts' block keys, so the modelled replicas' prefix caches hit as the live
    ones do (bench/regime.py: jobs_of)."""
    if tr.workload.sessions:
        from bench.regime import jobs_of

        jobs = jobs_of(tr, model.prefix_block_tokens)
    else:
        jobs = [des.Job(r.arrival, r.prompt_tokens, r.max_tokens) for r in tr.requests]
    params = model.des_params(replicas)
    out = {}
    for d in des.DISPATCHERS:
        res = des.simulate(jobs, params, d, seed=1)
        out[d] = [t for t, q in zip(res.ttft, tr.requests) if q.arrival >= warmup]
    return out


@dataclass(frozen=True)
class Plan:
    """What one run measures; the defaults are the full run."""

    loads: tuple[float, ...] = (0.8,)
    standalone: tuple[str, ...] = ("round_robin", "least_conn", "random_two_least_conn",
                                   "session_hash_bounded")
    sessions: tuple[str, ...] = ("least_conn", "session_hash", "session_hash_bounded",
                                 "session_hash_bounded@body")
    sessions_load: float = 0.8
    pods: tuple[int, ...] = (1, 2, 4)
    pods_targets: tuple[str, ...] = ("least_conn", "random_two_least_conn",
                                     "session_hash_bounded")
    duration: float = 290.0
    """Trace seconds per cell: ~2,000 measured requests at 80 % of 9.7 requests/s."""
    warmup: float = 30.0
    overhead_load: float = 0.3
    overload: float = 1.2
    """session_hash_bounded above capacity: every replica at its bound, nothing may be lost."""
    overload_duration: float = 40.0

    def cells(self, wname: str) -> list[tuple[float, int, str, float]]:
        """(load, NGINX instances, target, trace seconds) in run order."""
        if wname == "sessions":
            return [(self.sessions_load, 1, t, self.duration) for t in self.sessions]
        out: list[tuple[float, int, str, float]] = []
        if self.overhead_load > 0:
            short = min(self.duration, 30.0)
            out += [(self.overhead_load, 0, "direct", short),
                    (self.overhead_load, 1, "round_robin", short)]
        for load in self.loads:
            out += [(load, 1, t, self.duration) for t in self.standalone]
            if abs(load - 0.8) < 1e-9:
                out += [(load, k, t, self.duration) for k in self.pods if k > 1
                        for t in self.pods_targets]
        if self.overload > 0:
            out.append((self.overload, 1, "session_hash_bounded", self.overload_duration))
        return out


QUICK = Plan(loads=(0.8,), standalone=("round_robin", "least_conn", "session_hash_bounded"),
             sessions=("least_conn", "session_hash", "session_hash_bounded"), pods=(1,),
             duration=14.0, warmup=3.0, overhead_load=0.0, overload=0.0)


def measure(plan: Plan, replicas: int, model: SimModel, workloads: dict[str, trace.Workload],
            seeds: Sequence[int], capacity_seconds: float,
            base_port: int) -> tuple[list[Cell], dict]:
    """Run every cell of ``plan`` on each seed's trace; return the cells and the model rows per
    (workload, load), pooled over the seeds."""
    seed = seeds[0]
    from bench.ingress_pool import NginxPool
    from local.cluster import LocalCluster

    grace = model.max_tokens * model.full_step_seconds() * 2 + 10
    runs: dict[int, list[Cell]] = {sd: [] for sd in seeds}
    models: dict[int, dict] = {sd: {"capacity": {}} for sd in seeds}
    pools: dict[int, NginxPool] = {}
    say(f"{model.describe()}; {replicas} replicas on {os.cpu_count()} cores")
    with LocalCluster(replicas, port=base_port + replicas, first_replica_port=base_port,
                      server_env=model.env(),
                      max_output_tokens=model.nginx_output_tokens) as cluster:
        upstreams = [u.removeprefix("http://") for u in cluster.replica_urls]
        admission = replicas * (model.slots + int(model.env()["LLM_MAX_QUEUE"]))
        next_port = base_port + replicas + 1
        try:
            for k in sorted({1, *plan.pods}):
                pools[k] = NginxPool(upstreams, k, next_port,
                                     max_output_tokens=model.nginx_output_tokens,
                                     replica_slots=model.slots, admission_limit=admission)
                next_port += k
            run_no = itertools.count()
            for wname, wl in workloads.items():
                pool = trace.generate(50, 40, seed + 1000, wl, model.max_model_len).requests
                cap, tps, errs = asyncio.run(capacity.measure(
                    cluster.replica_urls, cluster.model_name, cluster.api_key, pool, model.slots,
                    warmup=min(5.0, capacity_seconds / 2), duration=capacity_seconds,
                    salt=f"cap-{wname}"))
                for sd in seeds:
                    models[sd]["capacity"][wname] = cap
                say(f"[{wname}] capacity {cap:.2f} requests/s ({tps:.0f} tokens/s, {errs} errors)")
                for sd, (load, pods, target, duration) in itertools.product(seeds,
                                                                            plan.cells(wname)):
                    tr = trace.generate(cap * load, duration, sd, wl, model.max_model_len)
                    warm = min(plan.warmup, duration / 4)
                    modelled = models[sd]
                    if (wname, load) not in modelled:
                        modelled[(wname, load)] = model_cells(tr, model, replicas, warm, wname,
                                                              load)
                    cell = run_cell(cluster, pools.get(pods, pools[1]), tr, wname, load, target,
                                    warm, grace, salt=f"run{next(run_no)}", seed=sd)
                    runs[sd].append(cell)
                    s = cell.summary
                    tag = f"seed {sd} " if len(seeds) > 1 else ""
                    say(f"[{tag}{wname} {load:.0%} x{pods} {target}] {s.requests} req, {s.errors} err, "
                        f"TTFT p50 {s.ttft_p50 * 1e3:.0f} ms p99 {s.ttft_p99 * 1e3:.0f} ms, "
                        f"busiest {cell.busiest:.2f}x"
                        + (f", cache hit {cell.hit:.0%}" if cell.hit is not None else "")
                        + (f", spilled {cell.spilled}" if cell.spilled else "")
                        + f" ({cell.seconds:.0f} s)")
        finally:
            for p in pools.values():
                p.close()
    return pooled([runs[sd] for sd in seeds]), pooled_models([models[sd] for sd in seeds])


def cell(cells: Sequence[Cell], workload: str, load: float, pods: int,
         target: str) -> Cell | None:
    for c in cells:
        if (c.workload, c.pods, c.target) == (workload, pods, target) \
                and math.isclose(c.load, load):
            return c
    return None


def free_base_port(n: int, seed: int) -> int:
    from bench.ports import free_ports

    return free_ports(n, random.Random(seed))


def out_paths(out: Path, quick: bool) -> tuple[Path, Path]:
    name = "bench-quick" if quick else "bench"
    return out / f"{name}-results.md", out / f"{name}-ttft.png"
