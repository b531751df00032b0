"""Calibration probes in simulated time, for the pure tests of bench/calibrate_fit.py.

The probe protocol (bench/calibrate_probe.ProbeController) runs against a simulated endpoint
whose engine follows a known latency profile, so a test can check that the fit recovers the
profile. Two engines, as the profiles' two kinds describe them:

* ``slots``: at most ``slots`` requests admitted (FCFS queue beyond); each admitted request
  prefills on its own for ``prefill_seconds(prompt)``, then joins one engine-wide decode loop at
  its next step, whose step takes ``decode_step_seconds(active)``.
* ``continuous``: one step at a time over the running requests (each decoding one token, or
  continuing its prompt), then the waiting ones while the token budget lasts and fewer than
  ``max_num_seqs`` run (chunked prefill); a step takes ``step_seconds(batch)``. No KV limit.

Every request pays ``latency`` seconds to reach the engine and every token ``latency`` to come
back; a step's tokens may be written in admission order ``write`` seconds apart (the spread a
loaded server shows). Deterministic.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

from bench.calibrate_probe import (
    ProbeController,
    ProbeRecord,
    Send,
    Stop,
    StreamRecord,
)
from server.engines.profile import ContinuousScheduler, Profile, SlotsScheduler
from server.engines.steps import StepBatch


@dataclass
class _Req:
    rec: StreamRecord
    prompt: int
    max_tokens: int
    computed: int = 0
    out: int = 0
    joined: bool = False
    """slots: in the decode loop."""

    @property
    def gone(self) -> bool:
        return self.rec.outcome != "running" or self.out >= self.max_tokens


@dataclass
class SimEndpoint:
    profile: Profile
    latency: float = 0.0005
    write: float = 0.0
    """Seconds between two streams' tokens of one step (0: all at once)."""
    cached_fraction: float = 0.0
    """Share of a repeated prompt found in the prefix cache (0: no cache)."""

    def probe(self, prompt: int, concurrency: int, max_tokens: int = 256,
              hold: int = 0) -> ProbeRecord:
        rec = ProbeRecord(prompt, concurrency, hold=hold)
        ctl = ProbeController(rec, max_tokens)
        engine: _Slots | _Continuous = (_Slots(self) if self.profile.kind == "slots"
                                         else _Continuous(self))
        events: list[tuple[float, int, str, object]] = []
        order = itertools.count()

        def push(at: float, kind: str, obj: object) -> None:
            heapq.heappush(events, (at, next(order), kind, obj))

        def act(actions: list, now: float) -> bool:
            for a in actions:
                if isinstance(a, Stop):
                    return True
                assert isinstance(a, Send)
                for _ in range(a.count):
                    key = (rec.streams[a.reuse].prompt_key if a.reuse is not None
                           else len(rec.streams))
                    s = StreamRecord(a.role, prompt, a.max_tokens, key, prompt_exact=True,
                                     sent=now)
                    rec.streams.append(s)
                    push(now + self.latency, "arrive", s)
            return False

        done = act(ctl.start(0.0), 0.0)
        while events and not done:
            now, _, kind, obj = heapq.heappop(events)
            if kind == "arrive":
                engine.add(obj, now)  # type: ignore[arg-type]
            elif kind == "engine":
                for i, r in enumerate(engine.fire(now, obj)):
                    push(now + self.latency + i * self.write, "token", (r.rec, r.out))
            else:
                s, count = obj  # type: ignore[misc]
                if s.outcome == "running":
                    s.tokens.append((now, count))
                    s.content_events = count
                    if count >= s.max_tokens:
                        s.outcome, s.ended, s.usage_completion = "finished", now, count
                    if not events or events[0][0] > now:  # the last token of this instant
                        done = act(ctl.update(now), now)
            if not done:
                for at, what in engine.wake(now):
                    push(at, "engine", what)
        end = rec.marks.get("end", 0.0)
        for s in rec.streams:
            if s.outcome == "running":
                s.outcome, s.ended = "cancelled", end
        return rec

    def cached(self, rec: StreamRecord, seen: set[int]) -> int:
        """Prompt tokens found cached: whole blocks of 16; a continuous engine computes the
        last prompt token anyway (its logits), as vLLM does."""
        if not (self.cached_fraction and rec.prompt_key in seen):
            seen.add(rec.prompt_key)
            return 0
        usable = rec.prompt_tokens - (self.profile.kind == "continuous")
        return int(self.cached_fraction * usable) // 16 * 16


class _Slots:
    def __init__(self, ep: SimEndpoint) -> None:
        self.ep = ep
        s = ep.profile.scheduler
        assert isinstance(s, SlotsScheduler)
        self.slots = s.slots
        self.queue: list[_Req] = []
        self.admitted: list[_Req] = []
        self.stepping = False
        self.batch: list[_Req] = []
        self.seen: set[int] = set()

    def add(self, s: StreamRecord, now: float) -> None:
        self.queue.append(_Req(s, s.prompt_tokens, s.max_tokens))

    def wake(self, now: float) -> list[tuple[float, object]]:
        out: list[tuple[float, object]] = []
        self.admitted = [r for r in self.admitted if not r.gone]
        while self.queue and len(self.admitted) < self.slots:
            r = self.queue.pop(0)
            if r.gone:
                continue
            c = self.ep.cached(r.rec, self.seen)
            self.admitted.append(r)
            out.append((now + self.ep.profile.prefill_seconds(r.prompt - c, c), ("prefill", r)))
        if not self.stepping:
            joined = [r for r in self.admitted if r.joined]
            if joined:
                self.batch, self.stepping = joined, True
                out.append((now + self.ep.profile.decode_step_seconds(len(joined)),
                            ("step", None)))
        return out

    def fire(self, now: float, obj: object) -> list[_Req]:
        kind, r = obj  # type: ignore[misc]
        if kind == "prefill":
            if r.gone:
                return []
            r.out, r.joined = 1, True  # first token; joins the loop at its next step
            return [r]
        self.stepping = False
        live = [q for q in self.batch if not q.gone]
        for q in live:
            q.out += 1
        return live


class _Continuous:
    def __init__(self, ep: SimEndpoint) -> None:
        self.ep = ep
        s = ep.profile.scheduler
        assert isinstance(s, ContinuousScheduler)
        self.s = s
        self.waiting: list[_Req] = []
        self.running: list[_Req] = []
        self.busy = False
        self.plan: list[tuple[_Req, int]] = []
        self.seen: set[int] = set()

    def add(self, s: StreamRecord, now: float) -> None:
        r = _Req(s, s.prompt_tokens, s.max_tokens)
        r.computed = self.ep.cached(s, self.seen)
        self.waiting.append(r)

    def wake(self, now: float) -> list[tuple[float, object]]:
        if self.busy:
            return []
        self.running = [r for r in self.running if not r.gone]
        self.waiting = [r for r in self.waiting if not r.gone]
        budget = self.s.max_num_batched_tokens
        plan: list[tuple[_Req, int]] = []
        decode_kv: list[int] = []
        prefill: list[tuple[int, int]] = []
        for r in self.running:  # running first, in admission order
            if budget <= 0:
                break
            n = min(budget, r.prompt + r.out - r.computed)
            if r.out:
                decode_kv.append(r.computed)
            else:
                prefill.append((n, r.computed))
            plan.append((r, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.s.max_num_seqs:
            r = self.waiting.pop(0)
            n = min(budget, r.prompt - r.computed)
            prefill.append((n, r.computed))
            plan.append((r, n))
            self.running.append(r)
            budget -= n
        if not plan:
            return []
        self.plan, self.busy = plan, True
        step = self.ep.profile.step_seconds(StepBatch(tuple(decode_kv), tuple(prefill)))
        return [(now + step, None)]

    def fire(self, now: float, obj: object) -> list[_Req]:
        self.busy = False
        out = []
        for r, n in self.plan:
            r.computed += n
            if not r.gone and r.computed >= r.prompt + r.out:
                r.out += 1
                out.append(r)
        return out


def run(ep: SimEndpoint, probes: list[tuple[int, int, int]], max_tokens: int = 256
        ) -> list[ProbeRecord]:
    """``probes``: (prompt, concurrency, hold) each."""
    return [ep.probe(p, c, max_tokens, hold) for p, c, hold in probes]
