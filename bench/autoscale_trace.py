"""Time-varying open-loop traces for the autoscaling benchmark (seeded, pure).

A `Shape` is a sequence of phases, each with a length in *trace* seconds (the uncompressed
clock: what the traffic would look like in production) and a request rate that goes linearly
from `start` to `end`, in multiples of one replica's measured capacity. `build` turns a shape
into requests on the wall clock of a run compressed by `factor`: arrivals come `factor` times
sooner, the rate (requests per wall second) is the capacity multiple times the capacity.
Requests are drawn like `bench.trace`'s standalone workload (no shared prefixes).

Arrivals are a non-homogeneous Poisson process, sampled by thinning (Lewis and Shedler):
candidates at the peak rate, each kept with probability rate(t) / peak.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from bench.trace import Request, Workload, _words
from server.engines.sim import sim_chat_prompt, sim_tokenize


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    """Length on the trace (uncompressed) clock."""
    start: float
    """Offered rate at the start, in replicas' worth of capacity."""
    end: float

    def rate_at(self, fraction: float) -> float:
        return self.start + (self.end - self.start) * fraction


@dataclass(frozen=True)
class Shape:
    name: str
    phases: tuple[Phase, ...]

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.phases)

    def load_at(self, t: float) -> float:
        """Offered load (replicas' worth) at trace second `t`."""
        for phase, begin in zip(self.phases, self.starts()):
            if t < begin + phase.seconds:
                return phase.rate_at((t - begin) / phase.seconds)
        return self.phases[-1].end

    def phase_at(self, t: float) -> str:
        for phase, begin in zip(self.phases, self.starts()):
            if t < begin + phase.seconds:
                return phase.name
        return self.phases[-1].name

    def starts(self) -> list[float]:
        out, t = [], 0.0
        for phase in self.phases:
            out.append(t)
            t += phase.seconds
        return out

    @property
    def peak(self) -> float:
        return max(max(p.start, p.end) for p in self.phases)


SURGE = Shape("surge", (
    Phase("quiet", 600, 0.5, 0.5),
    Phase("surge", 900, 2.5, 2.5),
    Phase("after", 900, 0.5, 0.5),
))
"""Quiet at half a replica's capacity, a step to 2.5x for 15 minutes, quiet again."""

RAMP = Shape("ramp", (
    Phase("quiet", 300, 0.5, 0.5),
    Phase("ramp up", 900, 0.5, 2.5),
    Phase("ramp down", 600, 2.5, 0.5),
    Phase("after", 600, 0.5, 0.5),
))
"""The same peak reached slowly: 15 minutes up, 10 down."""

SHAPES = {s.name: s for s in (SURGE, RAMP)}


@dataclass(frozen=True)
class TimedTrace:
    shape: Shape
    factor: float
    capacity: float
    """One replica's capacity, requests per wall second."""
    requests: tuple[Request, ...]

    @property
    def wall_seconds(self) -> float:
        return self.shape.seconds / self.factor

    def phase_of(self, wall_t: float) -> str:
        return self.shape.phase_at(wall_t * self.factor)

    def phase_start(self, name: str) -> float:
        """Wall second at which phase `name` begins."""
        for phase, begin in zip(self.shape.phases, self.shape.starts()):
            if phase.name == name:
                return begin / self.factor
        raise KeyError(name)


CHAT_TEMPLATE_TOKENS = len(sim_tokenize(sim_chat_prompt([{"role": "user", "content": ""}])))
"""Sim tokens the chat template adds around one user message (every word is one token)."""


def build(shape: Shape, factor: float, capacity: float, seed: int,
          workload: Workload = Workload(), texts: bool = True) -> TimedTrace:
    """Requests of `shape` compressed by `factor`, for replicas of `capacity` requests/s.

    ``texts=False`` draws the very same requests without writing their prompts (``messages``
    empty, ``prompt_tokens`` as counted with them): what a discrete-event model needs, in a
    fraction of the time."""
    if factor <= 0 or capacity <= 0:
        raise ValueError("factor and capacity must be positive")
    rng = random.Random(seed)
    wall = shape.seconds / factor
    peak = shape.peak * capacity
    arrivals, t = [], rng.expovariate(peak)
    while t < wall:
        if rng.random() * peak < shape.load_at(t * factor) * capacity:
            arrivals.append(t)
        t += rng.expovariate(peak)
    requests = []
    bits = rng.getrandbits
    for i, arrival in enumerate(arrivals):
        words = workload.prompt.draw(rng)
        if texts:
            messages: tuple[dict[str, str], ...] = (
                {"role": "user", "content": _words(rng, words)},)
            prompt_tokens = len(sim_tokenize(sim_chat_prompt(list(messages))))
        else:
            for _ in range(words):  # the draws _words makes, without the text
                bits(40)
            messages, prompt_tokens = (), words + CHAT_TEMPLATE_TOKENS
        requests.append(Request(i, arrival, messages, workload.output.draw(rng), prompt_tokens))
    return TimedTrace(shape, factor, capacity, tuple(requests))
