"""Seeded workload traces: Poisson arrivals, heavy-tailed lengths, optional multi-turn sessions.

Everything here is pure and deterministic for a given seed, so every policy replays the very
same requests. Lengths are log-normal, as measured on ShareGPT-like chat logs (a median of a few
dozen output tokens with a tail of hundreds), and capped.

Standalone requests: each prompt is a single user message of random one-token words, so no two
prompts share a prefix. Sessions (``sessions=True``): a conversation starts at a Poisson
arrival, opens with its own long context (a system message: the document or instructions it is
about) and sends ``turns`` requests, each after the previous one's planned reply plus an
exponential think time; every turn resends the whole history (the previous answers are stood in
for by text of their length, since a trace is fixed before any reply exists) and carries the
session id (header ``X-Session-ID``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from server.engines.sim import sim_chat_prompt, sim_tokenize


@dataclass(frozen=True)
class LogNormal:
    median: float
    sigma: float
    low: int
    high: int

    def draw(self, rng: random.Random) -> int:
        x = rng.lognormvariate(math.log(self.median), self.sigma)
        return max(self.low, min(self.high, round(x)))


@dataclass(frozen=True)
class Workload:
    prompt: LogNormal = LogNormal(median=150, sigma=0.7, low=8, high=1024)
    """Prompt (user message) tokens of a standalone request."""
    output: LogNormal = LogNormal(median=40, sigma=1.4, low=1, high=384)
    """Output tokens (`max_tokens`; the sim always generates exactly that many)."""
    sessions: bool = False
    context: LogNormal = LogNormal(median=1200, sigma=0.5, low=256, high=4000)
    """Sessions: tokens of the per-session context that opens every turn."""
    user_turn: LogNormal = LogNormal(median=40, sigma=0.8, low=4, high=400)
    """Sessions: tokens of each new user message."""
    turns_mean: float = 4.0
    """Sessions: mean turns per conversation (geometric, at most ``turns_max``)."""
    turns_max: int = 8
    think_mean_s: float = 3.0
    """Sessions: mean pause after a reply before the next turn (exponential)."""
    reply_s_per_token: float = 0.04
    """Sessions: planning estimate of a reply's duration, to place the next turn after it."""

    def requests_per_session(self, rng_seed: int = 0, n: int = 20_000) -> float:
        rng = random.Random(rng_seed)
        return sum(self._turns(rng) for _ in range(n)) / n

    def _turns(self, rng: random.Random) -> int:
        p = 1 / self.turns_mean
        k = 1
        while k < self.turns_max and rng.random() > p:
            k += 1
        return k


@dataclass(frozen=True)
class Request:
    index: int
    arrival: float
    """Seconds after the trace starts."""
    messages: tuple[dict[str, str], ...]
    max_tokens: int
    prompt_tokens: int
    """Sim tokens of the rendered chat prompt (what the server will count)."""
    session: str | None = None
    turn: int = 0


@dataclass(frozen=True)
class Trace:
    rate: float
    duration: float
    seed: int
    workload: Workload
    requests: tuple[Request, ...] = field(repr=False)

    @property
    def mean_output_tokens(self) -> float:
        return sum(r.max_tokens for r in self.requests) / max(1, len(self.requests))


def _words(rng: random.Random, n: int) -> str:
    # Every word is one sim token (a run of word characters); random, so prompts never share
    # a prefix by accident.
    return " ".join(f"w{rng.getrandbits(40):x}" for _ in range(n))


def poisson_arrivals(rate: float, duration: float, rng: random.Random) -> list[float]:
    """Arrival times of a Poisson process of ``rate`` per second within ``[0, duration)``."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    out, t = [], rng.expovariate(rate)
    while t < duration:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def generate(rate: float, duration: float, seed: int, workload: Workload = Workload(),
             max_model_len: int | None = None) -> Trace:
    """A trace of about ``rate`` requests/s over ``duration`` seconds.

    With sessions, conversations start at ``rate / mean turns`` per second, so requests still
    arrive at about ``rate`` once the first conversations are under way. Requests that would
    arrive after ``duration`` are dropped. ``max_model_len`` caps prompt + output.
    """
    rng = random.Random(seed)
    items: list[tuple[float, list[dict[str, str]], int, str | None, int]] = []
    if not workload.sessions:
        for t in poisson_arrivals(rate, duration, rng):
            msg = [{"role": "user", "content": _words(rng, workload.prompt.draw(rng))}]
            items.append((t, msg, workload.output.draw(rng), None, 0))
    else:
        per_session = workload.requests_per_session(seed)
        for s, start in enumerate(poisson_arrivals(rate / per_session, duration, rng)):
            sid = f"s{seed}-{s}"
            history = [{"role": "system", "content": _words(rng, workload.context.draw(rng))}]
            t = start
            for turn in range(workload._turns(rng)):
                if t >= duration:
                    break
                history = history + [{"role": "user",
                                      "content": _words(rng, workload.user_turn.draw(rng))}]
                out = workload.output.draw(rng)
                items.append((t, history, out, sid, turn))
                history = history + [{"role": "assistant", "content": _words(rng, out)}]
                t += out * workload.reply_s_per_token + rng.expovariate(1 / workload.think_mean_s)
    items.sort(key=lambda it: it[0])
    requests = []
    for i, (t, msgs, out, sid, turn) in enumerate(items):
        n_prompt = len(sim_tokenize(sim_chat_prompt(msgs)))
        if max_model_len is not None:
            out = max(1, min(out, max_model_len - n_prompt - 8))
        requests.append(Request(i, t, tuple(msgs), out, n_prompt, sid, turn))
    return Trace(rate, duration, seed, workload, tuple(requests))
