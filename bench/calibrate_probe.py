"""Probing an OpenAI-compatible endpoint for ``python -m bench calibrate``: what one probe sends,
when, and what it records.

A **probe** is one (prompt length, concurrency) cell. It is run like a microbenchmark through
the API, so that each thing it measures is one kind of engine step:

* ``C = 1`` (*alone*): one request at a time on an idle endpoint, finishing on its own after
  ``window + 2`` tokens, three times; after the first, the same prompt again (two tokens) to see
  the prefix cache. Gives the time to first token (TTFT) of a prompt alone, the decode step of
  one sequence, and a cached prefill.
* ``C >= 2`` (*burst*): ``C - 1`` background requests at once, each allowed far more tokens
  than the probe needs (the probe cancels them). Once every one of them streams (none is
  waiting for its first token), ``window`` decode steps of ``C - 1`` sequences are timed; then
  one foreground request is sent; the background stream's step that ends at the foreground's
  first token is the step that computed its prompt (the *mixed* step, for an engine that
  batches prefill with decodes); then ``window`` decode steps of ``C`` sequences. If instead
  requests stay waiting while the running ones decode ``plateau`` steps without anyone new
  starting, the endpoint **queues**: the number running is its batch limit, and the probe
  stops there. The probe with the most KV tokens (``hold``) keeps its streams until each has
  ``hold`` tokens, so the profile's KV-cache lower bound covers requests of that length.

The controller (:class:`ProbeController`) is pure: it reads a :class:`ProbeRecord` and a time
and answers with actions, so the HTTP runner here and a simulated engine in the tests drive
the same protocol. Times in records are seconds since the probe started, as measured (a
dilated endpoint's times are divided by its dilation later, in bench/calibrate_fit.py).

Token counts. Requests ask for ``stream_options: {include_usage, continuous_usage_stats}``
(vLLM 0.33.0: every chunk then carries the cumulative ``completion_tokens``, exact even when
the server merges tokens into one chunk; facts in
tests/contracts/data/vllm-0.33.0.streaming.json). Without per-chunk usage a content event
counts as one token, which the final usage of requests that finish on their own confirms or
refutes (:class:`Accounting`); without any usage it is an assumption, and the profile says so.

A request that the probe cancels is dropped by the endpoint: vLLM aborts a request whose client
disconnects (same facts file); our server frees the sequence when its stream is closed (a
request still queued for a slot is dropped when it reaches one, which is why each probe starts
after one short request has run to its end).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import httpx

from bench.client import SseParser

WINDOW = 8
"""Decode steps timed per window."""
PLATEAU = 16
"""Steps the running streams decode, with requests still waiting and nobody new starting,
before the probe calls it queueing (an engine batching prefills starts someone every step or
two while it has budget)."""
HOLD_TOKENS = 128
"""Tokens each stream of the largest probe reaches before it ends (the KV lower bound)."""
LONE_REPEATS = 3
SIZE_WORDS = 8
"""Words of the first sizing prompt (fits any context)."""
MAX_SIZE_WORDS = 320
"""Words of the second sizing prompt at most."""
MAX_TOKENS_TRIED = (384, 256, 192, 128, 96, 64, 48, 32, 16)
"""max_tokens of a background request, the first the endpoint accepts (it is cancelled long
before, normally; our server caps it at LLM_MAX_TOKENS, 256 by default)."""


# --- records --------------------------------------------------------------------------------


@dataclass
class StreamRecord:
    """One streamed request, as the client saw it."""

    role: str
    """``bg`` (background), ``fg`` (foreground), ``alone``, ``cached`` (a repeated prompt),
    ``settle``, ``size``."""
    prompt_tokens: int
    """Prompt tokens: the usage the endpoint reported, else the sizing estimate."""
    max_tokens: int
    prompt_key: int = 0
    """Requests with the same key sent the same prompt text."""
    prompt_exact: bool = False
    sent: float = 0.0
    tokens: list[tuple[float, int]] = field(default_factory=list)
    """(time, completion tokens so far) at every chunk that brought tokens."""
    ended: float | None = None
    outcome: str = "running"
    """``running``, ``finished`` (the server ended it), ``cancelled`` (the probe did),
    ``error``."""
    error: str | None = None
    content_events: int = 0
    chunk_usage: bool = False
    """The stream's chunks carried the cumulative completion tokens (continuous usage)."""
    usage_completion: int | None = None
    """Completion tokens in the final usage, when the server sent one."""

    @property
    def first(self) -> float | None:
        return self.tokens[0][0] if self.tokens else None

    @property
    def count(self) -> int:
        return self.tokens[-1][1] if self.tokens else 0

    def count_at(self, t: float) -> int:
        """Tokens received by time ``t``."""
        i = bisect.bisect_right(self.tokens, t, key=lambda x: x[0])
        return self.tokens[i - 1][1] if i else 0

    @property
    def live(self) -> bool:
        return self.outcome == "running"

    @property
    def pending(self) -> bool:
        """Sent, still open, no token yet."""
        return self.live and not self.tokens

    @property
    def streaming(self) -> bool:
        return self.live and bool(self.tokens)


@dataclass
class ProbeRecord:
    prompt: int
    """Target prompt tokens."""
    concurrency: int
    streams: list[StreamRecord] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    """Phase times: ``steady1``, ``fg_sent``, ``fg_first``, ``steady2``, ``last_start``,
    ``capped``, ``end``."""
    limit: int | None = None
    """Streams running when the probe saw requests queue behind them."""
    cut_short: str | None = None
    """Why the probe ended before its protocol did (deadline, request cap, errors)."""
    hold: int = 0

    @property
    def name(self) -> str:
        return probe_name(self.prompt, self.concurrency)

    def role(self, role: str) -> list[StreamRecord]:
        return [s for s in self.streams if s.role == role]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProbeRecord:
        streams = [StreamRecord(**{**s, "tokens": [tuple(t) for t in s["tokens"]]})
                   for s in data["streams"]]
        return cls(**{**data, "streams": streams})


def probe_name(prompt: int, concurrency: int) -> str:
    return f"prompt {prompt} x {concurrency} stream{'s' if concurrency > 1 else ''}"


# --- the protocol (pure) --------------------------------------------------------------------


class Send(NamedTuple):
    role: str
    count: int
    max_tokens: int
    reuse: int | None = None
    """Index of the stream whose prompt text to send again."""


class Stop(NamedTuple):
    reason: str = ""


Action = Send | Stop


class ProbeController:
    """The probe protocol as a state machine over a :class:`ProbeRecord` (see the module doc).

    ``start`` and ``update`` return the actions to take now; the driver sends requests (adding
    a :class:`StreamRecord` per request, in order), reports progress by calling ``update``, and
    on :class:`Stop` cancels whatever is still open.
    """

    def __init__(self, rec: ProbeRecord, max_tokens: int, window: int = WINDOW,
                 plateau: int = PLATEAU, lone_repeats: int = LONE_REPEATS) -> None:
        if window < 2 or plateau < 2:
            raise ValueError("window and plateau must be at least 2 steps")
        self.rec = rec
        self.max_tokens = max_tokens
        self.window = window
        self.plateau = plateau
        self.lone_repeats = lone_repeats
        self.phase = "new"
        self._mark = 0.0
        self._running: frozenset[int] = frozenset()

    def start(self, now: float) -> list[Action]:
        if self.rec.concurrency == 1:
            self.phase = "alone"
            return [Send("alone", 1, self.window + 2)]
        self.phase = "ramp"
        return [Send("bg", self.rec.concurrency - 1, self.max_tokens)]

    def update(self, now: float) -> list[Action]:
        if self.phase in ("new", "done"):
            return []
        if self.phase == "alone":
            return self._alone(now)
        return self._burst(now)

    def _stop(self, now: float, reason: str = "") -> list[Action]:
        self.phase = "done"
        self.rec.marks["end"] = now
        if reason and self.rec.cut_short is None:
            self.rec.cut_short = reason
        return [Stop(reason)]

    # C = 1: alone, cached, alone, alone
    def _alone(self, now: float) -> list[Action]:
        streams = self.rec.streams
        last = streams[-1]
        if last.live:
            return []
        if last.outcome == "error":
            return self._stop(now, f"a request failed: {last.error}")
        alone = self.rec.role("alone")
        if len(streams) == 1 and last.outcome == "finished":
            return [Send("cached", 1, 2, reuse=0)]
        if len(alone) < self.lone_repeats:
            return [Send("alone", 1, self.window + 2)]
        return self._stop(now)

    # C >= 2
    def _burst(self, now: float) -> list[Action]:
        rec = self.rec
        bg = rec.role("bg")
        fg = rec.role("fg")
        if not any(s.live for s in rec.streams):
            return self._stop(now, "every stream ended before the probe did")
        running = frozenset(i for i, s in enumerate(rec.streams) if s.streaming)
        starts = [s.first for s in rec.streams if s.first is not None]
        rec.marks["last_start"] = max(starts) if starts else 0.0
        if self.phase == "ramp":
            pending = [s for s in bg if s.pending]
            streaming = [s for s in bg if s.streaming]
            if not pending and streaming:
                return self._enter("steady1", now, running)
            if pending and streaming:
                since = rec.marks["last_start"]
                if self._steps_since(streaming, since) >= self.plateau:
                    rec.limit = len(streaming)
                    rec.marks["capped"] = now
                    return self._stop(now)
            if pending and not streaming and any(s.ended is not None for s in bg):
                # Some streams ended (errors) and the rest wait: nothing to time.
                failed = [s for s in bg if s.outcome == "error"]
                if failed:
                    return self._stop(now, f"{len(failed)} requests failed: {failed[0].error}")
            return []
        if running != self._running and self.phase in ("steady1", "steady2"):
            # A stream ended (or errored) inside a window: time a fresh one.
            return self._enter(self.phase, now, running)
        streams = [rec.streams[i] for i in running]
        if self.phase == "steady1":
            if self._steps_since(streams, self._mark) >= self.window:
                self.phase = "mixed"
                rec.marks["fg_sent"] = now
                return [Send("fg", 1, self.max_tokens)]
            return []
        if self.phase == "mixed":
            if fg and fg[0].first is not None:
                rec.marks["fg_first"] = fg[0].first
                return self._enter("steady2", now, running)
            if fg and not fg[0].live:
                return self._stop(now, f"the foreground request failed: {fg[0].error}")
            return []
        if self.phase == "steady2":
            held = all(s.count >= rec.hold for s in streams)
            if self._steps_since(streams, self._mark) >= self.window and held:
                return self._stop(now)
            return []
        return []

    def _enter(self, phase: str, now: float, running: frozenset[int]) -> list[Action]:
        self.phase = phase
        self._mark = now
        self._running = running
        self.rec.marks[phase] = now
        return []

    @staticmethod
    def _steps_since(streams: list[StreamRecord], since: float) -> float:
        """Median over ``streams`` of the tokens each received after ``since``."""
        if not streams:
            return 0.0
        return statistics.median(s.count - s.count_at(since) for s in streams)


# --- the probe plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedProbe:
    prompt: int
    concurrency: int
    hold: int = 0

    @property
    def requests(self) -> int:
        """Requests it sends at most, the settle request before it included."""
        return 1 + (1 + LONE_REPEATS if self.concurrency == 1 else self.concurrency)

    @property
    def weight(self) -> float:
        """Relative cost in engine steps, for sharing the time among probes: the steps its
        requests decode (alone: four requests of about ten tokens; a burst: two windows, the
        queueing wait and the hold) plus its prompts in steps of about 1,024 tokens."""
        if self.concurrency == 1:
            return float((1 + LONE_REPEATS) * (WINDOW + 2))
        return 2 * WINDOW + PLATEAU + self.hold + self.concurrency * self.prompt / 1024


@dataclass(frozen=True)
class Plan:
    probes: tuple[PlannedProbe, ...]
    seconds: float
    """Time for everything (probes and the fit)."""
    max_requests: int
    sizing_requests: int
    dropped: tuple[str, ...] = ()
    """What was left out to stay within the request cap, and why."""

    @property
    def requests(self) -> int:
        return self.sizing_requests + sum(p.requests for p in self.probes)

    def deadline(self, index: int, now: float, end: float) -> float:
        """When probe ``index`` must end if it starts at ``now`` with ``end`` the deadline of
        the probes: twice its share of the time left by weight, never past ``end``."""
        rest = sum(p.weight for p in self.probes[index:])
        share = (end - now) * self.probes[index].weight / rest
        return min(end, now + 2 * share)


SIZING_REQUESTS = 8
"""Requests the start may send: dialect fall-backs, the max_tokens check, two sizes."""
FIT_SECONDS = 10.0
"""Kept for the fit at the end of the time budget."""


def plan_probes(prompts: list[int], concurrency: list[int], minutes: float,
                max_requests: int, hold_tokens: int = HOLD_TOKENS) -> Plan:
    """The probes to run, lowest concurrency first (each level's prompts ascending), within
    ``max_requests``: the highest concurrency levels are dropped until the plan fits (and the
    plan says so). The time bound is enforced while running (:meth:`Plan.deadline`)."""
    if minutes <= 0:
        raise ValueError(f"--minutes must be positive, got {minutes:g}")
    if max_requests < 1:
        raise ValueError(f"--max-requests must be at least 1, got {max_requests}")
    levels = sorted(set(concurrency))
    sizes = sorted(set(prompts))
    dropped: list[str] = []
    while True:
        probes = [PlannedProbe(p, c) for c in levels for p in sizes]
        total = SIZING_REQUESTS + sum(p.requests for p in probes)
        if total <= max_requests or len(levels) == 1:
            break
        gone = levels.pop()
        dropped.append(f"concurrency {gone} (the plan needed {total} requests, the cap is "
                       f"{max_requests})")
    while total > max_requests and len(sizes) > 1:
        gone = sizes.pop()
        probes = [PlannedProbe(p, c) for c in levels for p in sizes]
        dropped.append(f"prompt {gone} (the plan needed {total} requests, the cap is "
                       f"{max_requests})")
        total = SIZING_REQUESTS + sum(p.requests for p in probes)
    if total > max_requests:
        raise ValueError(f"--max-requests {max_requests} cannot hold even one probe: "
                         f"{total} requests needed")
    bursts = [p for p in probes if p.concurrency > 1]
    if bursts and hold_tokens > 0:
        big = max(bursts, key=lambda p: (p.concurrency * p.prompt, p.concurrency))
        probes[probes.index(big)] = PlannedProbe(big.prompt, big.concurrency, hold_tokens)
    return Plan(tuple(probes), minutes * 60.0, max_requests, SIZING_REQUESTS, tuple(dropped))


# --- prompts --------------------------------------------------------------------------------

WORDS = (
    "river", "stone", "market", "window", "garden", "silver", "engine", "paper", "winter",
    "forest", "harbor", "lamp", "music", "orange", "planet", "signal", "tiger", "valley",
    "yellow", "bridge", "candle", "desert", "falcon", "island", "jacket", "kettle", "ladder",
    "meadow", "number", "pepper", "rocket", "sugar", "tunnel", "velvet", "wagon", "anchor",
    "basket", "cotton", "dragon", "feather", "guitar", "hammer", "insect", "jungle", "lemon",
    "mirror", "needle", "pocket", "rabbit", "saddle", "ticket", "violin", "walnut", "copper",
    "marble", "summer", "button", "circle", "pillow", "shadow", "spring", "thunder", "carpet",
    "cabinet", "blanket", "tomato", "puzzle", "castle", "station", "morning", "evening",
)
"""Common English words: one token each in the sim's tokenizer, about one in a BPE one."""


@dataclass
class Prompts:
    """Prompt texts of about a given number of tokens: ``tokens ~ base + per_word x words``,
    measured by sizing (each text starts with a unique tag, so no two prompts share a prefix
    block beyond the chat template)."""

    run: int
    base: float = 0.0
    per_word: float = 1.0
    exact: bool = False
    """base and per_word come from token counts the endpoint reported."""
    texts: list[str] = field(default_factory=list)

    def words_for(self, tokens: int) -> int:
        return max(1, round((tokens - self.base) / self.per_word))

    def estimate(self, words: int) -> int:
        return max(1, round(self.base + self.per_word * words))

    def make(self, words: int) -> tuple[int, str]:
        """(key, text): a new prompt of ``words`` words."""
        key = len(self.texts)
        rng = random.Random(f"{self.run}-{key}")
        body = " ".join(rng.choice(WORDS) for _ in range(words))
        self.texts.append(f"cal{self.run:05x}r{key:05d} {body}")
        return key, self.texts[key]


# --- the endpoint ---------------------------------------------------------------------------


class EndpointError(RuntimeError):
    """The endpoint cannot be calibrated (unreachable, key refused, no model...)."""


@dataclass
class Dialect:
    """What the endpoint accepts, found by trying (each fall-back is said in the notes)."""

    stream_options: dict[str, bool] | None = field(
        default_factory=lambda: {"include_usage": True, "continuous_usage_stats": True})
    ignore_eos: bool = True
    """vLLM's ``ignore_eos`` and ``min_tokens`` (sampling extensions), so that every request
    runs to its max_tokens."""
    max_tokens: int = MAX_TOKENS_TRIED[0]
    notes: list[str] = field(default_factory=list)

    def body(self, model: str, text: str, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}],
                                "max_tokens": max_tokens, "temperature": 0, "stream": True}
        if self.stream_options is not None:
            body["stream_options"] = dict(self.stream_options)
        if self.ignore_eos:
            body["ignore_eos"] = True
            body["min_tokens"] = max_tokens
        return body


@dataclass
class Accounting:
    """How token counts were obtained (said in the profile's notes)."""

    chunk_usage: bool = False
    final_usage: int = 0
    """Finished requests that reported completion tokens."""
    agree: int = 0
    """Of those, how many had one content event per token."""
    mismatches: list[str] = field(default_factory=list)

    def add(self, s: StreamRecord) -> None:
        self.chunk_usage = self.chunk_usage or s.chunk_usage
        if s.outcome == "finished" and s.usage_completion is not None:
            self.final_usage += 1
            if s.usage_completion == s.content_events:
                self.agree += 1
            elif len(self.mismatches) < 3:
                self.mismatches.append(f"{s.content_events} content events, "
                                       f"{s.usage_completion} tokens")

    def describe(self) -> str:
        if self.chunk_usage:
            return ("exact: every chunk carried the cumulative completion tokens "
                    "(stream_options.continuous_usage_stats)")
        if self.final_usage and self.agree == self.final_usage:
            return (f"one content event per token, confirmed by the final usage of "
                    f"{self.final_usage} requests that finished (stream_options.include_usage); "
                    "the endpoint sends no per-chunk usage")
        if self.final_usage:
            return (f"APPROXIMATE: content events counted as tokens, but the final usage "
                    f"disagreed on {self.final_usage - self.agree} of {self.final_usage} "
                    f"requests ({'; '.join(self.mismatches)})")
        return ("APPROXIMATE: the endpoint reported no usage in its streams "
                "(stream_options.include_usage unsupported): one content event is counted as "
                "one token, unverified")


@dataclass
class EndpointInfo:
    url: str
    model: str
    card: dict[str, Any]
    version: str | None
    max_model_len: int | None
    time_dilation: float
    dilation_source: str


def base_url(url: str) -> str:
    """``http://host:8000``, ``.../v1`` or ``.../v1/`` -> the API root ``.../v1``."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise EndpointError(f"--url must start with http:// or https://, got {url!r}")
    return url if url.endswith("/v1") else url + "/v1"


class Runner:
    """Sends the probes over HTTP and records them; every request counts against the cap."""

    def __init__(self, url: str, api_key: str | None, max_requests: int,
                 say: Callable[[str], None], transport: httpx.AsyncBaseTransport | None = None,
                 run: int | None = None) -> None:
        self.api = base_url(url)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.max_requests = max_requests
        self.sent = 0
        self.say = say
        self.dialect = Dialect()
        self.accounting = Accounting()
        self.prompts = Prompts(run if run is not None else random.randrange(1 << 20))
        self.model = ""
        limits = httpx.Limits(max_connections=4096, max_keepalive_connections=512)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0),
                                        limits=limits, transport=transport)

    async def close(self) -> None:
        await self.client.aclose()

    # discovery ---------------------------------------------------------------------------

    async def discover(self, model: str | None, dilation: float | None) -> EndpointInfo:
        try:
            r = await self.client.get(self.api + "/models", headers=self.headers)
        except httpx.HTTPError as exc:
            raise EndpointError(f"cannot reach {self.api}/models: {exc}") from None
        if r.status_code in (401, 403):
            raise EndpointError(f"{self.api}/models answered {r.status_code}: the API key was "
                                "refused (pass --api-key, or set OPENAI_API_KEY)")
        cards: list[dict[str, Any]] = []
        if r.status_code == 200:
            try:
                cards = [c for c in r.json().get("data", []) if isinstance(c, dict)]
            except (ValueError, AttributeError):
                cards = []
        if model is None:
            if not cards:
                raise EndpointError(f"{self.api}/models answered {r.status_code} with no model "
                                    "list: pass --model")
            model = str(cards[0].get("id"))
            if len(cards) > 1:
                self.say(f"  the endpoint serves {len(cards)} models; calibrating the first, "
                         f"{model} (--model picks another)")
        card = next((c for c in cards if c.get("id") == model), {})
        if cards and not card:
            raise EndpointError(f"model {model!r} is not served at {self.api} (served: "
                                f"{', '.join(str(c.get('id')) for c in cards)})")
        self.model = model
        version = None
        try:  # vLLM: GET /version (not under /v1, no key needed)
            v = await self.client.get(self.api.removesuffix("/v1") + "/version", timeout=5.0)
            if v.status_code == 200 and isinstance(v.json(), dict):
                version = str(v.json().get("version")) or None
        except (httpx.HTTPError, ValueError):
            version = None
        reported = card.get("time_dilation")
        if dilation is not None:
            factor, source = dilation, "--time-dilation"
        elif isinstance(reported, (int, float)) and reported > 0:
            factor, source = float(reported), "the endpoint's /v1/models card"
        else:
            factor, source = 1.0, "none reported (a real endpoint)"
        mml = card.get("max_model_len")
        return EndpointInfo(self.api, model, card, version,
                            int(mml) if isinstance(mml, (int, float)) else None, factor, source)

    # one request ---------------------------------------------------------------------------

    async def stream(self, rec: StreamRecord, body: dict[str, Any], t0: float,
                     changed: asyncio.Event | None = None) -> None:
        """POST one streaming chat completion and fill ``rec`` (times since ``t0``)."""
        if self.sent >= self.max_requests:
            rec.outcome, rec.error = "error", "request cap reached"
            rec.ended = time.monotonic() - t0
            return
        self.sent += 1
        parser = SseParser()
        rec.sent = time.monotonic() - t0
        try:
            async with self.client.stream("POST", self.api + "/chat/completions", json=body,
                                          headers=self.headers) as r:
                if r.status_code != 200:
                    text = (await r.aread())[:300].decode(errors="replace")
                    rec.outcome, rec.error = "error", f"HTTP {r.status_code}: {text}"
                    return
                async for data in r.aiter_raw():
                    now = time.monotonic() - t0
                    for payload in parser.feed(data):
                        _take(rec, payload, now)
                    if changed is not None:
                        changed.set()
            if rec.outcome == "running":
                rec.outcome = "finished"
        except asyncio.CancelledError:
            rec.outcome = "cancelled"
            raise
        except httpx.HTTPError as exc:
            rec.outcome, rec.error = "error", f"{type(exc).__name__}: {exc}"
        finally:
            rec.ended = time.monotonic() - t0
            self.accounting.add(rec)
            if changed is not None:
                changed.set()

    async def one(self, role: str, words: int, max_tokens: int,
                  body_override: dict[str, Any] | None = None) -> StreamRecord:
        key, text = self.prompts.make(words)
        rec = StreamRecord(role, self.prompts.estimate(words), max_tokens, key)
        body = body_override or self.dialect.body(self.model, text, max_tokens)
        await self.stream(rec, body, time.monotonic())
        return rec

    # sizing ------------------------------------------------------------------------------

    async def negotiate(self, max_model_len: int | None) -> None:
        """Find what the endpoint accepts (stream_options, ignore_eos, max_tokens) and how many
        tokens a prompt of N words is."""
        d = self.dialect
        small = SIZE_WORDS
        for attempt in range(4):
            rec = await self.one("size", small, 4)
            if rec.outcome == "finished" and rec.error is None:
                break
            status = (rec.error or "")[:8]
            if "HTTP 4" not in status or "HTTP 429" in status:
                raise EndpointError(f"a first request to {self.api}/chat/completions failed: "
                                    f"{rec.error}")
            if attempt == 0 and d.ignore_eos:
                d.ignore_eos = False
                d.notes.append("the endpoint refused ignore_eos/min_tokens (vLLM extensions): "
                               "a request may end before its max_tokens")
            elif d.stream_options and d.stream_options.get("continuous_usage_stats"):
                d.stream_options = {"include_usage": True}
                d.notes.append("the endpoint refused stream_options.continuous_usage_stats")
            elif d.stream_options is not None:
                d.stream_options = None
                d.notes.append("the endpoint refused stream_options: no usage in streams")
            else:
                raise EndpointError(f"{self.api}/chat/completions refuses a plain streaming "
                                    f"request: {rec.error}")
        else:
            raise EndpointError(f"no request form was accepted: {rec.error}")
        first = rec
        # The largest max_tokens accepted (our server caps it at LLM_MAX_TOKENS; a context too
        # small for the prompts is handled by the caller).
        tried = [n for n in MAX_TOKENS_TRIED
                 if max_model_len is None or n <= max(16, max_model_len // 4)]
        for n in tried:
            if await self._accepts_max_tokens(n):
                d.max_tokens = n
                break
        else:
            raise EndpointError(f"the endpoint refused every max_tokens tried ({tried})")
        # Two sizes: tokens = base + per_word x words; the second as large as the context
        # allows at the first one's tokens per word (at most MAX_SIZE_WORDS words).
        per = first.prompt_tokens / small if first.prompt_exact else 2.0
        large = MAX_SIZE_WORDS
        if max_model_len is not None:
            large = max(2 * small, min(large, int(0.8 * (max_model_len - 8) / per)))
        second = await self.one("size", large, 4)
        if second.outcome != "finished":
            raise EndpointError(f"a sizing request failed: {second.error}")
        p = self.prompts
        if first.prompt_exact and second.prompt_exact:
            p.per_word = (second.prompt_tokens - first.prompt_tokens) / (large - small)
            p.base = first.prompt_tokens - p.per_word * small
            p.exact = True
        else:
            sized = (await self._size_without_stream(small),
                     await self._size_without_stream(large))
            if None not in sized:
                a, b = sized
                assert a is not None and b is not None
                p.per_word = (b - a) / (large - small)
                p.base = a - p.per_word * small
                p.exact = True
                d.notes.append("prompt sizes from non-streaming usage (the streams carry none)")
            else:
                d.notes.append("the endpoint reports no prompt usage: prompt sizes ASSUMED at "
                               "one token per word")
        if p.per_word <= 0:
            raise EndpointError(f"prompt sizing failed: {first.prompt_tokens} tokens for "
                                f"{small} words, {second.prompt_tokens} for {large}")

    async def _accepts_max_tokens(self, n: int) -> bool:
        key, text = self.prompts.make(8)
        rec = StreamRecord("size", self.prompts.estimate(8), n, key)
        t0 = time.monotonic()
        task = asyncio.create_task(self.stream(rec, self.dialect.body(self.model, text, n), t0))
        while not task.done() and not rec.tokens:
            await asyncio.sleep(0.005)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return rec.error is None or "HTTP 4" not in rec.error

    async def _size_without_stream(self, words: int) -> int | None:
        if self.sent >= self.max_requests:
            return None
        self.sent += 1
        _, text = self.prompts.make(words)
        body = {"model": self.model, "messages": [{"role": "user", "content": text}],
                "max_tokens": 1}
        try:
            r = await self.client.post(self.api + "/chat/completions", json=body,
                                       headers=self.headers)
            usage = r.json().get("usage") if r.status_code == 200 else None
            return int(usage["prompt_tokens"]) if isinstance(usage, dict) else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    # a probe -----------------------------------------------------------------------------

    async def settle(self) -> None:
        """One short request run to its end: the endpoint has finished with what the last
        probe cancelled (a server may only drop a queued request when it reaches it)."""
        await self.one("settle", 8, 1)

    async def probe(self, planned: PlannedProbe, max_tokens: int, deadline: float,
                    window: int = WINDOW, plateau: int = PLATEAU) -> ProbeRecord:
        # A stream must be able to reach the hold and still have tokens left for the windows.
        rec = ProbeRecord(planned.prompt, planned.concurrency,
                          hold=min(planned.hold, max_tokens // 2))
        ctl = ProbeController(rec, max_tokens, window, plateau)
        changed = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        words = self.prompts.words_for(planned.prompt)
        t0 = time.monotonic()

        def act(actions: list[Action]) -> bool:
            for a in actions:
                if isinstance(a, Stop):
                    return True
                for _ in range(a.count):
                    if a.reuse is not None:
                        key = rec.streams[a.reuse].prompt_key
                        text = self.prompts.texts[key]
                        tokens = rec.streams[a.reuse].prompt_tokens
                    else:
                        key, text = self.prompts.make(words)
                        tokens = self.prompts.estimate(words)
                    s = StreamRecord(a.role, tokens, a.max_tokens, key)
                    rec.streams.append(s)
                    body = self.dialect.body(self.model, text, a.max_tokens)
                    tasks.append(asyncio.create_task(self.stream(s, body, t0, changed)))
            return False

        try:
            stop = act(ctl.start(0.0))
            while not stop:
                now = time.monotonic()
                if now >= deadline:
                    rec.cut_short = rec.cut_short or "the probe's share of --minutes ran out"
                    rec.marks["end"] = now - t0
                    break
                changed.clear()
                stop = act(ctl.update(now - t0))
                if stop:
                    break
                try:
                    await asyncio.wait_for(changed.wait(), timeout=min(0.25, deadline - now))
                except TimeoutError:
                    pass
                # The streams of one engine step arrive together: read them all before the
                # next decision (the timestamps are the streams' own, not the controller's).
                await asyncio.sleep(0.002)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return rec


def _take(rec: StreamRecord, payload: bytes, now: float) -> None:
    """One SSE payload of a chat completion stream."""
    if payload == b"[DONE]":
        if rec.outcome == "running":
            rec.outcome = "finished"
        return
    try:
        obj = json.loads(payload)
    except ValueError:
        return
    if not isinstance(obj, dict):
        return
    if "error" in obj:
        err = obj["error"]
        rec.outcome = "error"
        rec.error = str(err.get("message") if isinstance(err, dict) else err)[:300]
        return
    usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else None
    if usage is not None and isinstance(usage.get("prompt_tokens"), int):
        rec.prompt_tokens = usage["prompt_tokens"]
        rec.prompt_exact = True
    choices = obj.get("choices") or []
    if not choices:
        if usage is not None and isinstance(usage.get("completion_tokens"), int):
            rec.usage_completion = usage["completion_tokens"]
        return
    choice = choices[0] if isinstance(choices[0], dict) else {}
    delta = choice.get("delta") or {}
    content = isinstance(delta, dict) and (
        any(isinstance(v, str) and v for k, v in delta.items() if k != "role")
        or bool(delta.get("tool_calls")))
    finish = choice.get("finish_reason")
    completion = usage.get("completion_tokens") if usage is not None else None
    if isinstance(completion, int) and finish is None:
        rec.chunk_usage = True
    if content:
        rec.content_events += 1
    count = rec.count
    if rec.chunk_usage and isinstance(completion, int):
        new = max(count, completion)
    else:
        new = count + 1 if content else count
    if new > count:
        rec.tokens.append((now, new))
    if finish is not None and isinstance(completion, int):
        rec.usage_completion = completion
