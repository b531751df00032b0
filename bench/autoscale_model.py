"""Autoscaling settings compared in the discrete-event model: ``python -m bench autoscale-model``.

The live benchmark (``python -m bench autoscale``) cannot run the GPU regime at its own pace on
a few CPU cores; the discrete-event autoscaling model (bench/des_autoscale.py, validated against
live runs by ``python -m bench autoscale-validate``) can, on the trace clock itself: no time
compression, no dilation. For every setting and seed it replays the benchmark's trace
(bench/autoscale_trace.py, seeded) through replicas of the profile behind least_conn, scaled by
the stack's policy with the setting's values, and reports per setting, over seeds:

* the share of requests whose first token came within ``--ttft`` (the SLO share), and the
  share that also got every later token at ``--tpot`` or better on average;
* p99 of the per-request mean time per output token;
* replica-seconds (loading, serving, draining) as a share of static ``--max`` replicas;
* seconds from the surge's start to the first added replica serving (scale-up lag).

Every figure is a mean over seeds with a 95 % t-interval; ``vs`` columns are the paired
difference (the same traces) against the first autoscaled setting, with its interval.

The offered load is in multiples of ONE reference capacity (``--reference-seqs``: one replica's
saturated throughput at that ``max_num_seqs``, from the model), whatever ``max_num_seqs`` a
setting runs, so settings with more sequences per replica carry the same traffic on fewer
replicas.

Settings: ``M:W:R[:A]`` (maxConcurrency = max_num_seqs, targetWaitingPerReplica,
targetRunningPerReplica, runningAverageSeconds, default 60) or ``M:static:N``. Results are kept
per run in ``--cache`` (JSON), so an interrupted study resumes and ``--limit`` runs a few at a
time; ``--shard K/N`` takes every N-th run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from bench import des, des_autoscale, trace
from bench.autoscale_trace import SHAPES, build
from bench.command import shown
from bench.simmodel import SimModel
from components.engines import PROFILES
from components.policies.scaling import AutoscalingConfig, ScalingPolicy

TTFT_OBJECTIVE_S = 2.0
"""The stack's TTFT objective: Pulumi.prod.yaml's monitoring.slo.ttftP99Seconds."""
TPOT_OBJECTIVE_S = 0.1
"""Seconds per output token: Pulumi.prod.yaml's loadBalancing.perTokenSeconds, the generation
budget its timeouts allow per token."""
MODEL_VERSION = 2
"""Part of every cached run's key: raise it when the model changes what a run gives."""
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26,
       10: 2.23, 11: 2.20, 12: 2.18, 14: 2.14, 19: 2.09}
"""Student's t, two-sided 95 %, by degrees of freedom."""


@dataclass(frozen=True)
class Choice:
    max_num_seqs: int
    waiting: int = 1
    running: int = 0
    average_s: float = 60.0
    static: int = 0
    """Static runs: this many replicas throughout (no autoscaling)."""

    @property
    def name(self) -> str:
        if self.static:
            return f"M{self.max_num_seqs} static {self.static}"
        avg = f", avg {self.average_s:g} s" if self.average_s != 60 else ""
        return f"M{self.max_num_seqs} waiting {self.waiting}, running {self.running}{avg}"

    @classmethod
    def parse(cls, text: str) -> Choice:
        try:
            parts = text.split(":")
            m = int(parts[0])
            if parts[1] == "static" and len(parts) == 3:
                n = int(parts[2])
                if m < 1 or n < 1:
                    raise ValueError
                return cls(m, static=n)
            if not 3 <= len(parts) <= 4:
                raise ValueError
            w, r = int(parts[1]), int(parts[2])
            a = float(parts[3]) if len(parts) == 4 else 60.0
            if m < 1 or w < 1 or r < 1 or a < 0:
                raise ValueError
            return cls(m, w, r, a)
        except (ValueError, IndexError):
            raise argparse.ArgumentTypeError(
                f"a setting is M:WAITING:RUNNING[:AVERAGE_S] or M:static:N (positive integers; "
                f"M is max_num_seqs), e.g. 128:1:96; got {text!r}") from None


def model_with_seqs(profile: str, max_num_seqs: int) -> SimModel:
    """The profile with `max_num_seqs`; a slots profile (the CPU regime) keeps its slot count,
    which `max_num_seqs` must then name."""
    model = SimModel.named(profile)
    prof = model.profile
    if prof.kind != "continuous":
        if max_num_seqs != model.slots:
            raise ValueError(f"profile {prof.name} has {model.slots} slots: its settings' M "
                             f"(and --reference-seqs) must be {model.slots}, not {max_num_seqs}")
        return model
    sched = prof.scheduler.model_copy(update={"max_num_seqs": max_num_seqs})
    return SimModel(prof.model_copy(update={"scheduler": sched}))


def capacity(model: SimModel, seed: int = 1000) -> float:
    """One replica's saturated throughput (requests/s) on the standalone workload: a backlog of
    many requests served with every sequence slot busy, timed between its 20th and 80th
    percentile of completions (the steady middle)."""
    n = max(20 * model.slots, 4000)
    reqs = trace.generate(1000.0, n / 1000.0, seed, trace.Workload(), model.max_model_len).requests
    jobs = [des.Job(0.0, r.prompt_tokens, r.max_tokens) for r in reqs]
    done = sorted(des.simulate(jobs, model.des_params(1), "fcfs").e2e)
    lo, hi = done[int(0.2 * len(done))], done[int(0.8 * len(done))]
    return (int(0.8 * len(done)) - int(0.2 * len(done))) / (hi - lo)


@lru_cache(maxsize=4)
def jobs_of(shape: str, cap: float, seed: int) -> tuple[tuple[des.Job, ...], float]:
    tr = build(SHAPES[shape], 1.0, cap, seed, texts=False)
    return (tuple(des.Job(r.arrival, r.prompt_tokens, r.max_tokens) for r in tr.requests),
            tr.wall_seconds)


def policy_of(choice: Choice, engine: str, min_replicas: int, max_replicas: int, window_s: float
              ) -> ScalingPolicy:
    """The stack's policy: its defaults, but the choice's targets and the given bounds."""
    prof = PROFILES[engine]
    cfg = AutoscalingConfig(enabled=True, min_replicas=min_replicas, max_replicas=max_replicas,
                            target_waiting_per_replica=choice.waiting,
                            target_running_per_replica=choice.running,
                            running_average_seconds=int(choice.average_s))
    return ScalingPolicy.from_config(cfg, waiting_metric=prof.waiting_metric,
                                     running_metric=prof.running_metric, namespace="model",
                                     scale_down_window_seconds=window_s)


def run_one(profile: str, shape: str, choice: Choice, seed: int, cap: float, load_s: float,
            min_replicas: int, max_replicas: int, window_s: float, ttft_s: float,
            tpot_s: float) -> dict[str, float | int | None]:
    jobs, end = jobs_of(shape, cap, seed)
    model = model_with_seqs(profile, choice.max_num_seqs)
    rng = random.Random(f"phases-{seed}")  # the HPA's and Prometheus's clocks, per seed
    timing = des_autoscale.Timing(load_s=load_s, poll_phase=rng.random(),
                                  scrape_phase=rng.random())
    # The gauges' names: vLLM's for the GPU regime, the server's for its slots engine.
    engine = "vllm" if model.profile.kind == "continuous" else "server"
    if choice.static:
        out = des_autoscale.simulate(jobs, model.des_params(1), None, timing,
                                     initial=choice.static, end=end, seed=seed)
    else:
        out = des_autoscale.simulate(
            jobs, model.des_params(1), policy_of(choice, engine, min_replicas, max_replicas,
                                                 window_s), timing, end=end, seed=seed)
    surge = SHAPES[shape].starts()[1]
    tpot = sorted(out.tpot())
    return {
        "requests": len(jobs), "lost": out.lost,
        "slo": out.slo_share(ttft_s), "slo_tpot": out.share_within(ttft_s, tpot_s),
        "tpot_p99": tpot[min(len(tpot) - 1, int(0.99 * len(tpot)))] if tpot else math.nan,
        "replica_s": out.replica_seconds(), "static_max_s": max_replicas * end,
        "lag_s": out.scaler.first_added_serving(surge),
        "max_replicas": out.scaler.max_replicas_seen(),
        "scale_events": sum(1 for _, k, _ in out.scaler.events if k in ("added", "retired")),
    }


def run_file(cache: Path, common: dict, choice: Choice, seed: int) -> Path:
    """Where one run's result is kept: named by a hash of everything that decides it."""
    key = json.dumps({**common, **asdict(choice), "seed": seed}, sort_keys=True)
    return cache / f"run-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval (0 for one value)."""
    if len(xs) < 2:
        return (xs[0] if xs else math.nan), 0.0
    return statistics.fmean(xs), T95.get(len(xs) - 1, 2.0) * statistics.stdev(xs) / math.sqrt(len(xs))


def _pm(xs: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m, h = mean_ci([x * scale for x in xs])
    return f"{m:.{digits}f} ± {h:.{digits}f}"


def table(results: dict[Choice, list[dict]], baseline: Choice | None) -> str:
    head = ["setting", "seeds", "TTFT ≤ objective, %", "vs first, points",
            "and TPOT ≤ objective, %", "TPOT p99, ms", "replica-s, % of static max",
            "vs first, points", "surge → added serving, s", "max replicas"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = results.get(baseline) if baseline is not None else None
    for choice, rows in results.items():
        seeds = [r["seed"] for r in rows]
        cost = [r["replica_s"] / r["static_max_s"] for r in rows]
        vs_slo = vs_cost = "—"
        if base is not None and choice != baseline:
            by_seed = {r["seed"]: r for r in base}
            pairs = [(r, by_seed[r["seed"]]) for r in rows if r["seed"] in by_seed]
            if pairs:
                vs_slo = _pm([a["slo"] - b["slo"] for a, b in pairs])
                vs_cost = _pm([a["replica_s"] / a["static_max_s"] - b["replica_s"]
                               / b["static_max_s"] for a, b in pairs])
        lags = [r["lag_s"] for r in rows if r["lag_s"] is not None]
        lines.append("| " + " | ".join([
            choice.name, str(len(seeds)), _pm([r["slo"] for r in rows]), vs_slo,
            _pm([r["slo_tpot"] for r in rows]), _pm([r["tpot_p99"] for r in rows], 1000, 0),
            _pm(cost), vs_cost, _pm(lags, 1.0, 0) if lags else "—",
            f"{min(r['max_replicas'] for r in rows)}–{max(r['max_replicas'] for r in rows)}",
        ]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench autoscale-model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="+", type=Choice.parse,
                    help="M:WAITING:RUNNING[:AVERAGE_S] or M:static:N (M: maxConcurrency)")
    ap.add_argument("--profile", default="h200-llama8b",
                    help="latency profile of the replicas (default h200-llama8b: the GPU regime)")
    ap.add_argument("--trace", choices=sorted(SHAPES), default="surge",
                    help="trace shape (bench/autoscale_trace.py)")
    ap.add_argument("--seeds", default="1,2,3,4,5", help="trace seeds, comma-separated")
    ap.add_argument("--load", type=float, default=120.0, help="model load time, seconds")
    ap.add_argument("--min", dest="min_replicas", type=int, default=1, help="minReplicas")
    ap.add_argument("--max", dest="max_replicas", type=int, default=4, help="maxReplicas")
    ap.add_argument("--window", type=float, default=300.0,
                    help="scale-down stabilization window, seconds")
    ap.add_argument("--reference-seqs", type=int, default=None,
                    help="max_num_seqs whose one-replica capacity the trace's load is relative "
                         "to (default: 128, or a slots profile's slot count)")
    ap.add_argument("--ttft", type=float, default=TTFT_OBJECTIVE_S,
                    help="TTFT objective, seconds")
    ap.add_argument("--tpot", type=float, default=TPOT_OBJECTIVE_S,
                    help="objective for the mean seconds per output token after the first")
    ap.add_argument("--cache", type=Path, default=Path("build") / "autoscale-model",
                    help="folder of cached runs (default build/autoscale-model)")
    ap.add_argument("--limit", type=int, default=None, help="run at most this many, then stop")
    ap.add_argument("--shard", default="1/1", help="K/N: only every N-th missing run, from K")
    ap.add_argument("--report-only", action="store_true", help="print what the cache holds")
    ap.add_argument("--out", type=Path, default=None,
                    help="also write the table, with the command, to this Markdown file")
    args = ap.parse_args(argv)
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x]
        k, n = (int(x) for x in args.shard.split("/"))
        if not 1 <= k <= n or not seeds:
            raise ValueError
    except ValueError:
        ap.error("--seeds: comma-separated integers; --shard: K/N with 1 <= K <= N")
    command = shown("python -m bench autoscale-model", sys.argv[1:] if argv is None else argv)
    try:
        if args.reference_seqs is None:
            ref = SimModel.named(args.profile)
            args.reference_seqs = 128 if ref.profile.kind == "continuous" else ref.slots
        for m in {args.reference_seqs, *(c.max_num_seqs for c in args.settings)}:
            model_with_seqs(args.profile, m)
    except (KeyError, ValueError) as exc:
        ap.error(str(exc))
    args.cache.mkdir(parents=True, exist_ok=True)
    ref_key = f"capacity-{args.profile}-M{args.reference_seqs}.json"
    ref_file = args.cache / ref_key
    if ref_file.exists():
        cap = json.loads(ref_file.read_text())["capacity"]
    else:
        cap = capacity(model_with_seqs(args.profile, args.reference_seqs))
        ref_file.write_text(json.dumps({"capacity": cap}))
    print(f"{command}\nreference: one replica of {args.profile} at max_num_seqs "
          f"{args.reference_seqs} serves {cap:.2f} requests/s (model); load {args.load:g} s, "
          f"replicas {args.min_replicas}-{args.max_replicas}, window {args.window:g} s, "
          f"trace {args.trace}", flush=True)
    common = dict(version=MODEL_VERSION, profile=args.profile, shape=args.trace,
                  cap=round(cap, 6), load=args.load, min=args.min_replicas,
                  max=args.max_replicas, window=args.window, ttft=args.ttft, tpot=args.tpot)
    todo, results = [], {}
    for choice in args.settings:
        results[choice] = []
        for seed in seeds:
            path = run_file(args.cache, common, choice, seed)
            if path.exists():
                results[choice].append(json.loads(path.read_text()))
            else:
                todo.append((choice, seed, path))
    mine = todo[k - 1::n][:args.limit] if not args.report_only else []
    for i, (choice, seed, path) in enumerate(mine, 1):
        started = time.monotonic()
        row = run_one(args.profile, args.trace, choice, seed, cap, args.load, args.min_replicas,
                      args.max_replicas, args.window, args.ttft, args.tpot)
        row |= {"seed": seed, "setting": choice.name, "wall_s": time.monotonic() - started}
        path.write_text(json.dumps(row))
        results[choice].append(row)
        print(f"[{i}/{len(mine)}] {choice.name} seed {seed}: {row['slo'] * 100:.1f}% within "
              f"{args.ttft:g} s, {row['replica_s'] / row['static_max_s'] * 100:.1f}% of static "
              f"max, lag {row['lag_s']}, {row['wall_s']:.0f} s", flush=True)
    left = len(todo) - len(mine)
    done = {c: sorted(rows, key=lambda r: r["seed"]) for c, rows in results.items() if rows}
    autoscaled = [c for c in done if not c.static]
    text = table(done, autoscaled[0] if autoscaled else None)
    print(text)
    if left:
        print(f"{left} run(s) not done yet" + (f"; {args.out} not written" if args.out else ""))
    elif args.out is not None:
        walls = [r["wall_s"] for rows in done.values() for r in rows]
        engine = ("vLLM 0.33.0's scheduler over the profile's step model"
                  if SimModel.named(args.profile).profile.kind == "continuous"
                  else "the sim engine's slots")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join([
            f"`{command}`", "",
            f"- Modelled (bench/des_autoscale.py), not measured: {args.profile} replicas "
            f"({engine}) behind least_conn, the "
            f"{args.trace} trace at multiples of one replica's capacity at max_num_seqs (slots) "
            f"{args.reference_seqs} ({cap:.2f} requests/s), model load {args.load:g} s, replicas "
            f"{args.min_replicas}-{args.max_replicas}, scale-down window {args.window:g} s, other "
            f"policy values the stack's defaults.",
            f"- Objectives: TTFT ≤ {args.ttft:g} s; TPOT (mean seconds per output token after the "
            f"first) ≤ {args.tpot:g} s.",
            "- Each figure: mean over seeds ± the half-width of its 95 % t-interval; `vs first`: "
            "the paired difference from the first autoscaled row over the same seeds.",
            f"- {len(walls)} runs, {sum(walls) / 60:.0f} CPU minutes.", "", text, ""]))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
