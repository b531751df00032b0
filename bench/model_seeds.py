"""How much one trace's luck moves the p99 ratios: the discrete-event model over many seeds.

``python -m bench.model_seeds [--seeds 20] [--duration 290] [--warmup 30] [--load 0.8]
[--handoff 0.6:3[:back]]`` prints, for each ratio of p99 TTFT, its median, p10-p90, range and the
share of seeds at or below ``--bar`` (for the ratios to the limit): round robin to least_conn,
and each method to the central-FCFS limit. ``--handoff PATIENCE:HOPS`` adds least_conn with
late binding (``des.Handoff``; ``:back`` queues a handed-off request at the back), a what-if
the deployed stack cannot express. Pure computation (seconds of CPU), the benchmark's latency
model and standalone workload at ``--capacity`` requests/s.
"""

from __future__ import annotations

import argparse

from bench import des, trace
from bench.simmodel import SimModel
from bench.stats import percentile

RATIOS = {
    "round_robin / least_conn": ("round_robin", "least_conn"),
    "least_conn / limit": ("least_conn", "fcfs"),
    "random_two_least_conn / limit": ("random_two_least_conn", "fcfs"),
    "round_robin / limit": ("round_robin", "fcfs"),
}
HANDOFF = "least_conn+handoff"


def ratios(seeds: int, duration: float, warmup: float, rate: float, replicas: int = 4,
           handoff: des.Handoff | None = None) -> dict[str, list[float]]:
    m = SimModel()
    params = m.des_params(replicas)
    wanted = dict(RATIOS)
    if handoff is not None:
        wanted[f"{HANDOFF} / limit"] = (HANDOFF, "fcfs")
    out: dict[str, list[float]] = {name: [] for name in wanted}
    for seed in range(1, seeds + 1):
        tr = trace.generate(rate, duration, seed, trace.Workload(), m.max_model_len)
        jobs = [des.Job(r.arrival, r.prompt_tokens, r.max_tokens) for r in tr.requests]
        runs = {d: des.simulate(jobs, params, d, seed=seed) for d in des.DISPATCHERS}
        if handoff is not None:
            runs[HANDOFF] = des.simulate(jobs, params, "least_conn", seed=seed, handoff=handoff)
        p99 = {d: percentile([t for t, r in zip(res.ttft, tr.requests) if r.arrival >= warmup],
                             99) for d, res in runs.items()}
        for name, (a, b) in wanted.items():
            out[name].append(p99[a] / p99[b])
    return out


def _handoff(text: str) -> des.Handoff:
    try:
        patience, hops, *where = text.split(":")
        if where not in ([], ["back"]):
            raise ValueError
        return des.Handoff(float(patience), int(hops), keep_place=not where)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--handoff must be PATIENCE_SECONDS:HOPS[:back], e.g. 0.6:3; got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.model_seeds", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20, help="traces modelled (default 20)")
    ap.add_argument("--duration", type=float, default=290.0,
                    help="trace seconds per seed (default 290, the full run's cells)")
    ap.add_argument("--warmup", type=float, default=30.0,
                    help="requests arriving earlier are not counted (default 30)")
    ap.add_argument("--load", type=float, default=0.8,
                    help="offered load, a fraction of --capacity (default 0.8)")
    ap.add_argument("--capacity", type=float, default=9.7,
                    help="requests/s at saturation (what python -m bench measured)")
    ap.add_argument("--bar", type=float, default=1.25,
                    help="report the share of seeds whose ratio to the limit is at most this")
    ap.add_argument("--handoff", type=_handoff, default=None, metavar="PATIENCE:HOPS[:back]",
                    help="add least_conn with late binding: a request waiting PATIENCE s "
                         "moves on, up to HOPS times (:back queues it at the back)")
    args = ap.parse_args(argv)
    for name, xs in ratios(args.seeds, args.duration, args.warmup, args.capacity * args.load,
                           handoff=args.handoff).items():
        within = (f", {sum(x <= args.bar for x in xs)} of {len(xs)} seeds <= {args.bar:g}x"
                  if name.endswith("/ limit") else "")
        print(f"{name}: median {percentile(xs, 50):.2f}x (p10 {percentile(xs, 10):.2f}, "
              f"p90 {percentile(xs, 90):.2f}), range {min(xs):.2f}-{max(xs):.2f}{within}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
