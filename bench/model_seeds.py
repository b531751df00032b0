"""How much one trace's luck moves the p99 ratios: the discrete-event model over many seeds.

``python -m bench.model_seeds [--seeds 20] [--duration 290] [--warmup 30] [--load 0.8]``
prints, for each ratio of p99 TTFT, its median, p10-p90 and range over the seeds: round robin
to least_conn, and each method to the central-FCFS limit. Pure computation (seconds of CPU),
the benchmark's latency model and standalone workload at ``--capacity`` requests/s.
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


def ratios(seeds: int, duration: float, warmup: float, rate: float,
           replicas: int = 4) -> dict[str, list[float]]:
    m = SimModel()
    params = des.Params(replicas, m.slots, m.prefill_base_ms / 1e3, m.prefill_ms_per_token / 1e3,
                        m.decode_base_ms / 1e3, m.decode_ms_per_seq / 1e3)
    out: dict[str, list[float]] = {name: [] for name in RATIOS}
    for seed in range(1, seeds + 1):
        tr = trace.generate(rate, duration, seed, trace.Workload(), m.max_model_len)
        jobs = [des.Job(r.arrival, r.prompt_tokens, r.max_tokens) for r in tr.requests]
        p99 = {}
        for d in des.DISPATCHERS:
            ttft = des.simulate(jobs, params, d, seed=seed).ttft
            p99[d] = percentile([t for t, r in zip(ttft, tr.requests) if r.arrival >= warmup], 99)
        for name, (a, b) in RATIOS.items():
            out[name].append(p99[a] / p99[b])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.model_seeds", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--duration", type=float, default=290.0)
    ap.add_argument("--warmup", type=float, default=30.0)
    ap.add_argument("--load", type=float, default=0.8)
    ap.add_argument("--capacity", type=float, default=9.7,
                    help="requests/s at saturation (what python -m bench measured)")
    args = ap.parse_args(argv)
    for name, xs in ratios(args.seeds, args.duration, args.warmup,
                           args.capacity * args.load).items():
        print(f"{name}: median {percentile(xs, 50):.2f}x (p10 {percentile(xs, 10):.2f}, "
              f"p90 {percentile(xs, 90):.2f}), range {min(xs):.2f}-{max(xs):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
