"""Step-level scheduling of one continuous-batching engine, as vLLM 0.33.0's v1 scheduler does it.

Pure and deterministic (no asyncio, no I/O, no clock): the sim engine's GPU regime
(server/engines/sim_batched.py) runs it in real time and the discrete-event model (bench/des.py)
runs it in simulated time, so the two cannot disagree about who runs when. Every rule below is
read from vLLM at the pinned tag and kept, with its file and line, in
tests/contracts/data/vllm-0.33.0.scheduler.json; the contract tests hold this module to it.

One engine step (:meth:`Scheduler.plan_step`, then the caller runs the step for
``step_seconds(plan.batch)``, then :meth:`Scheduler.finish_step`):

* **Running first.** Requests already running are scheduled in admission order, each for all the
  tokens it has not computed yet (1 for a decoding sequence, the rest of its prompt for one still
  prefilling), capped by ``long_prefill_token_threshold`` (0: no cap; not applied when only one
  request is eligible), by what is left of the step's token budget ``max_num_batched_tokens``, and
  by ``max_model_len``. The loop stops when the budget is spent.
* **KV blocks.** The KV cache is ``kv_cache_tokens // block_size`` blocks. A request holds
  ``ceil(tokens in its KV / block_size)`` blocks; a step that needs more takes them from the
  free queue. When too few are free, the *newest* running request (the last of the running list)
  is preempted, repeatedly, until the allocation fits or the request preempted itself.
* **Preemption is recompute.** A preempted request frees all its blocks, forgets its computed
  tokens and goes to the *front* of the waiting queue; when readmitted it prefills its prompt and
  the tokens it already generated again (whatever the prefix cache still holds is a hit).
* **Then waiting, only if nobody was preempted this step**, strictly first come first served,
  while budget is left and fewer than ``max_num_seqs`` requests run. At admission the prefix
  cache is looked up: the longest run of cached *whole* blocks from the prompt's start, at most
  ``num_tokens - 1`` tokens (the last token is always computed, for its logits). The request is
  admitted only if the free blocks hold its *whole* input sequence (``scheduler_reserve_full_isl``,
  on by default) and this step's chunk; otherwise the queue stops there (head-of-line blocking).
  Its first chunk is what is left of the budget (chunked prefill).
* **Tokens.** At the end of a step every scheduled request whose computed tokens reached its
  known tokens samples one token: the first after the last prefill chunk (time to first token),
  one per step after that. A request finishes when it has ``max_tokens`` tokens or reaches
  ``max_model_len``; its blocks return to the free queue then.
* **Prefix cache.** A block is hashed (made reusable) once it is full and its tokens are known,
  prompt and generated tokens alike; hashes chain, so a block only hits after the same prefix.
  Freed blocks stay cached until reused: blocks without a hash go to the front of the free queue
  (reused first), hashed ones to the back in least-recently-used order, a request's tail before
  its head. Taking a free block evicts whatever it cached.

Not modelled, with reasons in docs/gpu-regime.md: async scheduling (vLLM 0.33.0 plans step k+1
while step k runs: an arrival waits for one more step boundary, ≤ one step of TTFT), speculative
decoding, the priority policy, LoRA, multimodal inputs, KV connectors and sliding-window layers.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.engines.steps import StepBatch

# vLLM 0.33.0 defaults (tests/contracts/data/vllm-0.33.0.scheduler.json has each one's source).
DEFAULT_BLOCK_SIZE = 16
"""CacheConfig.DEFAULT_BLOCK_SIZE: tokens per KV-cache block when --block-size is not given."""
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
"""`vllm serve`'s per-step token budget on a GPU of >= 70 GiB other than an A100 (H100, H200)."""
DEFAULT_MAX_NUM_SEQS = 1024
"""`vllm serve`'s --max-num-seqs on the same GPUs (our stacks pass model.maxConcurrency)."""

# Request states.
WAITING, RUNNING, PREEMPTED, FINISHED, ABORTED = range(5)

_UNIQUE: Any = object()
"""The hash of a full block whose tokens no other request can share (the caller gave no keys
for it): it is never looked up, but it is a cached block for the free queue's eviction order."""


@dataclass(frozen=True)
class SchedulerConfig:
    """One engine's scheduling limits; the defaults are `vllm serve`'s on an H100/H200."""

    kv_cache_tokens: int
    """Tokens the KV cache holds (usable blocks × block_size; vLLM sizes it from the GPU memory
    left after the weights, and holds back one more block as its null block)."""
    max_model_len: int
    """Prompt plus completion tokens of one request, at most."""
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    """Requests running (admitted into the batch) at once."""
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    """Tokens one step computes at most (decodes count one each)."""
    block_size: int = DEFAULT_BLOCK_SIZE
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0
    """A prefill chunk's cap when several requests are eligible; 0: no cap."""
    reserve_full_isl: bool = True
    """Admit a waiting request only if its whole input sequence fits in the free blocks."""
    watermark: float = 0.0
    """Share of the blocks kept free when admitting waiting or preempted requests."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("kv_cache_tokens", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                     "block_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.long_prefill_token_threshold < 0:
            problems.append("long_prefill_token_threshold must be >= 0 (0: no cap), got "
                            f"{self.long_prefill_token_threshold}")
        if not 0.0 <= self.watermark < 1.0:
            problems.append(f"watermark must be in [0, 1), got {self.watermark}")
        if problems:
            raise ValueError("; ".join(problems))
        # vLLM refuses these configurations at startup (config/scheduler.py, kv_cache_planning.py).
        if self.max_num_batched_tokens < self.max_num_seqs:
            problems.append(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                            f"max_num_seqs ({self.max_num_seqs})")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            problems.append(f"without chunked prefill max_num_batched_tokens "
                            f"({self.max_num_batched_tokens}) must be >= max_model_len "
                            f"({self.max_model_len})")
        if self.long_prefill_token_threshold > self.max_model_len:
            problems.append(f"long_prefill_token_threshold ({self.long_prefill_token_threshold}) "
                            f"must be <= max_model_len ({self.max_model_len})")
        if self.num_blocks < -(-self.max_model_len // self.block_size):
            problems.append(f"kv_cache_tokens ({self.kv_cache_tokens}) must hold one request of "
                            f"max_model_len ({self.max_model_len}) tokens")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def num_blocks(self) -> int:
        return self.kv_cache_tokens // self.block_size


def block_keys(token_ids: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE) -> list[int]:
    """Chained keys of the full blocks of ``token_ids``: block ``i``'s key depends on every token
    up to its end, so equal keys mean an equal prefix (vLLM hashes blocks the same way)."""
    keys, h = [], 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = hash((h, tuple(token_ids[start:start + block_size])))
        keys.append(h)
    return keys


class Seq:
    """One request as the scheduler sees it."""

    __slots__ = ("prompt_len", "max_tokens", "keys", "data", "num_tokens", "num_computed",
                 "num_output", "blocks", "num_hashed", "status", "num_preemptions")

    def __init__(self, prompt_len: int, max_tokens: int, keys: Sequence[Hashable] | None = None,
                 data: Any = None) -> None:
        if prompt_len < 1 or max_tokens < 1:
            raise ValueError(f"a request needs at least one prompt token and max_tokens >= 1, "
                             f"got prompt {prompt_len}, max_tokens {max_tokens}")
        self.prompt_len = prompt_len
        self.max_tokens = max_tokens
        self.keys = keys
        """Keys of the full blocks of the request's tokens (prompt, then the tokens it will
        generate, as far as the caller knows them; see :func:`block_keys`). None: its tokens are
        its own, no other request shares a block with it."""
        self.data = data
        """The caller's: what to deliver a token to."""
        self.num_tokens = prompt_len
        """Tokens known: the prompt plus every token sampled so far."""
        self.num_computed = 0
        """Tokens in the KV cache (computed, or found in the prefix cache)."""
        self.num_output = 0
        self.blocks: list[int] = []
        self.num_hashed = 0
        """Leading blocks of ``blocks`` that carry a hash (are in the prefix cache)."""
        self.status = WAITING
        self.num_preemptions = 0

    @property
    def finished(self) -> bool:
        return self.status >= FINISHED

    def __repr__(self) -> str:
        return (f"Seq(prompt={self.prompt_len}, max_tokens={self.max_tokens}, "
                f"computed={self.num_computed}, output={self.num_output}, status={self.status})")


@dataclass(frozen=True)
class StepPlan:
    """What one step computes: the requests scheduled, in order, and the batch to time."""

    seqs: list[Seq]
    batch: StepBatch
    preempted: list[Seq] = field(default_factory=list)
    """Requests preempted (recompute) while planning this step."""
    decoding: int = 0
    """How many of the first ``seqs`` are known to decode (the shortcut's share)."""
    covers_running: bool = False
    """Every request running when the step was planned is in it."""
    aborts: int = 0

    @property
    def empty(self) -> bool:
        return not self.seqs


@dataclass(frozen=True)
class StepOutput:
    emitted: list[Seq]
    """Requests that received one token this step (``num_output == 1``: their first)."""
    finished: list[Seq]
    """Requests that received their last token (a subset of ``emitted``)."""


class Scheduler:
    """The running and waiting requests, KV blocks and prefix cache of one engine."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_size = config.block_size
        n = config.num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(n))
        """Free blocks, the next to be taken first (cached ones stay here until taken)."""
        self._ref = [0] * n
        self._hash: list[Hashable | None] = [None] * n
        self._cached: dict[Hashable, int] = {}
        self._caching = config.enable_prefix_caching
        self._watermark_blocks = int(config.watermark * n)
        self.running: list[Seq] = []
        self.waiting: deque[Seq] = deque()
        self.fast = True
        """Take the shortcut for steps where every running request decodes (same result; the
        tests compare both ways)."""
        self._all_decoding = False
        """Every running request is decoding: one token to compute, one sampled already."""
        self._aborts = 0
        self.steps = 0
        self.preemptions = 0
        self.lookups = 0
        self.lookup_tokens = 0
        self.hit_tokens = 0

    # --- requests ---------------------------------------------------------------------------

    def add(self, seq: Seq) -> None:
        """Queue a new request (it is considered at the next :meth:`plan_step`)."""
        if seq.prompt_len >= self.config.max_model_len:
            raise ValueError(f"prompt of {seq.prompt_len} tokens does not fit max_model_len "
                             f"{self.config.max_model_len}")
        seq.status = WAITING
        self.waiting.append(seq)

    def abort(self, seq: Seq) -> None:
        """Drop a request (its consumer went away); frees its blocks. Idempotent."""
        if seq.status == RUNNING:
            self.running.remove(seq)
            self._free_blocks(seq)
            self._aborts += 1
        elif seq.status in (WAITING, PREEMPTED):
            self.waiting.remove(seq)
        if not seq.finished:
            seq.status = ABORTED

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def kv_usage(self) -> float:
        """Share of the blocks held by requests (vLLM's vllm:kv_cache_usage_perc)."""
        n = self.config.num_blocks
        return 1.0 - len(self._free) / n

    @property
    def cached_tokens(self) -> int:
        return len(self._cached) * self.block_size

    # --- one step ---------------------------------------------------------------------------

    def plan_step(self) -> StepPlan:
        """Schedule one step: running requests first, then waiting ones (see the module doc)."""
        c = self.config
        bs = self.block_size
        budget = c.max_num_batched_tokens
        running = self.running
        waiting = self.waiting
        threshold = c.long_prefill_token_threshold if len(running) + len(waiting) > 1 else 0
        max_len = c.max_model_len
        free = self._free
        seqs: list[Seq] = []
        decode_kv: list[int] = []
        prefill: list[tuple[int, int]] = []
        preempted: list[Seq] = []

        i = 0
        decoding = 0
        if self._all_decoding and self.fast and running:
            # Every running request computes one token (max_num_batched_tokens >= max_num_seqs:
            # the budget holds them all); the one whose KV fills its last block needs a new one.
            full_blocks = [q for q in running if not q.num_computed % bs]
            if len(full_blocks) <= len(free):
                if full_blocks:
                    self._take_one_each(full_blocks)
                decode_kv = [q.num_computed for q in running]
                for q in running:
                    q.num_computed += 1
                if self._caching:  # blocks whose last token this step computes
                    self._hash_last_block([q for q in running if not q.num_computed % bs])
                seqs = running[:]
                i = decoding = len(running)
                budget -= decoding
        while i < len(running) and budget > 0:
            seq = running[i]
            comp = seq.num_computed
            n = seq.num_tokens - comp
            if 0 < threshold < n:
                n = threshold
            if n > budget:
                n = budget
            if n > max_len - comp - 1:
                n = max_len - comp - 1
            if n <= 0:
                i += 1
                continue
            need = (comp + n + bs - 1) // bs - len(seq.blocks)
            if need > 0:
                while need > len(free):
                    victim = running.pop()  # FCFS: the newest running request
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is seq:
                        break
                if seq.status != RUNNING:
                    break  # it preempted itself: nothing more runs this step
                self._take(seq, need)
            comp_after = comp + n
            seq.num_computed = comp_after
            if self._caching and comp_after // bs > seq.num_hashed:
                self._hash_full_blocks(seq, comp_after // bs)
            if n == 1 and seq.num_output and comp_after == seq.num_tokens:
                decode_kv.append(comp)
            else:
                prefill.append((n, comp))
            seqs.append(seq)
            budget -= n
            i += 1
        covers_running = i >= len(running) and len(seqs) == len(running)

        if not preempted:
            while budget > 0 and waiting and len(running) < c.max_num_seqs:
                seq = waiting[0]
                hits = self._lookup(seq) if self._caching else []
                hit_tokens = len(hits) * bs
                n = seq.num_tokens - hit_tokens
                if 0 < threshold < n:
                    n = threshold
                if not c.enable_chunked_prefill and n > budget:
                    break
                if n > budget:
                    n = budget
                ref = self._ref
                evictable = sum(1 for b in hits if ref[b] == 0)
                reserve = self._watermark_blocks if running else 0
                if c.reserve_full_isl:
                    full = (min(seq.num_tokens, max_len) + bs - 1) // bs
                    if full - len(hits) + evictable + reserve > len(free):
                        break
                need = (hit_tokens + n + bs - 1) // bs - len(hits)
                if need + evictable + reserve > len(free):
                    break
                waiting.popleft()
                for b in hits:
                    if ref[b] == 0:
                        del free[b]
                    ref[b] += 1
                seq.blocks = hits
                seq.num_hashed = len(hits)
                self._take(seq, need)
                if seq.num_preemptions == 0:
                    self.lookups += 1
                    self.lookup_tokens += seq.num_tokens
                    self.hit_tokens += hit_tokens
                seq.status = RUNNING
                running.append(seq)
                comp_after = hit_tokens + n
                seq.num_computed = comp_after
                if self._caching and comp_after // bs > seq.num_hashed:
                    self._hash_full_blocks(seq, comp_after // bs)
                if n == 1 and seq.num_output and comp_after == seq.num_tokens:
                    decode_kv.append(hit_tokens)
                else:
                    prefill.append((n, hit_tokens))
                seqs.append(seq)
                budget -= n

        if seqs:
            self.steps += 1
        return StepPlan(seqs, StepBatch(tuple(decode_kv), tuple(prefill)), preempted, decoding,
                        covers_running, self._aborts)

    def finish_step(self, plan: StepPlan) -> StepOutput:
        """The step ran: sample one token for every request whose prefill is complete."""
        max_len = self.config.max_model_len
        seqs = plan.seqs
        k = plan.decoding if plan.aborts == self._aborts else 0
        emitted: list[Seq] = seqs[:k]
        finished: list[Seq] = []
        for seq in emitted:  # decoding, and none aborted during the step
            out = seq.num_output + 1
            seq.num_output = out
            total = seq.num_tokens + 1
            seq.num_tokens = total
            if out >= seq.max_tokens or total >= max_len:
                finished.append(seq)
        partial = False
        for seq in seqs[k:] if k else seqs:
            if seq.status != RUNNING:
                continue  # aborted during the step
            if seq.num_computed < seq.num_tokens:
                partial = True  # a prefill chunk that is not the last
                continue
            seq.num_output += 1
            seq.num_tokens += 1
            emitted.append(seq)
            if seq.num_output >= seq.max_tokens or seq.num_tokens >= max_len:
                finished.append(seq)
        self._all_decoding = plan.covers_running and not partial
        if finished:
            for seq in finished:
                seq.status = FINISHED
                self._free_blocks(seq)
            self.running = [s for s in self.running if s.status == RUNNING]
        return StepOutput(emitted, finished)

    # --- KV blocks --------------------------------------------------------------------------

    def _lookup(self, seq: Seq) -> list[int]:
        """Blocks of the longest cached prefix, whole blocks, at most num_tokens - 1 tokens."""
        keys = seq.keys
        if not keys:
            return []
        cached = self._cached
        hits = []
        for idx in range(min(len(keys), (seq.num_tokens - 1) // self.block_size)):
            b = cached.get(keys[idx])
            if b is None:
                break
            hits.append(b)
        return hits

    def _take(self, seq: Seq, n: int) -> None:
        """Give ``seq`` ``n`` blocks from the front of the free queue (evicting their hashes)."""
        free, ref, hashes, cached = self._free, self._ref, self._hash, self._cached
        blocks = seq.blocks
        for _ in range(n):
            b = free.popitem(last=False)[0]
            h = hashes[b]
            if h is not None:
                if h is not _UNIQUE and cached.get(h) == b:
                    del cached[h]
                hashes[b] = None
            ref[b] = 1
            blocks.append(b)

    def _take_one_each(self, seqs: list[Seq]) -> None:
        """:meth:`_take` of one block for each of ``seqs``, in order."""
        free, ref, hashes, cached = self._free, self._ref, self._hash, self._cached
        for seq in seqs:
            b = free.popitem(last=False)[0]
            h = hashes[b]
            if h is not None:
                if h is not _UNIQUE and cached.get(h) == b:
                    del cached[h]
                hashes[b] = None
            ref[b] = 1
            seq.blocks.append(b)

    def _hash_last_block(self, seqs: list[Seq]) -> None:
        """Hash the last block of each of ``seqs`` (decoding requests it just filled)."""
        hashes, cached = self._hash, self._cached
        for seq in seqs:
            idx = seq.num_hashed
            b = seq.blocks[idx]
            keys = seq.keys
            if keys and idx < len(keys):
                key = keys[idx]
                hashes[b] = key
                if key not in cached:
                    cached[key] = b
            else:
                hashes[b] = _UNIQUE
            seq.num_hashed = idx + 1

    def _hash_full_blocks(self, seq: Seq, full: int) -> None:
        """Hash ``seq``'s blocks up to ``full`` (blocks whose tokens are all known)."""
        full = min(full, seq.num_tokens // self.block_size)
        keys = seq.keys
        known = len(keys) if keys else 0
        hashes, cached, blocks = self._hash, self._cached, seq.blocks
        for idx in range(seq.num_hashed, full):
            b = blocks[idx]
            if idx < known:
                key = keys[idx]  # type: ignore[index]
                hashes[b] = key
                if key not in cached:
                    cached[key] = b
            else:
                hashes[b] = _UNIQUE
        if full > seq.num_hashed:
            seq.num_hashed = full

    def _free_blocks(self, seq: Seq) -> None:
        """Return ``seq``'s blocks: tail first; unhashed ones to the front of the free queue,
        hashed ones (still cached) to the back."""
        free, ref, hashes = self._free, self._ref, self._hash
        front: list[int] = []
        for b in reversed(seq.blocks):
            r = ref[b] - 1
            ref[b] = r
            if r == 0:
                if hashes[b] is None or not self._caching:
                    front.append(b)
                else:
                    free[b] = None
        for b in reversed(front):
            free[b] = None
            free.move_to_end(b, last=False)
        seq.blocks = []
        seq.num_hashed = 0

    def _preempt(self, seq: Seq) -> None:
        self._free_blocks(seq)
        seq.num_computed = 0
        seq.status = PREEMPTED
        seq.num_preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def stats(self) -> dict[str, int]:
        """Prefix-cache counters (the sim engine's model card carries them for the benchmark)."""
        return {"capacity_tokens": self.config.num_blocks * self.block_size,
                "block_tokens": self.block_size, "cached_tokens": self.cached_tokens,
                "lookups": self.lookups, "lookup_tokens": self.lookup_tokens,
                "hit_tokens": self.hit_tokens, "preemptions": self.preemptions}
