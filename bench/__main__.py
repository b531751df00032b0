"""Benchmark the NGINX balancing methods: ``python -m bench [--quick]`` (see bench/balance.py).

Starts N sim replicas (``local.cluster.LocalCluster``), measures their capacity, then replays
the same seeded Poisson trace per workload and load through 1..K fresh NGINX instances under
every method, and straight to the replicas (``direct``: the proxy's own cost). Every p50/p99
and every ratio carries a 95 %% interval (paired moving-block bootstrap over requests), and the
limit row comes from a discrete-event model of the sim engine with one central FCFS queue.
Writes a Markdown table and a PNG plot to ``--out`` (default build/bench/); prints the
affinity line, the round_robin/default ratio with its interval, and a one-sentence conclusion.

Full run (defaults): about %(minutes)s minutes on 2 cores. ``--quick``: under 3 minutes, a smoke
test (short cells, wide intervals): the full run's figures are in docs/load-balancing.md.

Performance figures are reported against *targets* ("target <= 1.25x: reached / not
reached") and do not change the exit code; a correctness *bar* (no request lost in the
overload cell) that fails exits 1. Bad input or a failed start exits 2; a run stopped by
signal N exits 128 + N after stopping everything it started.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench import balance, balance_report, trace
from bench.command import OUT, shown
from bench.simmodel import DEFAULT_PROFILE, SimModel
from local.procs import run_command

__all__ = ["SimModel", "main"]

FULL_MINUTES = 75
SUBCOMMANDS = {
    "autoscale": "autoscaling against static replica counts on a surge and a ramp "
                 "(docs/autoscaling.md)",
    "faults": "fault drills: rolling restart, crash, overload, reload, disconnects, flood "
              "(docs/reliability.md)",
    "calibrate": "fit a latency profile to any OpenAI-compatible endpoint",
    "profile": "check or compare latency profiles",
    "plan": "a capacity plan from a latency profile: replicas, balancing method, autoscaling "
            "targets, modelled; --validate checks it live (docs/capacity-planning.md)",
    "autoscale-model": "autoscaling settings compared in the discrete-event model, over seeds, "
                       "in either regime (docs/autoscaling.md, Which regime are you in)",
    "autoscale-validate": "the autoscaling model against live autoscaling runs",
    "regime": "balancing in the CPU and GPU regimes, modelled over seeds "
              "(docs/load-balancing.md, Which regime are you in)",
}
MODULES = {"autoscale": "bench.autoscale", "faults": "bench.faults",
           "calibrate": "bench.calibrate", "profile": "bench.profile_cli", "plan": "bench.plan",
           "autoscale-model": "bench.autoscale_model",
           "autoscale-validate": "bench.autoscale_validate", "regime": "bench.regime"}
"""``python -m bench <name> --help`` for each; without a name, the balancing benchmark."""


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x)


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] and args_in[0] in SUBCOMMANDS:  # `python -m bench <name> [...]`
        return importlib.import_module(MODULES[args_in[0]]).main(args_in[1:])
    full = balance.Plan()
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__ % {"minutes": FULL_MINUTES},
        usage="%(prog)s [options]  (the balancing benchmark)\n"
              f"       %(prog)s {{{','.join(SUBCOMMANDS)}}} [options]  (listed at the end)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="other benchmarks (python -m bench <name> --help):\n" + "\n".join(
            f"  {name:<10} {purpose}" for name, purpose in SUBCOMMANDS.items())
        + "\nand python -m bench.model_seeds: the balancing model over many seeds (no "
          "processes).")
    ap.add_argument("--replicas", type=int, default=4, help="sim replicas (default 4)")
    ap.add_argument("--loads", default=",".join(map(str, full.loads)),
                    help="standalone loads, fractions of measured capacity (comma-separated)")
    ap.add_argument("--duration", type=float, default=full.duration,
                    help="trace seconds per cell (full run: ~2,000 measured requests at 80%%)")
    ap.add_argument("--warmup", type=float, default=full.warmup,
                    help="requests arriving earlier are sent but not counted")
    ap.add_argument("--policies", default=",".join(full.standalone),
                    help="standalone targets at one NGINX: method[@body][*boundFactor]")
    ap.add_argument("--sessions-policies", default=",".join(full.sessions),
                    help="targets of the multi-turn sessions workload, like --policies")
    ap.add_argument("--sessions-load", type=float, default=full.sessions_load,
                    help="load of the multi-turn sessions cells (0 skips them)")
    ap.add_argument("--ingress-pods", default=",".join(map(str, full.pods)),
                    help="NGINX instance counts measured at 80%% load")
    ap.add_argument("--pods-policies", default=",".join(full.pods_targets),
                    help="targets measured at more than one NGINX instance")
    ap.add_argument("--overhead-load", type=float, default=full.overhead_load,
                    help="load of the direct-vs-nginx comparison (0 skips it)")
    ap.add_argument("--overload", type=float, default=full.overload,
                    help="load of the session_hash_bounded overload cell (0 skips it)")
    ap.add_argument("--capacity-seconds", type=float, default=12.0,
                    help="seconds of the closed-loop capacity measurement per workload")
    ap.add_argument("--seeds", default="1",
                    help="trace seeds, comma-separated; several are run in turn and pooled "
                         "(bootstrap blocks drawn within each seed's run)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: one load (80%%), short cells, shorter outputs, 3 "
                         "methods per workload, one NGINX (< 3 min)")
    ap.add_argument("--out", type=Path, default=OUT,
                    help="folder for bench[-quick]-results.md and bench[-quick]-ttft.png "
                         "(default build/bench/, ignored by git; --out docs refreshes the "
                         "committed ones)")
    ap.add_argument("--profile", default=DEFAULT_PROFILE,
                    help="replicas' latency profile: a name in server/profiles/ or a path "
                         f"(default {DEFAULT_PROFILE})")
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="a continuous profile's max_num_seqs (model.maxConcurrency; prod 128), "
                         "instead of the profile's")
    ap.add_argument("--time-dilation", type=float, default=1.0,
                    help="multiply every modelled duration, for a regime faster than this "
                         "machine can serve live (default 1)")
    args = ap.parse_args(argv)

    try:
        model = SimModel.named(args.profile, args.time_dilation, args.max_num_seqs)
        model.des_params(args.replicas)  # the limit rows need it: fail before starting anything
    except ValueError as exc:  # ProfileError too
        ap.error(str(exc))
    workloads = {"standalone": trace.Workload(), "sessions": trace.Workload(sessions=True)}
    if args.quick:
        plan = balance.QUICK
        capacity_seconds = 3.0
        workloads["standalone"] = replace(workloads["standalone"],
                                          output=trace.LogNormal(24, 1.3, 1, 128))
        workloads["sessions"] = replace(workloads["sessions"],
                                        output=trace.LogNormal(24, 1.3, 1, 128))
        model = replace(model, max_tokens=128)
    else:
        try:
            plan = balance.Plan(
                loads=tuple(float(x) for x in _csv(args.loads)),
                standalone=_csv(args.policies), sessions=_csv(args.sessions_policies),
                sessions_load=args.sessions_load,
                pods=tuple(int(x) for x in _csv(args.ingress_pods)),
                pods_targets=_csv(args.pods_policies), duration=args.duration,
                warmup=args.warmup, overhead_load=args.overhead_load, overload=args.overload)
        except ValueError as exc:
            ap.error(str(exc))
        capacity_seconds = args.capacity_seconds
    for target in {*plan.standalone, *plan.sessions, *plan.pods_targets}:
        try:
            balance.parse_target(target)
        except ValueError as exc:
            ap.error(str(exc))
    try:
        seeds = tuple(dict.fromkeys(int(x) for x in _csv(args.seeds)))
    except ValueError:
        seeds = ()
    if not seeds:
        ap.error(f"--seeds must be comma-separated integers, e.g. 1,2,3; got {args.seeds!r}")
    if plan.sessions_load <= 0 or not plan.sessions:
        del workloads["sessions"]

    t_start = time.monotonic()
    base = balance.free_base_port(args.replicas + 1 + 1 + sum(plan.pods), seeds[0])
    cells, modelled = balance.measure(plan, args.replicas, model, workloads, seeds,
                                      capacity_seconds, base)
    elapsed = time.monotonic() - t_start

    md, png = balance.out_paths(args.out, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    balance_report.plot(cells, modelled, png,
                        f"{args.replicas} sim replicas, seed{'s' * (len(seeds) > 1)} "
                        f"{','.join(map(str, seeds))}, "
                        f"{plan.duration:g} s per cell")
    table = balance_report.table(cells, modelled)
    checks = balance_report.model_check(cells, modelled)
    bars = balance_report.bars(cells, modelled)
    command = shown("python -m bench", args_in)
    caps = ", ".join(f"{k} {v:.2f} req/s" for k, v in modelled["capacity"].items())
    lines = [f"# Balancing benchmark results ({'quick' if args.quick else 'full'})", "",
             f"`{command}` — {elapsed:.0f} s on {os.cpu_count()} cores.", "",
             f"- {model.describe()}.", f"- Measured capacity: {caps}.",
             f"- Default method (`LoadBalancingConfig().method`): `{balance.DEFAULT_METHOD}`.",
             "- Intervals: 95 %, paired moving-block bootstrap over the measured requests "
             "(blocks of about sqrt(n) consecutive requests); the cells of one workload and "
             "load replay the same trace"
             + (f"; seeds {', '.join(map(str, seeds))} pooled, blocks drawn within each seed's "
                "run." if len(seeds) > 1 else "."), "", table, "",
             *(f"- {line}" for line in checks + bars), "",
             f"![p99 TTFT per method]({png.name})"]
    md.write_text("\n".join(lines) + "\n")
    balance.say("")
    balance.say(table)
    for line in checks + bars:
        balance.say(line)
    balance.say(f"wrote {md} and {png} in {elapsed:.0f} s")
    for line in balance_report.last_lines(cells):
        balance.say(line)
    balance.say(balance_report.conclusion(cells, modelled, quick=args.quick))
    return 1 if balance_report.lost_in_overload(cells) else 0


if __name__ == "__main__":
    sys.exit(run_command(main, what="python -m bench"))
