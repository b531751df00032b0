"""``python -m bench faults``: start the drill cluster, run the drills, print and write results."""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from bench.faults.disconnect import drill_disconnect
from bench.faults.drills import (
    Plan,
    _line,
    drill_crash,
    drill_overload,
    drill_reload,
    drill_rolling,
    measure_capacity,
    say,
)
from bench.faults.flood import drill_flood
from bench.faults.load import wait_idle
from bench.faults.model import DrillModel, DrillResult, exit_code, summary_table
from bench.faults.report import markdown, splice
from bench.command import OUT
from bench.ports import free_ports
from components.policies.balancing import LoadBalancingConfig

DRILLS = ("rolling", "crash", "overload", "reload", "disconnect", "flood")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench faults", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="shorter drills (under two minutes); writes nowhere unless --out")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder whose reliability.md gets the results between its markers "
                         "(full run default build/bench/, ignored by git; --out docs "
                         "refreshes the committed ones)")
    ap.add_argument("--replicas", type=int, default=3, help="sim replicas (default 3)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the load (default 1)")
    ap.add_argument("--rate", type=float, default=None,
                    help="steady load in requests/s (default 14: about half of 3 replicas)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the cluster's logs (replica-*.log, nginx/error.log) here")
    ap.add_argument("--drills", default=",".join(DRILLS),
                    help="comma-separated subset, run in this order")
    args = ap.parse_args(argv)
    out = args.out if args.out is not None or args.quick else OUT
    drills = [d for d in args.drills.split(",") if d]
    for d in drills:
        if d not in DRILLS:
            ap.error(f"unknown drill {d!r}")

    model = DrillModel()
    if args.quick:
        plan = Plan(rate=14.0, min_requests=250, crash_requests=150, overload_seconds=5.0)
    else:
        plan = Plan(rate=14.0, min_requests=500, crash_requests=300, overload_seconds=12.0)

    if args.rate is not None:
        if args.rate <= 0:
            ap.error("--rate must be positive")
        plan = replace(plan, rate=args.rate)

    from local.cluster import LocalCluster

    rng = random.Random(args.seed)
    base = free_ports(args.replicas + 2, rng)
    t_start = time.monotonic()
    say(f"{model.describe()}; {args.replicas} replicas on {os.cpu_count()} cores")
    results: list[DrillResult] = []
    with LocalCluster(args.replicas, port=base + args.replicas + 1, first_replica_port=base,
                      server_env=model.env(), max_output_tokens=64,
                      policy=LoadBalancingConfig(), workdir=args.workdir) as cluster:
        say(f"cluster up: {cluster.endpoint} -> {', '.join(cluster.replica_urls)}")
        capacity_rps = measure_capacity(cluster, model, 2.0 if args.quick else 4.0)
        say(f"capacity {capacity_rps:.1f} requests/s (derived: "
            f"{args.replicas * model.slots / model.service_mean_s:.1f}); steady load "
            f"{plan.rate:g} requests/s")
        runners: dict[str, Callable[[int], DrillResult]] = {
            "rolling": lambda s: drill_rolling(cluster, model, plan, s),
            "crash": lambda s: drill_crash(cluster, model, plan, s),
            "overload": lambda s: drill_overload(cluster, model, plan, s, capacity_rps),
            "reload": lambda s: drill_reload(cluster, model, plan, s),
            "disconnect": lambda s: drill_disconnect(cluster, model),
            "flood": lambda s: drill_flood(cluster),
        }
        for k, name in enumerate(drills):
            wait_idle(cluster.replica_urls)
            res = runners[name](args.seed * 100 + k)
            results.append(res)
            say(_line(res))
            for note in res.notes:
                say(f"    {note}")
        replicas_end = cluster.replicas
    elapsed = time.monotonic() - t_start
    table = summary_table(results)
    say("")
    say(table)
    say(f"total {elapsed:.0f} s")
    if out is not None:
        command = " ".join(["python -m bench faults",
                            *(argv if argv is not None else sys.argv[1:])]).strip()
        out.mkdir(parents=True, exist_ok=True)
        path = out / "reliability.md"
        body = markdown(results, command, elapsed, model, capacity_rps, plan, args.replicas)
        path.write_text(splice(path.read_text() if path.exists() else None, body))
        say(f"wrote {path} ({replicas_end} replicas at the end)")
    code = exit_code(results)
    say(conclusion(results))
    return code


def conclusion(results: list[DrillResult]) -> str:
    """The run in one plain sentence, last of its output."""
    missed = [r.drill for r in results if not r.passed]
    names = ", ".join(r.drill for r in results)
    if not missed:
        return (f"Conclusion: all {len(results)} drill(s) ({names}) met their bars: local mode "
                "came through each fault without losing a request it should have kept.")
    return (f"Conclusion: {len(missed)} of {len(results)} drill(s) missed their bar "
            f"({', '.join(missed)}); the table above says which check failed.")
