"""Capacity planning: ``python -m bench plan --profile P --rate R --slo-ttft-p99 S``.

For a latency profile (server/profiles/), a request rate and a TTFT objective, the
discrete-event model (bench/des.py) predicts the p99 TTFT of every balancing method it models
at each replica count, picks the fewest replicas whose p99 meets the objective by the upper end
of its 95 % interval, derives autoscaling bounds and targets for a peak-to-base ratio, and
prints a ``Pulumi.<stack>.yaml`` snippet with those values (bench/plan_report.py renders it).
Every number is modelled, none measured; ``--validate`` replays two of the planned load points
through local mode and checks the model against the live 95 % interval (bench/plan_validate.py).

The interval: each seed is an independent Poisson trace of the workload (``--seeds``, default
5; ``--duration`` simulated seconds each, the first ``--warmup`` seconds not counted), and every
cell (method, replicas) replays the same traces. A cell's p99 is the mean of its seeds' p99s;
its 95 % interval is that mean ± t(0.975, seeds - 1) × their standard deviation / sqrt(seeds),
Student's t over independent runs, so it says where the p99 of a run of that length lies.

Targets (bench/plan_report.py prints the derivation with the figures):

* ``maxReplicas``: the fewest replicas that meet the objective at ``--rate`` (the peak);
  ``minReplicas``: the fewest that meet it at the base rate ``rate / peak-to-base``; a GPU
  profile (continuous batching) keeps at least 2, so a rollout never takes the only replica.
* ``targetRunningPerReplica``: the running sequences per replica (time average, the modelled
  ``llm_requests_running`` / ``vllm:num_requests_running``) at the peak rate on the replicas the
  peak needs, rounded up: the HPA then asks for ``ceil(total running / target)``, that many at
  the peak, and proportionally fewer as the rate falls.
* ``targetWaitingPerReplica``: the queue the objective tolerates on top of the planned load:
  a request behind ``q`` waiting requests per replica is admitted after about ``q / mu``
  seconds, ``mu`` being a saturated replica's completion rate; the objective leaves
  ``S - upper end of p99`` for that, so ``q = floor((S - p99 upper) × mu)``; divided by
  1 + the HPA's tolerance (0.1), since the HPA acts only beyond it; at least 1.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from bench import ci, des, plan_workload, trace
from bench.command import OUT
from bench.simmodel import SimModel
from components.policies.balancing import LoadBalancingConfig
from components.policies.scaling import HPA_TOLERANCE
from server.engines.profile import ContinuousScheduler, ProfileError
from server.engines.steps import StepBatch

METHODS = ("round_robin", "least_conn", "random_two_least_conn")
"""The balancing methods the discrete-event model replays (bench/des.py)."""
SESSION_METHODS = ("session_hash", "session_hash_bounded")
"""Methods of the stack the discrete-event model has no dispatcher for (yet)."""
DEFAULT_METHOD = LoadBalancingConfig().method
GPU_MIN_REPLICAS = 2
"""A GPU stack's rollout replaces pods one at a time (no spare GPU to surge into)."""
MEASURED_REQUESTS = 4000
"""Requests per seed after the warm-up that the default duration aims for."""
GUESS_UTILIZATION = 0.85
"""Where the replica search starts: each replica at this share of its saturated rate."""


# --- the interval ---------------------------------------------------------------------------

_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
"""Student's t, 97.5th percentile, for 1..30 degrees of freedom."""


def t975(df: int) -> float:
    """Student's t 97.5th percentile (a table to 30 degrees of freedom, then the Cornish-Fisher
    expansion, within 1e-3 beyond)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def seeds_interval(values: Sequence[float]) -> ci.Interval:
    """The mean of independent runs' values and its 95 % Student-t interval."""
    k = len(values)
    if k < 2:
        raise ValueError(f"an interval over seeds needs at least 2 seeds, got {k}")
    m = statistics.fmean(values)
    half = t975(k - 1) * statistics.stdev(values) / math.sqrt(k)
    return ci.Interval(m, m - half, m + half)


# --- the model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """What the model runs: the regime, the workload and how long."""

    profile: str
    """A shipped profile's name or a path (undilated: the plan is in the regime's own time)."""
    workload: trace.Workload = trace.Workload()
    max_concurrency: int | None = None
    """Sequences a replica runs at once (model.maxConcurrency); None: the profile's."""
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    duration: float | None = None
    """Simulated seconds per seed; None: the warm-up, then long enough for MEASURED_REQUESTS
    and at least 10 s."""
    warmup: float = 5.0
    max_model_len: int = 16_384
    time_dilation: float = 1.0
    """1 for planning; the validation's replay runs the regime dilated."""

    def model(self) -> SimModel:
        return _model(self.profile, self.max_model_len, self.time_dilation)

    def seconds(self, rate: float) -> float:
        if self.duration is not None:
            return self.duration
        return self.warmup + max(10.0, MEASURED_REQUESTS / rate)

    def params(self, replicas: int) -> des.Params | des.BatchedParams:
        p = self.model().des_params(replicas)
        if self.max_concurrency is None:
            return p
        if isinstance(p, des.BatchedParams):
            return replace(p, config=replace(p.config, max_num_seqs=self.max_concurrency))
        return replace(p, slots=self.max_concurrency)

    def slots(self) -> int:
        """Sequences a replica runs at once, as modelled."""
        p = self.params(1)
        return p.config.max_num_seqs if isinstance(p, des.BatchedParams) else p.slots

    def block_size(self) -> int:
        s = self.model().profile.scheduler
        return s.block_size if isinstance(s, ContinuousScheduler) else s.prefix_cache_block_tokens

    @property
    def gpu(self) -> bool:
        return isinstance(self.model().profile.scheduler, ContinuousScheduler)


@lru_cache(maxsize=8)
def _model(profile: str, max_model_len: int, time_dilation: float) -> SimModel:
    return SimModel.named(profile, time_dilation, max_model_len=max_model_len)


@lru_cache(maxsize=16)
def _jobs(setup: Setup, rate: float, seed: int) -> list[des.Job]:
    return plan_workload.jobs(rate, setup.seconds(rate), seed, setup.workload,
                              setup.max_model_len, setup.block_size())


class _Meter:
    """A step-time model that also integrates the sequences in each step over time."""

    def __init__(self, step_seconds: Callable[[StepBatch], float]) -> None:
        self._f = step_seconds
        self.sequence_seconds = 0.0

    def __call__(self, batch: StepBatch) -> float:
        d = self._f(batch)
        self.sequence_seconds += batch.sequences * d
        return d


@dataclass(frozen=True)
class SeedRun:
    p99: float
    p50: float
    running: float
    """Mean sequences running per replica after the warm-up (time average)."""
    waiting: float
    """Mean requests waiting per replica after the warm-up (time average)."""
    requests: int


def run_seed(setup: Setup, rate: float, replicas: int, method: str, seed: int) -> SeedRun:
    """One seed's trace through ``replicas`` replicas under ``method``."""
    jobs = _jobs(setup, rate, seed)
    params = setup.params(replicas)
    meter = None
    if isinstance(params, des.BatchedParams):
        meter = _Meter(params.step_seconds)
        params = replace(params, step_seconds=meter)
    res = des.simulate(jobs, params, method, seed=seed)
    arrival = np.fromiter((j.arrival for j in jobs), float, len(jobs))
    ttft, e2e = np.asarray(res.ttft), np.asarray(res.e2e)
    measured = arrival >= setup.warmup
    window = setup.seconds(rate) - setup.warmup
    in_flight = e2e[measured].sum() / window  # Little's law over the measured arrivals
    if meter is not None:
        # Running share of the time in the system, over the whole run; applied to the window.
        running = in_flight * meter.sequence_seconds / e2e.sum()
    else:
        assert isinstance(params, des.Params)
        prompt = np.fromiter((j.prompt_tokens for j in jobs), float, len(jobs))
        prefill = params.prefill_base_s + params.prefill_per_token_s * prompt
        wait = np.maximum(0.0, ttft - prefill)  # slots: TTFT = wait for a slot + prefill
        running = (e2e - wait)[measured].sum() / window
    return SeedRun(float(np.percentile(ttft[measured], 99)),
                   float(np.percentile(ttft[measured], 50)), running / replicas,
                   max(0.0, in_flight - running) / replicas, int(measured.sum()))


def _run_seed_task(task: tuple[Setup, float, int, str, int]) -> SeedRun:
    return run_seed(*task)


@dataclass(frozen=True)
class Cell:
    method: str
    replicas: int
    rate: float
    p99: ci.Interval
    """Mean of the seeds' p99 TTFT (seconds) and its 95 % interval."""
    p50: float
    running: float
    waiting: float
    requests: int
    seeds: tuple[float, ...]
    """Each seed's p99."""

    def meets(self, slo: float) -> bool:
        return self.p99.hi <= slo


class Runner:
    """Runs cells, in ``jobs`` processes (1: in this one)."""

    def __init__(self, setup: Setup, jobs: int = 1) -> None:
        self.setup = setup
        self.jobs = jobs
        self._pool = ProcessPoolExecutor(jobs) if jobs > 1 else None
        self.simulated = 0

    def cells(self, rate: float, replicas: int, methods: Sequence[str]) -> dict[str, Cell]:
        tasks = [(self.setup, rate, replicas, m, s) for m in methods for s in self.setup.seeds]
        runs = list(self._pool.map(_run_seed_task, tasks) if self._pool
                    else map(_run_seed_task, tasks))
        self.simulated += len(tasks)
        out, k = {}, len(self.setup.seeds)
        for i, m in enumerate(methods):
            rs = runs[i * k:(i + 1) * k]
            out[m] = Cell(m, replicas, rate, seeds_interval([r.p99 for r in rs]),
                          statistics.fmean(r.p50 for r in rs),
                          statistics.fmean(r.running for r in rs),
                          statistics.fmean(r.waiting for r in rs),
                          sum(r.requests for r in rs), tuple(r.p99 for r in rs))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def saturated_rate(setup: Setup, seed: int = 1, jobs_count: int | None = None) -> float:
    """Requests per second one replica completes when it always has work (modelled): the
    workload's requests all queued at once, completions counted between the 20th and 80th
    percentile of their times (no ramp-up, no drain)."""
    n = jobs_count or max(2000, 4 * setup.slots())
    rate = n / 10
    jobs = plan_workload.jobs(rate, 12, seed, setup.workload, setup.max_model_len,
                              setup.block_size())[:n]
    if len(jobs) < 50:
        raise ValueError("the workload drew too few requests to measure a replica's capacity")
    queued = [replace(j, arrival=0.0) for j in jobs]
    res = des.simulate(queued, setup.params(1), "fcfs")
    done = sorted(res.e2e)
    a, b = int(0.2 * len(done)), int(0.8 * len(done))
    return (b - a) / (done[b] - done[a])


def lone_ttft_p99(setup: Setup, rate: float, seed: int = 1) -> float:
    """p99 of the workload's TTFT with every request alone on a replica: no count of replicas
    brings TTFT below it."""
    profile = setup.model().profile
    jobs = _jobs(setup, rate, setup.seeds[0] if setup.seeds else seed)
    prefill = [profile.prefill_seconds(j.prompt_tokens) for j in jobs]
    return float(np.percentile(prefill, 99))


@dataclass
class Search:
    """The cells of one rate, by replica count, and the fewest replicas each method needs."""

    rate: float
    capacity: float
    """Modelled requests/s of one saturated replica."""
    rows: dict[int, dict[str, Cell]] = field(default_factory=dict)
    needed: dict[str, int | None] = field(default_factory=dict)
    stop: str = ""
    """Why the search stopped."""

    @property
    def first(self) -> int:
        """Fewest replicas the rate does not overload (below it the queue grows without end)."""
        return max(1, math.ceil(self.rate / self.capacity * (1 + 1e-9)))


def search(runner: Runner, rate: float, slo: float, methods: Sequence[str], capacity: float,
           max_replicas: int) -> Search:
    """The replica counts around the answer: from a first guess (the count that keeps each
    replica at ``GUESS_UTILIZATION`` of its capacity), down while some method still meets the
    objective (by the upper end of its interval), then up until every method meets it,
    ``max_replicas``, or two more replicas stop improving any method's upper end. Never below
    the first count the rate does not overload."""
    s = Search(rate, capacity)
    s.needed = {m: None for m in methods}
    floor = lone_ttft_p99(runner.setup, rate)
    if floor > slo:
        s.stop = (f"the objective is below the TTFT of a request alone on a replica (p99 "
                  f"{floor * 1e3:.0f} ms, modelled): no replica count meets it")
        return s
    if s.first > max_replicas:
        s.stop = f"the rate needs more than --max-replicas {max_replicas} replicas"
        return s
    guess = min(max_replicas, max(s.first, math.ceil(rate / (GUESS_UTILIZATION * capacity))))

    def meets(n: int) -> set[str]:
        if n not in s.rows:
            s.rows[n] = runner.cells(rate, n, methods)
        return {m for m, c in s.rows[n].items() if c.meets(slo)}

    n = guess
    while meets(n) and n > s.first:
        n -= 1
    n, best = guess, []
    while True:
        met = meets(n)
        best.append(min(c.p99.hi for c in s.rows[n].values()))
        if len(met) == len(methods):
            s.stop = "every method meets the objective"
            break
        if n >= max_replicas:
            s.stop = f"--max-replicas {max_replicas} reached"
            break
        if len(best) >= 3 and best[-1] > 0.98 * best[-3]:
            s.stop = "two more replicas did not lower the p99 (the objective is out of reach)"
            break
        n += 1
    s.rows = dict(sorted(s.rows.items()))
    for m in methods:
        s.needed[m] = next((k for k, row in s.rows.items() if row[m].meets(slo)), None)
    return s


@dataclass(frozen=True)
class Targets:
    min_replicas: int
    max_replicas: int
    running: int
    waiting: int
    running_modelled: float
    waiting_tolerated: float
    """The queue per replica the objective tolerates (before the HPA's tolerance)."""


@dataclass
class Plan:
    setup: Setup
    rate: float
    slo: float
    peak_to_base: float
    methods: tuple[str, ...]
    capacity: float
    peak: Search
    method: str | None = None
    replicas: int | None = None
    base: Search | None = None
    targets: Targets | None = None
    seconds: float = 0.0
    simulated: int = 0

    @property
    def base_rate(self) -> float:
        return self.rate / self.peak_to_base

    @property
    def autoscaling(self) -> bool:
        return self.peak_to_base > 1

    @property
    def floor(self) -> int:
        return GPU_MIN_REPLICAS if self.setup.gpu else 1

    @property
    def chosen(self) -> Cell | None:
        if self.method is None or self.replicas is None:
            return None
        return self.peak.rows[self.replicas][self.method]


def choose(s: Search) -> tuple[str | None, int | None]:
    """The method needing the fewest replicas; on a tie the lower upper end there, then the
    stack's default method."""
    ok = [(n, s.rows[n][m].p99.hi, m != DEFAULT_METHOD, m) for m, n in s.needed.items()
          if n is not None]
    if not ok:
        return None, None
    n, _, _, m = min(ok)
    return m, n


def make_plan(setup: Setup, rate: float, slo: float, peak_to_base: float = 1.0,
              methods: Sequence[str] = METHODS, max_replicas: int = 32, jobs: int = 1) -> Plan:
    """Search replica counts at the peak rate (every method) and, for autoscaling, at the base
    rate (the chosen method); derive the bounds and targets."""
    for name, value in (("rate", rate), ("slo", slo)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not peak_to_base >= 1:
        raise ValueError(f"peak-to-base must be at least 1, got {peak_to_base!r}")
    t0 = time.monotonic()
    capacity = saturated_rate(setup)
    runner = Runner(setup, jobs)
    try:
        peak = search(runner, rate, slo, methods, capacity, max_replicas)
        plan = Plan(setup, rate, slo, peak_to_base, tuple(methods), capacity, peak)
        plan.method, needed = choose(peak)
        if needed is not None:
            plan.replicas = needed
            chosen = peak.rows[needed][plan.method]  # type: ignore[index]
            if plan.autoscaling:
                plan.base = search(runner, plan.base_rate, slo,
                                   [plan.method], capacity, needed)  # type: ignore[list-item]
                low = plan.base.needed[plan.method] or needed  # type: ignore[index]
            else:
                low = needed
            plan.targets = targets(plan, chosen, min(max(low, plan.floor), max(needed, plan.floor)),
                                   max(needed, plan.floor))
    finally:
        runner.close()
    plan.seconds = time.monotonic() - t0
    plan.simulated = runner.simulated
    return plan


def targets(plan: Plan, chosen: Cell, low: int, high: int) -> Targets:
    tolerated = max(0.0, (plan.slo - chosen.p99.hi) * plan.capacity)
    return Targets(
        min_replicas=low, max_replicas=high,
        running=max(1, math.ceil(chosen.running - 1e-9)),
        waiting=max(1, math.floor(tolerated / (1 + HPA_TOLERANCE))),
        running_modelled=chosen.running, waiting_tolerated=tolerated)


# --- command line ---------------------------------------------------------------------------


def _positive(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (x > 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return x


def _count(text: str) -> int:
    try:
        x = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if x < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return x


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench plan", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", help="latency profile: a name in server/profiles/ or a path")
    ap.add_argument("--rate", type=_positive,
                    help="peak requests per second over all replicas (the rate to plan for)")
    ap.add_argument("--slo-ttft-p99", type=_positive, metavar="S",
                    help="objective: p99 time to first token, seconds")
    ap.add_argument("--workload", default="standalone",
                    help="standalone, sessions, or a YAML file (docs/capacity-planning.md)")
    ap.add_argument("--prompt-tokens", metavar="K=V,...",
                    help="override prompt lengths, e.g. median=300,sigma=0.6,high=4096")
    ap.add_argument("--output-tokens", metavar="K=V,...",
                    help="override output lengths (max_tokens), e.g. median=120,high=1024")
    ap.add_argument("--peak-to-base", type=float, default=1.0,
                    help="peak rate / base rate; above 1 the plan is autoscaling bounds and "
                         "targets, with base rate = rate / this (default 1: fixed replicas)")
    ap.add_argument("--max-concurrency", type=_count,
                    help="sequences per replica (model.maxConcurrency); default: the profile's")
    ap.add_argument("--seeds", type=_count, default=5,
                    help="independent traces per cell (default 5; at least 2)")
    ap.add_argument("--duration", type=_positive,
                    help="simulated seconds per seed (default: warm-up + enough for "
                         f"{MEASURED_REQUESTS} requests, at least 10 s)")
    ap.add_argument("--warmup", type=float, default=5.0,
                    help="simulated seconds not counted at the start of each trace")
    ap.add_argument("--max-replicas", type=_count, default=32)
    ap.add_argument("--jobs", type=_count, default=min(4, os.cpu_count() or 1),
                    help="processes to run the model in (default: the cores, at most 4)")
    ap.add_argument("--stack", default="prod", help="stack name for the snippet's file name")
    ap.add_argument("--validate", action="store_true",
                    help="replay two planned load points through local mode and compare "
                         "(docs/capacity-planning.md)")
    ap.add_argument("--quick", action="store_true",
                    help="with --validate: the short validation (< 5 minutes on 2 cores)")
    ap.add_argument("--out", default=str(OUT),
                    help="with --validate: folder for plan-validate[-quick].json, every "
                         "measured request live and modelled (default build/bench/, ignored "
                         "by git)")
    ap.add_argument("--time-dilation", type=_positive,
                    help="with --validate: override the dilation local mode would pick")
    return ap


def setup_from_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Setup:
    try:
        _, workload = plan_workload.named(args.workload)
        workload = plan_workload.with_lengths(
            workload,
            plan_workload.parse_length_flag(args.prompt_tokens, "--prompt-tokens")
            if args.prompt_tokens else None,
            plan_workload.parse_length_flag(args.output_tokens, "--output-tokens")
            if args.output_tokens else None)
    except plan_workload.WorkloadError as exc:
        ap.error(str(exc))
    if args.seeds < 2:
        ap.error("--seeds must be at least 2 (the interval is formed over seeds)")
    if not 0 <= args.warmup < (args.duration or math.inf):
        ap.error("--warmup must be >= 0 and shorter than --duration")
    setup = Setup(args.profile, workload, args.max_concurrency,
                  tuple(range(1, args.seeds + 1)), args.duration, args.warmup)
    try:
        setup.params(1)
    except (ProfileError, ValueError) as exc:
        ap.error(f"--profile {args.profile}: {exc}")
    return setup


def main(argv: list[str] | None = None) -> int:
    from bench import plan_report

    args_in = sys.argv[1:] if argv is None else argv
    ap = parser()
    args = ap.parse_args(args_in)
    if args.validate:
        from bench import plan_validate
        return plan_validate.main(ap, args, args_in)
    if args.quick or args.time_dilation:
        ap.error("--quick and --time-dilation go with --validate")
    for flag in ("profile", "rate", "slo_ttft_p99"):
        if getattr(args, flag) is None:
            ap.error(f"--{flag.replace('_', '-')} is required (or --validate)")
    if args.peak_to_base < 1:
        ap.error(f"--peak-to-base must be at least 1, got {args.peak_to_base:g}")
    setup = setup_from_args(ap, args)
    print(f"planning {args.rate:g} requests/s under {setup.profile} ...", flush=True)
    plan = make_plan(setup, args.rate, args.slo_ttft_p99, args.peak_to_base,
                     max_replicas=args.max_replicas, jobs=args.jobs)
    label = plan_workload.named(args.workload)[0]
    print(plan_report.render(plan, label, args_in, args.stack))
    return 0 if plan.method is not None else 1


if __name__ == "__main__":
    sys.exit(main())
