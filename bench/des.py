"""A discrete-event model of the sim engine behind a dispatcher: the limit row, and replays of
the balancing methods to check the model against the live measurement.

Two replica models:

* **Slots** (``Params``, the CPU regime; bit-identical to the model every figure so far came
  from). The model is the sim engine's own (server/engines/sim.py), with the benchmark's
  parameters (`SimModel`): every replica has `slots` admission slots and a wait queue. An admitted request
prefills for ``prefill_base + per_token x prompt tokens`` (concurrently with everything else;
no prefix cache: the standalone workload never shares a prefix), then emits its first token
and joins the replica's decode loop at the next step boundary. One decode step takes
``decode_base + per_seq x batch`` and gives every sequence in the batch one token; a sequence
that received its last token still counts in the next step's batch (the engine removes it only
when its consumer runs), and leaves its slot then.
* **Continuous batching** (``BatchedParams``, the GPU regime): every replica runs the very
  scheduler the sim engine runs (server/engines/scheduler.py, vLLM 0.33.0's rules: running
  first, a per-step token budget, chunked prefill sharing steps with decodes, ``max_num_seqs``,
  KV blocks with recompute preemption, the prefix cache), one step after another; a step takes
  ``step_seconds(batch)`` (a latency profile's step model) and ends with one token for every
  sequence whose prefill is complete. A request is in flight at its replica from dispatch to
  its last token. A job's ``prefix_keys`` (``scheduler.block_keys`` of its prompt) let prompts
  share a cached prefix; without them a prompt shares nothing.

Dispatchers:

* ``fcfs``: one central FCFS queue over every slot of every replica; a free slot never idles
  while a request waits, and a request goes to the replica with the most free slots (fewest in
  its decode batch on a tie). No non-preemptive dispatcher of the same requests can keep a
  slot idle less, which is why its TTFT is the reference the policies are measured against.
  With continuous batching the central queue feeds sequence slots: a request goes to a replica
  only while that replica has one free (running + waiting there < ``max_num_seqs``), to the one
  with the most (fewest running on a tie), and every replica pulls the queue's head at each
  step boundary while it has room; its own scheduler then admits it under the token budget and
  the KV cache. So no request waits centrally while some replica could take it into its batch,
  and no replica queues one that another could run at once (KV permitting: where the KV cache
  binds before ``max_num_seqs`` does, a request can still wait inside a replica).
* ``round_robin``, ``least_conn``, ``random_two_least_conn``: NGINX's choice per request on its
  counts of requests in flight (running + queued at the replica); ties in least_conn go round
  robin, as in nginx. The replica then queues what it cannot admit.

``Handoff`` (optional, with any of the three NGINX dispatchers): *late binding*, a what-if that
no deployable form of this stack can express today (docs/load-balancing.md, "The distance to
the limit"). A request that waited ``patience_s`` in one replica's queue leaves it and is
dispatched again, after ``hop_s``, among the replicas it has not tried (as nginx's
``proxy_next_upstream`` would on a 429 from the replica), at most ``hops`` times; the last
replica keeps it. Queues order requests by arrival at the proxy, so a handed-off request does
not lose its place to newer ones (``keep_place=False``: it joins the back). Slots replicas only.

``Membership`` (optional, with any dispatcher): replicas that join and leave during a run, for
an autoscaler (bench/des_autoscale.py). ``params.replicas`` is then the pool of replica indexes
the membership may use; only the replicas in its mask take new requests.

Pure and deterministic: the same requests, model and seed give the same times.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from server.engines.scheduler import Scheduler, SchedulerConfig, Seq, StepPlan
from server.engines.steps import StepBatch

DISPATCHERS = ("fcfs", "round_robin", "least_conn", "random_two_least_conn")


@dataclass(frozen=True)
class Job:
    arrival: float
    prompt_tokens: int
    max_tokens: int
    prefix_keys: tuple[Hashable, ...] | None = None
    """Continuous batching: keys of the prompt's full blocks (``scheduler.block_keys``), so
    prompts that share a prefix hit the prefix cache; None: the prompt shares nothing."""


@dataclass(frozen=True)
class Params:
    replicas: int
    slots: int
    prefill_base_s: float
    prefill_per_token_s: float
    decode_base_s: float
    decode_per_seq_s: float


@dataclass(frozen=True)
class BatchedParams:
    """Continuous-batching replicas (the GPU regime)."""

    replicas: int
    config: SchedulerConfig
    """Every replica's scheduling limits (max_num_seqs, token budget, KV cache, ...)."""
    step_seconds: Callable[[StepBatch], float]
    """Time of one step (a latency profile's step model)."""


Gauges = Callable[[int], tuple[int, int]]
"""Replica index -> (running, waiting) as its engine's gauges report them: slots replicas,
requests holding a slot and requests queued for one (``llm_requests_running`` /
``llm_requests_waiting``); continuous batching, the scheduler's ``running`` and ``waiting``
(``vllm:num_requests_running`` / ``vllm:num_requests_waiting``)."""


class Membership(Protocol):
    """Which replicas take new requests, decided while the run goes on (an autoscaler).

    ``simulate`` calls ``tick(t, gauges)`` whenever ``next_time()`` has come (before an arrival
    or a step end at the same instant) and routes new requests only to the replicas whose bit
    is set in the mask it returns (none before the first tick). A replica that leaves the mask
    gets no new request and finishes what it holds (draining); one that enters it must hold
    nothing and starts as a new process (an empty prefix cache)."""

    def next_time(self) -> float:
        """When to tick next; after ``tick(t)`` it must be later than ``t``."""
        ...

    def tick(self, t: float, gauges: Gauges) -> int:
        """Look at the replicas at ``t``; return the mask of those taking new requests."""
        ...


@dataclass(frozen=True)
class Handoff:
    patience_s: float
    """Time a request waits in one replica's queue before it is dispatched again."""
    hops: int
    """Dispatches after the first, at most (the replica count minus one caps it too)."""
    hop_s: float = 0.003
    """Time to answer the handoff and send the request to the next replica."""
    keep_place: bool = True
    """Queue a handed-off request by its arrival at the proxy (False: at the back, as a
    replica that cannot see that time would)."""


@dataclass
class _Replica:
    index: int
    running: int = 0
    queue: list[int] = field(default_factory=list)
    """Waiting jobs, ordered by job index (= arrival at the proxy)."""
    active: dict[int, int] = field(default_factory=dict)
    """job -> tokens still to come."""
    joining: list[int] = field(default_factory=list)
    lingering: list[int] = field(default_factory=list)
    """Got their last token at the last step end; still in the next step's batch."""
    stepping: bool = False

    @property
    def in_flight(self) -> int:
        return self.running + len(self.queue)


class _Picker:
    """NGINX's choice of a replica per request, on its counts of requests in flight: round robin,
    least_conn (ties go round robin, as in nginx) or random two least_conn."""

    def __init__(self, dispatcher: str, replicas: int, seed: int) -> None:
        self.dispatcher = dispatcher
        self.replicas = replicas
        self._rng = random.Random(seed)
        self._rr = itertools.cycle(range(replicas))
        self._lc_next = 0

    def pick(self, in_flight: Callable[[int], int], tried: int = 0) -> int:
        """A replica index; ``tried`` is a bit mask of the replicas this request was sent to."""
        n = self.replicas
        left = [i for i in range(n) if not tried >> i & 1]
        if self.dispatcher == "round_robin":
            while True:
                i = next(self._rr)
                if i in left:
                    return i
        if self.dispatcher == "least_conn":
            low = min(in_flight(i) for i in left)
            for k in range(n):
                i = (self._lc_next + k) % n
                if i in left and in_flight(i) == low:
                    self._lc_next = (i + 1) % n
                    return i
        a, b = self._rng.sample(left, 2) if len(left) > 1 else (left[0], left[0])
        return b if in_flight(b) < in_flight(a) else a


@dataclass(frozen=True)
class Result:
    ttft: list[float]
    """Seconds from arrival to first token, per job (in the order given)."""
    e2e: list[float]
    """Seconds from arrival to the last token."""
    replica: list[int]


def simulate(jobs: Sequence[Job], params: Params | BatchedParams, dispatcher: str, seed: int = 0,
             handoff: Handoff | None = None, membership: Membership | None = None) -> Result:
    """Run every job through the model under ``dispatcher``; jobs must be sorted by arrival."""
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"dispatcher must be one of {', '.join(DISPATCHERS)}, got {dispatcher!r}")
    if handoff is not None and membership is not None:
        raise ValueError("handoff is not modelled with a changing membership")
    if isinstance(params, BatchedParams):
        return _simulate_batched(jobs, params, dispatcher, seed, handoff, membership)
    if handoff is not None and (dispatcher == "fcfs" or handoff.patience_s <= 0
                                or handoff.hops < 0 or handoff.hop_s < 0):
        raise ValueError("handoff needs an NGINX dispatcher, patience_s > 0, hops >= 0 and "
                         "hop_s >= 0")
    if params.replicas < 1 or params.slots < 1:
        raise ValueError("replicas and slots must be at least 1")
    if any(b.arrival < a.arrival for a, b in zip(jobs, jobs[1:])):
        raise ValueError("jobs must be sorted by arrival")
    p = params
    reps = [_Replica(i) for i in range(p.replicas)]
    central: deque[int] = deque()
    first = [float("nan")] * len(jobs)
    done = [float("nan")] * len(jobs)
    where = [-1] * len(jobs)
    tried = [0] * len(jobs)  # bit mask of the replicas each job was sent to
    picker = _Picker(dispatcher, p.replicas, seed)
    events: list[tuple[float, int, str, int, object]] = []
    order = itertools.count()

    def push(t: float, kind: str, rep: int, data: object) -> None:
        heapq.heappush(events, (t, next(order), kind, rep, data))

    every = (1 << p.replicas) - 1
    accepting = every if membership is None else 0  # bit mask: replicas taking new requests

    def admit(r: _Replica, j: int, t: float) -> None:
        r.running += 1
        where[j] = r.index
        push(t + p.prefill_base_s + p.prefill_per_token_s * jobs[j].prompt_tokens,
             "prefilled", r.index, j)

    def start_step(r: _Replica, t: float) -> None:
        for j in r.joining:
            r.active[j] = jobs[j].max_tokens - 1
        r.joining.clear()
        batch = list(r.active)
        size = len(batch) + len(r.lingering)
        for j in r.lingering:  # their consumers run now: the slots free
            release(r, j, t)
        r.lingering.clear()
        r.stepping = True
        push(t + p.decode_base_s + p.decode_per_seq_s * size, "step", r.index, batch)

    def release(r: _Replica, j: int, t: float) -> None:
        r.running -= 1
        if dispatcher == "fcfs":
            if central and accepting >> r.index & 1:
                admit(r, central.popleft(), t)
        elif r.queue:
            admit(r, r.queue.pop(0), t)

    def dispatch(j: int, t: float) -> None:
        r = reps[picker.pick(lambda i: reps[i].in_flight, tried[j] | (every & ~accepting))]
        tried[j] |= 1 << r.index
        if r.running < p.slots:
            admit(r, j, t)
            return
        if handoff is not None and not handoff.keep_place:
            r.queue.append(j)
        else:
            bisect.insort(r.queue, j)
        sent = bin(tried[j]).count("1")
        if handoff is not None and sent <= handoff.hops and sent < p.replicas:
            push(t + handoff.patience_s, "patience", r.index, j)

    def tick(t: float) -> None:  # the membership's turn
        nonlocal accepting
        mask = membership.tick(t, lambda i: (reps[i].running, len(reps[i].queue)))  # type: ignore[union-attr]
        for r in reps:
            if (mask & ~accepting) >> r.index & 1:  # a new process
                if r.running or r.queue or r.stepping:
                    raise RuntimeError(f"replica {r.index} joined while holding requests")
                reps[r.index] = r = _Replica(r.index)
        accepting = mask
        if dispatcher == "fcfs":
            for r in reps:
                while central and accepting >> r.index & 1 and r.running < p.slots:
                    admit(r, central.popleft(), t)

    next_tick = membership.next_time() if membership is not None else float("inf")
    arrivals = iter(range(len(jobs)))
    nxt = next(arrivals, None)
    while nxt is not None or events:
        if membership is not None and next_tick <= min(
                jobs[nxt].arrival if nxt is not None else next_tick,
                events[0][0] if events else next_tick):
            tick(next_tick)
            next_tick = membership.next_time()  # type: ignore[union-attr]
            continue
        if nxt is not None and (not events or jobs[nxt].arrival <= events[0][0]):
            j, t = nxt, jobs[nxt].arrival
            nxt = next(arrivals, None)
            if not accepting:
                raise RuntimeError(f"no replica takes requests at t={t:g}")
            if dispatcher == "fcfs":
                free = [r for r in reps if r.running < p.slots and accepting >> r.index & 1]
                if free and not central:
                    admit(max(free, key=lambda r: (p.slots - r.running, -len(r.active))), j, t)
                else:
                    central.append(j)
            else:
                dispatch(j, t)
            continue
        t, _, kind, idx, data = heapq.heappop(events)
        r = reps[idx]
        if kind == "patience":
            if data in r.queue:  # still waiting here: hand it off
                r.queue.remove(data)
                push(t + handoff.hop_s, "handoff", idx, data)  # type: ignore[union-attr]
        elif kind == "handoff":
            dispatch(data, t)  # type: ignore[arg-type]
        elif kind == "prefilled":
            j = data  # type: ignore[assignment]
            first[j] = t
            if jobs[j].max_tokens <= 1:
                done[j] = t
                release(r, j, t)
                continue
            r.joining.append(j)
            if not r.stepping:
                start_step(r, t)
        else:  # a decode step ended
            for j in data:  # type: ignore[union-attr]
                if j not in r.active:
                    continue
                r.active[j] -= 1
                if r.active[j] == 0:
                    del r.active[j]
                    done[j] = t
                    r.lingering.append(j)
            r.stepping = False
            if r.active or r.joining:
                start_step(r, t)
            else:
                for j in r.lingering:
                    release(r, j, t)
                r.lingering.clear()
    ttft = [f - jb.arrival for f, jb in zip(first, jobs)]
    e2e = [d - jb.arrival for d, jb in zip(done, jobs)]
    return Result(ttft, e2e, where)


def _simulate_batched(jobs: Sequence[Job], p: BatchedParams, dispatcher: str, seed: int,
                      handoff: Handoff | None, membership: Membership | None) -> Result:
    if handoff is not None:
        raise ValueError("handoff is modelled for slots replicas only")
    if p.replicas < 1:
        raise ValueError("replicas must be at least 1")
    if any(b.arrival < a.arrival for a, b in zip(jobs, jobs[1:])):
        raise ValueError("jobs must be sorted by arrival")
    cfg = p.config
    step_seconds = p.step_seconds
    max_seqs = cfg.max_num_seqs
    scheds = [Scheduler(cfg) for _ in range(p.replicas)]
    plans: list[StepPlan | None] = [None] * p.replicas
    in_flight = [0] * p.replicas
    central: deque[int] = deque()
    first = [float("nan")] * len(jobs)
    done = [float("nan")] * len(jobs)
    where = [-1] * len(jobs)
    picker = _Picker(dispatcher, p.replicas, seed)
    events: list[tuple[float, int]] = []  # step ends: (time, replica)
    fcfs = dispatcher == "fcfs"
    every = (1 << p.replicas) - 1
    accepting = every if membership is None else 0  # bit mask: replicas taking new requests

    def room(r: int) -> int:
        s = scheds[r]
        return max_seqs - len(s.running) - len(s.waiting)

    def start(r: int, t: float) -> None:
        plan = scheds[r].plan_step()
        if plan.empty:
            plans[r] = None
            if scheds[r].has_work:  # nothing can run and nothing will free: a bad config
                raise RuntimeError(f"replica {r} cannot schedule its waiting requests")
            return
        plans[r] = plan
        heapq.heappush(events, (t + step_seconds(plan.batch), r))

    def add(r: int, j: int, t: float) -> None:
        job = jobs[j]
        scheds[r].add(Seq(job.prompt_tokens, job.max_tokens, job.prefix_keys, j))
        in_flight[r] += 1
        where[j] = r
        if plans[r] is None:
            start(r, t)

    def tick(t: float) -> None:  # the membership's turn
        nonlocal accepting
        mask = membership.tick(  # type: ignore[union-attr]
            t, lambda r: (len(scheds[r].running), len(scheds[r].waiting)))
        for r in range(p.replicas):
            if (mask & ~accepting) >> r & 1:  # a new process: an empty prefix cache
                if in_flight[r] or plans[r] is not None:
                    raise RuntimeError(f"replica {r} joined while holding requests")
                scheds[r] = Scheduler(cfg)
        accepting = mask
        if fcfs:
            for r in range(p.replicas):
                while central and accepting >> r & 1 and room(r) > 0:
                    add(r, central.popleft(), t)

    next_tick = membership.next_time() if membership is not None else float("inf")
    arrivals = iter(range(len(jobs)))
    nxt = next(arrivals, None)
    while nxt is not None or events:
        if membership is not None and next_tick <= min(
                jobs[nxt].arrival if nxt is not None else next_tick,
                events[0][0] if events else next_tick):
            tick(next_tick)
            next_tick = membership.next_time()
            continue
        if nxt is not None and (not events or jobs[nxt].arrival <= events[0][0]):
            j, t = nxt, jobs[nxt].arrival
            nxt = next(arrivals, None)
            if not accepting:
                raise RuntimeError(f"no replica takes requests at t={t:g}")
            if not fcfs:
                add(picker.pick(in_flight.__getitem__, every & ~accepting), j, t)
            elif not central and (open_ := [r for r in range(p.replicas)
                                            if room(r) > 0 and accepting >> r & 1]):
                add(max(open_, key=lambda r: (room(r), -len(scheds[r].running))), j, t)
            else:
                central.append(j)
            continue
        t, r = heapq.heappop(events)
        out = scheds[r].finish_step(plans[r])  # type: ignore[arg-type]
        for seq in out.emitted:
            if seq.num_output == 1:
                first[seq.data] = t
        for seq in out.finished:
            done[seq.data] = t
            in_flight[r] -= 1
        if fcfs:
            while central and room(r) > 0 and accepting >> r & 1:
                add(r, central.popleft(), t)
        start(r, t)
    ttft = [f - jb.arrival for f, jb in zip(first, jobs)]
    e2e = [d - jb.arrival for d, jb in zip(done, jobs)]
    return Result(ttft, e2e, where)
