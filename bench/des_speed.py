"""How fast the discrete-event model runs continuous-batching replicas (the GPU regime).

``python -m bench.des_speed [--duration 290] [--replicas 4] [--rate 280] [--max-num-seqs 128]
[--seeds 1] [--dispatchers least_conn,fcfs]`` simulates Poisson arrivals of the standalone
workload's lengths (bench/trace.py's distributions, drawn directly: no prompt text) through
``--replicas`` replicas that each run the engine scheduler (server/engines/scheduler.py), and
prints per dispatcher the wall time of the simulation alone, the steps simulated, the mean batch,
and microseconds per step and per sequence-step.

The step time is a stand-in linear model until the latency profiles land (``--step-ms``,
``--seq-ms``, ``--kv-ns``, ``--token-us``; defaults chosen near an 8B model on one H200 so that a
step of ~128 sequences takes ~10 ms). Only the step rate matters here: the figure this prints
is the simulator's cost, not a latency of any regime.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass

from bench import des, trace
from server.engines.scheduler import SchedulerConfig
from server.engines.steps import StepBatch

CHAT_TEMPLATE_TOKENS = 10
"""Sim tokens the chat template adds around a user message (see server/engines/sim.py)."""


@dataclass(frozen=True)
class LinearStepCost:
    """A stand-in step model: base + per sequence + per KV token read + per new prefill token."""

    step_s: float
    seq_s: float
    kv_token_s: float
    prefill_token_s: float

    def __call__(self, batch: StepBatch) -> float:
        kv = sum(batch.decode_kv) + sum(cached for _, cached in batch.prefill)
        new = sum(n for n, _ in batch.prefill)
        return (self.step_s + self.seq_s * batch.sequences + self.kv_token_s * kv
                + self.prefill_token_s * new)


def jobs(rate: float, duration: float, seed: int, workload: trace.Workload = trace.Workload()
         ) -> list[des.Job]:
    """Standalone requests with the workload's length distributions, no prompt text."""
    rng = random.Random(seed)
    return [des.Job(t, workload.prompt.draw(rng) + CHAT_TEMPLATE_TOKENS, workload.output.draw(rng))
            for t in trace.poisson_arrivals(rate, duration, rng)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.des_speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=290.0)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--rate", type=float, default=280.0, help="requests/s over all replicas")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--kv-cache-tokens", type=int, default=500_000)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--dispatchers", default="least_conn,fcfs")
    ap.add_argument("--step-ms", type=float, default=8.4)
    ap.add_argument("--seq-ms", type=float, default=0.019)
    ap.add_argument("--kv-ns", type=float, default=40.0)
    ap.add_argument("--token-us", type=float, default=31.0)
    args = ap.parse_args(argv)
    dispatchers = args.dispatchers.split(",")
    for d in dispatchers:
        if d not in des.DISPATCHERS:
            ap.error(f"--dispatchers: {d!r} is not one of {', '.join(des.DISPATCHERS)}")
    cost = LinearStepCost(args.step_ms / 1e3, args.seq_ms / 1e3, args.kv_ns / 1e9,
                          args.token_us / 1e6)
    steps = {"n": 0, "seqs": 0}

    def counted(batch: StepBatch) -> float:
        steps["n"] += 1
        steps["seqs"] += batch.sequences
        return cost(batch)

    config = SchedulerConfig(kv_cache_tokens=args.kv_cache_tokens, max_model_len=16_384,
                             max_num_seqs=args.max_num_seqs)
    params = des.BatchedParams(args.replicas, config, counted)
    print(f"{args.replicas} replicas x max_num_seqs {args.max_num_seqs}, {args.rate:g} requests/s "
          f"for {args.duration:g} s, stand-in step {args.step_ms:g} ms + {args.seq_ms:g} ms/seq "
          f"+ {args.kv_ns:g} ns/KV token + {args.token_us:g} us/prefill token")
    for d in dispatchers:
        walls, per_step, per_seq = [], [], []
        for seed in range(1, args.seeds + 1):
            js = jobs(args.rate, args.duration, seed)
            steps.update(n=0, seqs=0)
            t0 = time.perf_counter()
            res = des.simulate(js, params, d, seed=seed)
            wall = time.perf_counter() - t0
            walls.append(wall)
            per_step.append(wall / steps["n"] * 1e6)
            per_seq.append(wall / steps["seqs"] * 1e6)
            ttft = sorted(res.ttft)
            print(f"  {d} seed {seed}: {len(js)} requests, {steps['n']} steps, mean batch "
                  f"{steps['seqs'] / steps['n']:.1f}, {wall:.1f} s ({per_step[-1]:.0f} us/step, "
                  f"{per_seq[-1]:.2f} us/sequence-step); TTFT p50 {ttft[len(ttft) // 2]:.3f} s "
                  f"p99 {ttft[int(len(ttft) * 0.99)]:.3f} s")
        print(f"{d}: median {statistics.median(walls):.1f} s per {args.duration:g} s trace "
              f"(range {min(walls):.1f}-{max(walls):.1f}), {statistics.median(per_step):.0f} "
              f"us/step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
