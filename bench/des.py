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

* ``Nginx(method, instances=K, bound_factor=F)`` and ``Epp(...)`` (bench/dispatch.py): K NGINX
  instances with their own counts, the session hash (bounded or not) as nginx does it, and the
  Gateway API Inference Extension's endpoint picker with and without flow control. A job's
  ``session`` (the session header) and ``epp_hashes`` (the EPP's prompt hashes) feed them.

Slots replicas with ``prefix_cache_tokens`` keep the sim engine's LRU prefix cache
(server/engines/sim.py, looked up when a prefill starts, filled when it ends) for jobs that
carry ``prefix_keys``; jobs without keys (the standalone workload) never touch it.

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
import math
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from bench.dispatch import Epp, EppConfig, Nginx, make_router
from bench.dispatch import Picker as _Picker
from server.engines.scheduler import Scheduler, SchedulerConfig, Seq, StepPlan
from server.engines.sim import LruPrefixCache
from server.engines.steps import StepBatch

__all__ = ["DISPATCHERS", "BatchedParams", "Epp", "EppConfig", "Handoff", "Job", "Nginx",
           "Params", "Result", "simulate"]

DISPATCHERS = ("fcfs", "round_robin", "least_conn", "random_two_least_conn")


@dataclass(frozen=True)
class Job:
    arrival: float
    prompt_tokens: int
    max_tokens: int
    prefix_keys: tuple[Hashable, ...] | None = None
    """Keys of the prompt's full blocks (``scheduler.block_keys``), so prompts that share a
    prefix hit the prefix cache; None: the prompt shares nothing."""
    session: str | None = None
    """The session header's value (the session methods hash it); None: no header."""
    epp_hashes: tuple[int, ...] | None = None
    """The endpoint picker's block hashes of the prompt text (``dispatch.epp_block_hashes``);
    None: no prefix to match."""


@dataclass(frozen=True)
class Params:
    replicas: int
    slots: int
    prefill_base_s: float
    prefill_per_token_s: float
    decode_base_s: float
    decode_per_seq_s: float
    prefix_cache_tokens: int = 0
    """The sim engine's per-replica LRU prefix cache (0: none)."""
    prefix_block_tokens: int = 16
    prefill_per_cached_token_s: float = 0.0


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


@dataclass(frozen=True)
class Result:
    ttft: list[float]
    """Seconds from arrival to first token, per job (in the order given)."""
    e2e: list[float]
    """Seconds from arrival to the last token."""
    replica: list[int]
    all_full: int = 0
    """Requests that found every replica at its bound (session_hash_bounded)."""
    hit_tokens: int = 0
    """Prompt tokens found in the replicas' prefix caches (jobs with prefix keys)."""
    lookup_tokens: int = 0


Dispatcher = str | Nginx | Epp


class _SlotsView:
    def __init__(self, reps: list[_Replica], slots: int) -> None:
        self.reps, self.replicas, self.capacity = reps, len(reps), slots
        self.cache_blocks: int | None = None  # the sim engine exports no vllm:cache_config_info
        self.block_size: int | None = None

    def in_flight(self, r: int) -> int:
        return self.reps[r].in_flight

    def waiting(self, r: int) -> int:
        return len(self.reps[r].queue)

    def kv_usage(self, r: int) -> float:
        return self.reps[r].running / self.capacity


class _BatchedView:
    def __init__(self, scheds: list[Scheduler], in_flight: list[int]) -> None:
        self.scheds, self._in_flight, self.replicas = scheds, in_flight, len(scheds)
        cfg = scheds[0].config
        self.capacity = cfg.max_num_seqs
        self.cache_blocks: int | None = cfg.num_blocks
        self.block_size: int | None = cfg.block_size

    def in_flight(self, r: int) -> int:
        return self._in_flight[r]

    def waiting(self, r: int) -> int:
        return len(self.scheds[r].waiting)

    def kv_usage(self, r: int) -> float:
        return self.scheds[r].kv_usage


def simulate(jobs: Sequence[Job], params: Params | BatchedParams, dispatcher: Dispatcher,
             seed: int = 0, handoff: Handoff | None = None,
             membership: Membership | None = None) -> Result:
    """Run every job through the model under ``dispatcher`` (a name in ``DISPATCHERS``, or an
    ``Nginx`` / ``Epp`` spec); jobs must be sorted by arrival."""
    if isinstance(dispatcher, Nginx) and dispatcher.instances == 1 \
            and dispatcher.method in DISPATCHERS:
        dispatcher = dispatcher.method  # one NGINX, a plain method: the same model as by name
    if isinstance(dispatcher, (Nginx, Epp)):
        if handoff is not None:
            raise ValueError("handoff is modelled with the plain NGINX dispatchers only")
        if membership is not None:
            raise ValueError("a changing membership is modelled with the plain dispatchers only")
    elif dispatcher not in DISPATCHERS:
        raise ValueError(f"dispatcher must be one of {', '.join(DISPATCHERS)} (or an Nginx or "
                         f"Epp spec), got {dispatcher!r}")
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
    router = None
    if isinstance(dispatcher, str):
        picker = _Picker(dispatcher, p.replicas, seed)
    else:
        router = make_router(dispatcher, jobs, _SlotsView(reps, p.slots), seed)
    caches = ([LruPrefixCache(p.prefix_cache_tokens, p.prefix_block_tokens)
               for _ in range(p.replicas)] if p.prefix_cache_tokens > 0 else None)
    events: list[tuple[float, int, str, int, object]] = []
    order = itertools.count()

    def push(t: float, kind: str, rep: int, data: object) -> None:
        heapq.heappush(events, (t, next(order), kind, rep, data))

    every = (1 << p.replicas) - 1
    accepting = every if membership is None else 0  # bit mask: replicas taking new requests

    def admit(r: _Replica, j: int, t: float) -> None:
        r.running += 1
        where[j] = r.index
        job = jobs[j]
        if caches is not None and job.prefix_keys is not None:
            n = job.prompt_tokens
            cached = min(n, caches[r.index].lookup(job.prefix_keys, n))
            push(t + p.prefill_base_s + p.prefill_per_token_s * (n - cached)
                 + p.prefill_per_cached_token_s * cached, "prefilled", r.index, j)
        else:  # the same sums in the same order as ever: bit-identical figures
            push(t + p.prefill_base_s + p.prefill_per_token_s * job.prompt_tokens,
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
        if router is not None:
            router.done(j, r.index)
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

    def place(sent: list[tuple[int, int]], t: float) -> None:
        for j, i in sent:
            r = reps[i]
            if r.running < p.slots:
                admit(r, j, t)
            else:
                bisect.insort(r.queue, j)

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
    while nxt is not None or events or (router is not None and router.busy()):
        if membership is not None and next_tick <= min(
                jobs[nxt].arrival if nxt is not None else next_tick,
                events[0][0] if events else next_tick):
            tick(next_tick)
            next_tick = membership.next_time()  # type: ignore[union-attr]
            continue
        if router is not None:
            tr = router.next_time()
            if tr < (jobs[nxt].arrival if nxt is not None else math.inf) \
                    and tr < (events[0][0] if events else math.inf):
                place(router.at(tr), tr)
                continue
        if nxt is not None and (not events or jobs[nxt].arrival <= events[0][0]):
            j, t = nxt, jobs[nxt].arrival
            nxt = next(arrivals, None)
            if not accepting:
                raise RuntimeError(f"no replica takes requests at t={t:g}")
            if router is not None:
                place(router.arrive(j, t), t)
            elif dispatcher == "fcfs":
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
            if caches is not None and jobs[j].prefix_keys is not None:
                caches[idx].insert_keys(jobs[j].prefix_keys)  # type: ignore[arg-type]
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
    return Result(ttft, e2e, where, router.all_full if router is not None else 0,
                  sum(c.hit_tokens for c in caches) if caches else 0,
                  sum(c.lookup_tokens for c in caches) if caches else 0)


def _simulate_batched(jobs: Sequence[Job], p: BatchedParams, dispatcher: Dispatcher, seed: int,
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
    router = None
    if isinstance(dispatcher, str):
        picker = _Picker(dispatcher, p.replicas, seed)
    else:
        router = make_router(dispatcher, jobs, _BatchedView(scheds, in_flight), seed)
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
    while nxt is not None or events or (router is not None and router.busy()):
        if membership is not None and next_tick <= min(
                jobs[nxt].arrival if nxt is not None else next_tick,
                events[0][0] if events else next_tick):
            tick(next_tick)
            next_tick = membership.next_time()
            continue
        if router is not None:
            tr = router.next_time()
            if tr < (jobs[nxt].arrival if nxt is not None else math.inf) \
                    and tr < (events[0][0] if events else math.inf):
                for j, r in router.at(tr):
                    add(r, j, tr)
                continue
        if nxt is not None and (not events or jobs[nxt].arrival <= events[0][0]):
            j, t = nxt, jobs[nxt].arrival
            nxt = next(arrivals, None)
            if not accepting:
                raise RuntimeError(f"no replica takes requests at t={t:g}")
            if router is not None:
                for jj, r in router.arrive(j, t):
                    add(r, jj, t)
            elif not fcfs:
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
            if router is not None:
                router.done(seq.data, r)
        if fcfs:
            while central and room(r) > 0 and accepting >> r & 1:
                add(r, central.popleft(), t)
        start(r, t)
    ttft = [f - jb.arrival for f, jb in zip(first, jobs)]
    e2e = [d - jb.arrival for d, jb in zip(done, jobs)]
    return Result(ttft, e2e, where, router.all_full if router is not None else 0,
                  sum(s.hit_tokens for s in scheds), sum(s.lookup_tokens for s in scheds))
