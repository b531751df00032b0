"""Dispatchers of the discrete-event model (bench/des.py) beyond one NGINX with a plain method.

* :class:`Picker`: NGINX's choice per request on its counts of requests in flight (round robin,
  least_conn, random two least_conn): the plain dispatchers of ``des.DISPATCHERS``.
* :class:`Nginx`: K NGINX instances over the same replicas (the client sends each request to
  one of them at random, as a cloud load balancer spreading connections over controller pods
  would), each with its own counts; and the session methods, ``session_hash`` and
  ``session_hash_bounded``, as nginx 1.22.1's ``hash ... consistent`` does them (a ring of 160
  CRC32 points per server; a replica at its ``max_conns`` is skipped for the next point; after
  20 points, or with no session key, smooth weighted round robin skipping full replicas; every
  replica full: local mode's spill upstream, least_conn without a bound, where the controller
  would answer 502).
* :class:`Epp`: the Gateway API Inference Extension's endpoint picker at v1.5.0, as its chart
  configures it (facts: tests/contracts/data/gateway-api-inference-extension-1.5.0.json):
  scorers queue x2, KV-cache utilization x2, prefix cache x3 over metrics scraped from every
  replica every 50 ms (each on its own phase; every decision between two scrapes of a replica
  sees the same numbers), the prefix scorer's approximate index (the prompt text's JSON cut
  into blocks of 16 x 4 characters, chained hashes seeded with the model name, at most 256
  blocks; per replica an LRU of the hashes it was sent, capacity ``num_gpu_blocks``), max-score
  picker with random ties. Optionally flow control (the feature gate): one FCFS queue in the
  EPP, a dispatch cycle at every arrival and every 1 ms that sends the head on only while the
  utilization detector's pool saturation (mean over replicas of max(waiting / 5, KV use / 0.8),
  from the same scraped metrics) is below 1. ``path_header=False`` models NGINX Gateway Fabric
  without ``X-Forwarded-Path``: the EPP refuses every chat request and the data plane falls
  back to ``random two least_conn`` over the pool on its own counts.

What a replica reports (:class:`View`): ``waiting`` is vLLM's ``num_requests_waiting`` (slots
replicas: requests queued for a slot), ``kv_usage`` vLLM's ``kv_cache_usage_perc`` (slots
replicas have no KV cache; a slots engine reserves one sequence's KV per slot, so the proxy is
busy slots / slots), ``cache_blocks`` the ``num_gpu_blocks`` label of ``vllm:cache_config_info``
(None: not exported, the EPP then uses its default LRU size).

Pure and deterministic for a seed, like the rest of the model.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import json
import math
import random
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

PLAIN_METHODS = ("round_robin", "least_conn", "random_two_least_conn")
SESSION_METHODS = ("session_hash", "session_hash_bounded")
NGINX_METHODS = PLAIN_METHODS + SESSION_METHODS


class Picker:
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


# --- what a dispatcher sees of the replicas -------------------------------------------------


class View(Protocol):
    replicas: int
    capacity: int
    """Sequences a replica runs at once (slots, or max_num_seqs)."""
    cache_blocks: int | None
    """vllm:cache_config_info's num_gpu_blocks; None where the engine does not export it."""
    block_size: int | None
    """vllm:cache_config_info's block_size; None where the engine does not export it."""

    def in_flight(self, r: int) -> int: ...

    def waiting(self, r: int) -> int: ...

    def kv_usage(self, r: int) -> float: ...


class Router(Protocol):
    """A dispatcher with state of its own. The simulation calls ``arrive`` for every request,
    ``at(next_time())`` when that comes first, and ``done`` when a request leaves its replica
    (its last token); each returns the (job, replica) pairs to send now."""

    all_full: int

    def arrive(self, j: int, t: float) -> list[tuple[int, int]]: ...

    def next_time(self) -> float: ...

    def at(self, t: float) -> list[tuple[int, int]]: ...

    def done(self, j: int, r: int) -> None: ...

    def busy(self) -> bool: ...


# --- NGINX: K instances, session hash ---------------------------------------------------------


@dataclass(frozen=True)
class Nginx:
    method: str
    instances: int = 1
    """NGINX instances (controller pods); each counts only the requests it sent."""
    bound_factor: float = 1.25
    """session_hash_bounded: max_conns = ceil(bound_factor x capacity / instances)."""
    spill: bool = True
    """Every replica at its bound: local mode's spill upstream (least_conn, no bound); False:
    the request is lost (the controller's 502), counted in ``Result.all_full`` and given no
    latency."""

    def __post_init__(self) -> None:
        if self.method not in NGINX_METHODS:
            raise ValueError(f"Nginx.method must be one of {', '.join(NGINX_METHODS)}, got "
                             f"{self.method!r}")
        if self.instances < 1:
            raise ValueError(f"Nginx.instances must be at least 1, got {self.instances}")
        if not self.bound_factor > 0:
            raise ValueError(f"Nginx.bound_factor must be > 0, got {self.bound_factor}")

    @property
    def label(self) -> str:
        bound = f"*{self.bound_factor:g}" if self.method == "session_hash_bounded" else ""
        return f"{self.method}{bound}" + (f" x{self.instances}" if self.instances > 1 else "")


def chash_ring(servers: Sequence[str]) -> tuple[list[int], list[int]]:
    """nginx 1.22.1's consistent-hash ring (ngx_http_upstream_init_chash): 160 points per
    server (weight 1), point j = crc32(HOST \\0 PORT prev_hash) with prev_hash the point before
    (little-endian, 0 first); sorted; equal hashes kept once. Returns (hashes, server index)."""
    points: list[tuple[int, int]] = []
    for idx, name in enumerate(servers):
        host, sep, port = name.rpartition(":")
        if not sep or not port.isdigit():
            host, port = name, ""
        base = zlib.crc32(host.encode() + b"\0" + port.encode())
        prev = 0
        for _ in range(160):
            h = zlib.crc32(prev.to_bytes(4, "little"), base)
            points.append((h, idx))
            prev = h
    points.sort(key=lambda p: p[0])
    hashes, owners = [], []
    for h, idx in points:
        if not hashes or hashes[-1] != h:
            hashes.append(h)
            owners.append(idx)
    return hashes, owners


class _Instance:
    def __init__(self, n: int, method: str, seed: int) -> None:
        self.counts = [0] * n
        self.spill_counts = [0] * n
        self.picker = Picker(method if method in PLAIN_METHODS else "least_conn", n, seed)
        self.spill = Picker("least_conn", n, seed)
        self.weights = [0] * n
        """Smooth weighted round robin's current_weight per replica (weights all 1)."""

    def round_robin(self, bound: int | None) -> int | None:
        """ngx_http_upstream_get_peer with equal weights, skipping replicas at ``bound``."""
        best, total, cw, counts = None, 0, self.weights, self.counts
        for i in range(len(cw)):
            if bound is not None and counts[i] >= bound:
                continue
            cw[i] += 1
            total += 1
            if best is None or cw[i] > cw[best]:
                best = i
        if best is not None:
            cw[best] -= total
        return best


class NginxRouter:
    def __init__(self, spec: Nginx, jobs: Sequence[Any], view: View, seed: int,
                 servers: Sequence[str] | None = None) -> None:
        n = view.replicas
        self.spec = spec
        self.jobs = jobs
        self.n = n
        self._rng = random.Random(seed)
        self.instances = [_Instance(n, spec.method, seed * 7919 + k) for k in range(spec.instances)]
        self.bound = (max(1, math.ceil(round(spec.bound_factor * view.capacity / spec.instances, 6)))
                      if spec.method == "session_hash_bounded" else None)
        names = servers or [f"10.{seed % 251}.{i // 250}.{i % 250 + 2}:8000" for i in range(n)]
        self.ring, self.owner = chash_ring(names)
        self.sent: dict[int, tuple[int, bool]] = {}
        """job -> (instance, spilled)."""
        self.all_full = 0
        self.lost: set[int] = set()

    def arrive(self, j: int, t: float) -> list[tuple[int, int]]:
        k = self._rng.randrange(len(self.instances)) if len(self.instances) > 1 else 0
        inst = self.instances[k]
        if self.spec.method in PLAIN_METHODS:
            r = inst.picker.pick(inst.counts.__getitem__)
        else:
            r = self._hash(inst, getattr(self.jobs[j], "session", None))
            if r is None:
                self.all_full += 1
                if not self.spec.spill:
                    self.lost.add(j)
                    return []
                r = inst.spill.pick(inst.spill_counts.__getitem__)
                inst.spill_counts[r] += 1
                self.sent[j] = (k, True)
                return [(j, r)]
        inst.counts[r] += 1
        self.sent[j] = (k, False)
        return [(j, r)]

    def _hash(self, inst: _Instance, key: str | None) -> int | None:
        """ngx_http_upstream_get_chash_peer: the key's point, then the next points while the
        replica there is at its bound, at most 20 more; else round robin within the bound."""
        if not key or self.n == 1:
            return inst.round_robin(self.bound)
        ring, owner, bound, counts = self.ring, self.owner, self.bound, inst.counts
        i = bisect.bisect_left(ring, zlib.crc32(key.encode()))
        for _ in range(21):
            r = owner[i % len(ring)]
            if bound is None or counts[r] < bound:
                return r
            i += 1
        return inst.round_robin(bound)

    def done(self, j: int, r: int) -> None:
        k, spilled = self.sent.pop(j)
        inst = self.instances[k]
        if spilled:
            inst.spill_counts[r] -= 1
        else:
            inst.counts[r] -= 1

    def next_time(self) -> float:
        return math.inf

    def at(self, t: float) -> list[tuple[int, int]]:
        return []

    def busy(self) -> bool:
        return False


# --- the endpoint picker ----------------------------------------------------------------------


@dataclass(frozen=True)
class EppConfig:
    """The EPP v1.5.0 defaults the model uses; tests/contracts/test_epp_model.py holds each to
    the facts file (gateway-api-inference-extension-1.5.0.json)."""

    queue_weight: float = 2.0
    kv_cache_weight: float = 2.0
    prefix_weight: float = 3.0
    poll_s: float = 0.05
    """Metrics refresh interval (--refresh-metrics-interval)."""
    block_tokens: int = 16
    """Prefix block size in tokens when the replicas do not export vllm:cache_config_info."""
    chars_per_token: int = 4
    max_prefix_blocks: int = 256
    lru_capacity: int = 31250
    """Hashes per replica in the prefix index when num_gpu_blocks is not exported."""
    queue_depth_threshold: int = 5
    kv_cache_util_threshold: float = 0.8
    metrics_staleness_s: float = 0.2
    dispatch_tick_s: float = 0.001
    """Flow control: a dispatch cycle at every arrival and every tick."""
    usage_limit: float = 1.0
    """Flow control: the static usage-limit policy's ceiling for the one priority band."""


@dataclass(frozen=True)
class Epp:
    config: EppConfig = field(default_factory=EppConfig)
    flow_control: bool = False
    path_header: bool = True
    """False: NGINX Gateway Fabric without X-Forwarded-Path; every chat request is refused by
    the EPP and falls back to the data plane's random two least_conn."""
    fallback_instances: int = 2
    """NGINX Gateway Fabric data-plane pods (each counts its own fallback requests)."""

    @property
    def label(self) -> str:
        if not self.path_header:
            return "EPP via NGF, no path header (fallback)"
        return "EPP + flow control" if self.flow_control else "EPP"


def epp_prompt_text(messages: Sequence[dict[str, str]]) -> bytes:
    """What the EPP hashes of a chat request: Go's json.Marshal of the messages (compact,
    role then content)."""
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in messages],
                      separators=(",", ":"), ensure_ascii=False).encode()


def epp_block_hashes(text: bytes, model: str, config: EppConfig = EppConfig(),
                     block_tokens: int | None = None) -> tuple[int, ...]:
    """The approximate prefix producer's hashes of a prompt (hashing.go at v1.5.0): blocks of
    ``block_tokens x chars_per_token`` bytes, at most ``max_prefix_blocks``, each hashed with the
    hash before it, the first seeded with the model name; a prompt shorter than one block has
    none. (xxhash upstream; a 64-bit BLAKE2 here: only equality matters.)"""
    size = (block_tokens or config.block_tokens) * config.chars_per_token
    if len(text) < size:
        return ()
    text = text[:config.max_prefix_blocks * size]
    prev = hashlib.blake2b(model.encode(), digest_size=8).digest()
    out = []
    for i in range(0, len(text) - size + 1, size):
        prev = hashlib.blake2b(text[i:i + size] + prev, digest_size=8).digest()
        out.append(int.from_bytes(prev, "little"))
    return tuple(out)


READS = {"waiting": "vllm:num_requests_waiting", "kv_usage": "vllm:kv_cache_usage_perc",
         "cache_blocks": "vllm:cache_config_info"}
"""The metric each View field stands for (what the EPP scrapes from a vLLM pod)."""


class EppRouter:
    def __init__(self, spec: Epp, jobs: Sequence[Any], view: View, seed: int,
                 phases: Sequence[float] | None = None) -> None:
        """``phases``: each replica's first scrape (default: uniform within one interval)."""
        c = spec.config
        n = view.replicas
        self.spec, self.c, self.jobs, self.view, self.n = spec, c, jobs, view, n
        block = view.block_size or c.block_tokens
        if block != c.block_tokens:
            raise ValueError(f"the jobs' EPP hashes assume blocks of {c.block_tokens} tokens; "
                             f"the replicas report {block}")
        self._rng = random.Random(seed)
        self.q = [0] * n
        self.kv = [0.0] * n
        self.scraped = [0.0] * n
        """The last scrape of each replica (the pool ran before the trace: idle at 0)."""
        if phases is None:
            phases = [self._rng.uniform(0.0, c.poll_s) for _ in range(n)]
        self._polls = [(phases[i], i) for i in range(n)]
        heapq.heapify(self._polls)
        self.lru_capacity = view.cache_blocks or c.lru_capacity
        self.lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(n)]
        self.index: dict[int, int] = {}
        """hash -> bit mask of the replicas whose LRU holds it."""
        self.queue: deque[int] = deque()
        self._tick = math.inf
        self._remaining = len(jobs)
        self.all_full = 0
        self.fallback = (None if spec.path_header else
                         NginxRouter(Nginx("random_two_least_conn", spec.fallback_instances),
                                     jobs, view, seed))

    # metrics --------------------------------------------------------------------------------

    def saturation(self, t: float) -> float:
        """The utilization detector: mean over replicas of max(waiting / queue threshold,
        KV use / KV threshold); a replica scraped longer ago than the staleness limit counts 1."""
        c, total = self.c, 0.0
        for i in range(self.n):
            if t - self.scraped[i] > c.metrics_staleness_s:
                total += 1.0
            else:
                total += max(self.q[i] / c.queue_depth_threshold,
                             self.kv[i] / c.kv_cache_util_threshold)
        return total / self.n

    def next_time(self) -> float:
        poll = self._polls[0][0] if (self._remaining or self.queue) else math.inf
        return min(poll, self._tick)

    def busy(self) -> bool:
        return bool(self.queue)

    def at(self, t: float) -> list[tuple[int, int]]:
        if self._polls[0][0] <= self._tick:
            _, i = heapq.heappop(self._polls)
            self.q[i] = self.view.waiting(i)
            self.kv[i] = self.view.kv_usage(i)
            self.scraped[i] = t
            heapq.heappush(self._polls, (t + self.c.poll_s, i))
            if self.queue and self._tick == math.inf and self.saturation(t) < self.c.usage_limit:
                self._arm(t)
            return []
        self._tick = math.inf
        out = self._cycle(t)
        if self.queue and out:
            self._arm(t)
        return out

    def _arm(self, t: float) -> None:
        """The next tick of the 1 ms dispatch ticker after ``t``."""
        step = self.c.dispatch_tick_s
        self._tick = (math.floor(t / step + 1e-9) + 1) * step

    def _cycle(self, t: float) -> list[tuple[int, int]]:
        """One dispatch cycle: the queue's head goes to the scheduler unless the pool is
        saturated (head-of-line blocking)."""
        if not self.queue or self.saturation(t) >= self.c.usage_limit:
            return []
        j = self.queue.popleft()
        return [(j, self.pick(j))]

    # requests -------------------------------------------------------------------------------

    def arrive(self, j: int, t: float) -> list[tuple[int, int]]:
        self._remaining -= 1
        if self.fallback is not None:
            return self.fallback.arrive(j, t)
        if not self.spec.flow_control:
            return [(j, self.pick(j))]
        self.queue.append(j)
        out = self._cycle(t)
        if self.queue and out and self._tick == math.inf:
            self._arm(t)
        return out

    def done(self, j: int, r: int) -> None:
        if self.fallback is not None:
            self.fallback.done(j, r)

    def scores(self, hashes: Sequence[int]) -> list[float]:
        """Every replica's weighted score for a prompt with these block hashes (on the last
        scraped metrics), summed scorer by scorer as the scheduler profile does."""
        c, n = self.c, self.n
        lo, hi = min(self.q), max(self.q)
        matched = [0] * n
        index = self.index
        for h in hashes:
            mask = index.get(h)
            if not mask:
                break
            for i in range(n):
                if mask >> i & 1:
                    matched[i] += 1
        total = len(hashes)
        out = []
        for i in range(n):
            queue = 1.0 if hi == lo else (hi - self.q[i]) / (hi - lo)
            kv = 1.0 - self.kv[i]
            prefix = matched[i] / total if total else 0.0
            s = 0.0
            s += _clamp(queue) * c.queue_weight
            s += _clamp(kv) * c.kv_cache_weight
            s += _clamp(prefix) * c.prefix_weight
            out.append(s)
        return out

    def pick(self, j: int) -> int:
        hashes = getattr(self.jobs[j], "epp_hashes", None) or ()
        scores = self.scores(hashes)
        order = list(range(self.n))
        self._rng.shuffle(order)  # max-score picker: shuffle, stable sort, first
        best = max(order, key=scores.__getitem__)
        if hashes:
            self._record(best, hashes)
        return best

    def _record(self, r: int, hashes: Sequence[int]) -> None:
        """PreRequest: the request's hashes into the chosen replica's LRU (golang-lru: an
        existing key moves to the front; beyond capacity the oldest is evicted)."""
        lru, index, bit, cap = self.lru[r], self.index, 1 << r, self.lru_capacity
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                index[h] = index.get(h, 0) | bit
                if len(lru) > cap:
                    old, _ = lru.popitem(last=False)
                    left = index[old] & ~bit
                    if left:
                        index[old] = left
                    else:
                        del index[old]


def _clamp(x: float) -> float:
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else x


def make_router(spec: Nginx | Epp, jobs: Sequence[Any], view: View, seed: int) -> Router:
    if isinstance(spec, Nginx):
        return NginxRouter(spec, jobs, view, seed)
    return EppRouter(spec, jobs, view, seed)
