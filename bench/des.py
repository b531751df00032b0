"""A discrete-event model of the sim engine behind a dispatcher: the limit row, and replays of
the balancing methods to check the model against the live measurement.

The model is the sim engine's own (server/engines/sim.py), with the benchmark's parameters
(`SimModel`): every replica has `slots` admission slots and a wait queue. An admitted request
prefills for ``prefill_base + per_token x prompt tokens`` (concurrently with everything else;
no prefix cache: the standalone workload never shares a prefix), then emits its first token
and joins the replica's decode loop at the next step boundary. One decode step takes
``decode_base + per_seq x batch`` and gives every sequence in the batch one token; a sequence
that received its last token still counts in the next step's batch (the engine removes it only
when its consumer runs), and leaves its slot then.

Dispatchers:

* ``fcfs``: one central FCFS queue over every slot of every replica; a free slot never idles
  while a request waits, and a request goes to the replica with the most free slots (fewest in
  its decode batch on a tie). No non-preemptive dispatcher of the same requests can keep a
  slot idle less, which is why its TTFT is the reference the policies are measured against.
* ``round_robin``, ``least_conn``, ``random_two_least_conn``: NGINX's choice per request on its
  counts of requests in flight (running + queued at the replica); ties in least_conn go round
  robin, as in nginx. The replica then queues what it cannot admit.

``Handoff`` (optional, with any of the three NGINX dispatchers): *late binding*, a what-if that
no deployable form of this stack can express today (docs/load-balancing.md, "The distance to
the limit"). A request that waited ``patience_s`` in one replica's queue leaves it and is
dispatched again, after ``hop_s``, among the replicas it has not tried (as nginx's
``proxy_next_upstream`` would on a 429 from the replica), at most ``hops`` times; the last
replica keeps it. Queues order requests by arrival at the proxy, so a handed-off request does
not lose its place to newer ones (``keep_place=False``: it joins the back).

Pure and deterministic: the same requests, model and seed give the same times.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

DISPATCHERS = ("fcfs", "round_robin", "least_conn", "random_two_least_conn")


@dataclass(frozen=True)
class Job:
    arrival: float
    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class Params:
    replicas: int
    slots: int
    prefill_base_s: float
    prefill_per_token_s: float
    decode_base_s: float
    decode_per_seq_s: float


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


def simulate(jobs: Sequence[Job], params: Params, dispatcher: str, seed: int = 0,
             handoff: Handoff | None = None) -> Result:
    """Run every job through the model under ``dispatcher``; jobs must be sorted by arrival."""
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"dispatcher must be one of {', '.join(DISPATCHERS)}, got {dispatcher!r}")
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
    rng = random.Random(seed)
    rr = itertools.cycle(range(p.replicas))
    lc_next = 0
    events: list[tuple[float, int, str, int, object]] = []
    order = itertools.count()

    def push(t: float, kind: str, rep: int, data: object) -> None:
        heapq.heappush(events, (t, next(order), kind, rep, data))

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
            if central:
                admit(r, central.popleft(), t)
        elif r.queue:
            admit(r, r.queue.pop(0), t)

    def pick(j: int) -> _Replica:
        nonlocal lc_next
        left = [r for r in reps if not tried[j] >> r.index & 1]
        if dispatcher == "round_robin":
            while True:
                r = reps[next(rr)]
                if r in left:
                    return r
        if dispatcher == "least_conn":
            low = min(r.in_flight for r in left)
            for k in range(p.replicas):
                r = reps[(lc_next + k) % p.replicas]
                if r in left and r.in_flight == low:
                    lc_next = (r.index + 1) % p.replicas
                    return r
        a, b = rng.sample(left, 2) if len(left) > 1 else (left[0], left[0])
        return b if b.in_flight < a.in_flight else a

    def dispatch(j: int, t: float) -> None:
        r = pick(j)
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

    arrivals = iter(range(len(jobs)))
    nxt = next(arrivals, None)
    while nxt is not None or events:
        if nxt is not None and (not events or jobs[nxt].arrival <= events[0][0]):
            j, t = nxt, jobs[nxt].arrival
            nxt = next(arrivals, None)
            if dispatcher == "fcfs":
                free = [r for r in reps if r.running < p.slots]
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
