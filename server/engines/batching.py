"""The engine-wide step loop: every running sequence advances in one forward pass per step.

One thread owns the model. Each iteration of its loop is one *step*:

1. take new requests and cancellations (requests arrive from the event loop through a deque;
   a cancelled or finished sequence frees its slot at this boundary);
2. **prefill** waiting sequences, if any and a slot is free: their prompts go through the model
   in one right-padded forward (at most ``prefill_tokens`` padded prompt tokens per step, and
   always at least one prompt), each sampling its first token;
3. **decode**: one forward over every running sequence (the ones just prefilled included), one
   new token each, sampled on the device (:mod:`server.engines.sampling`);
4. hand the tokens, already detokenised, to the event loop in one callback per pass (the
   first tokens of new sequences right after their prefill, the rest after the decode).

Sequences join and leave only at step boundaries (continuous batching). Prefill is separate from
decode, not chunked: on a CPU a step's time grows with the tokens it computes whichever way
they are split, and on a GPU a separate prefill keeps the decode step's shapes fixed so it can
be replayed as a CUDA graph; the ``prefill_tokens`` budget bounds how long one prefill stalls
the running streams.

The KV cache (:class:`~server.engines.slot_cache.SlotKVCache`) gives each running sequence a
slot; running sequences are kept packed in slots ``0..n-1`` so a decode step reads one
contiguous block. On CUDA with ``cuda_graphs`` the decode step is captured once per
``(batch bucket, width bucket)`` (powers of two) and replayed; the padding rows of a bucket
write only into a scratch slot. A capture that fails turns graphs off with a warning (eager
steps are correct, just slower). Sampling stays outside the graph (each request draws from its
own generator).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.engines.base import SamplingParams, Token
from server.engines.sampling import IncrementalDetokenizer, sample
from server.engines.slot_cache import SlotKVCache

_log = logging.getLogger(__name__)

Deliver = Callable[[list[tuple["Sequence", Any]]], None]
"""Called from the step thread with one step's ``(sequence, Token or exception)`` pairs of the
sequences that share it; it must hand them over to their consumer thread-safely."""


@dataclass(eq=False)
class Sequence:
    """One request's state in the step loop."""

    prompt: list[int]
    params: SamplingParams
    deliver: Deliver
    consumer: Any = None
    """Opaque, for ``deliver`` (the asyncio side keeps its queue here)."""
    generator: Any = None
    detok: IncrementalDetokenizer | None = None
    slot: int = -1
    length: int = 0
    """Tokens in the KV cache."""
    last: int = 0
    """The token to feed at the next decode step."""
    produced: int = 0
    cancelled: bool = False
    done: bool = False


@dataclass
class StepStats:
    prefill_steps: int = 0
    prefill_tokens: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0
    max_batch: int = 0
    graphs: int = 0
    busy_seconds: float = 0.0
    decode_seconds: float = 0.0
    errors: int = 0

    def as_dict(self) -> dict[str, Any]:
        mean = self.decode_tokens / self.decode_steps if self.decode_steps else 0.0
        return {"prefill_steps": self.prefill_steps, "prefill_tokens": self.prefill_tokens,
                "decode_steps": self.decode_steps, "decode_tokens": self.decode_tokens,
                "mean_decode_batch": round(mean, 2), "max_decode_batch": self.max_batch,
                "cuda_graphs_captured": self.graphs, "busy_seconds": round(self.busy_seconds, 3),
                "decode_seconds": round(self.decode_seconds, 3), "step_errors": self.errors}


def _bucket(n: int, floor: int, cap: int) -> int:
    b = floor
    while b < n:
        b *= 2
    return min(b, cap)


@dataclass
class _Graph:
    graph: Any
    ids: Any
    positions: Any
    rows: Any
    pos: Any
    mask: Any
    logits: Any


@dataclass
class StepLoop:
    """The step thread and its sequences. ``model`` is a transformers causal LM in eval mode."""

    torch: Any
    model: Any
    tokenizer: Any
    slots: int
    context: int
    eos: frozenset[int]
    cache_arg: str = "cache"
    prefill_tokens: int = 512
    """Padded prompt tokens one prefill step may compute (one prompt always fits)."""
    cuda_graphs: bool = False
    initial_capacity: int = 256
    """Positions per slot allocated at start; the cache doubles when a sequence needs more."""
    bucketed: bool = False
    """Decode at bucketed shapes (powers of two) even without graphs; tests use it on CPU to run
    the exact path a CUDA-graph replay takes."""
    stats: StepStats = field(default_factory=StepStats)

    def __post_init__(self) -> None:
        torch = self.torch
        cfg = self.model.config.get_text_config()
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.bucketed = self.bucketed or self.cuda_graphs
        # One slot more than sequences: the scratch row that bucket padding writes into.
        self.cache = SlotKVCache(torch, cfg.num_hidden_layers, self.slots + 1, kv_heads,
                                 head_dim, self.dtype, self.device,
                                 capacity=min(self.context, self.initial_capacity),
                                 max_capacity=self.context)
        self._scratch = self.slots
        self._neg = torch.finfo(self.dtype).min
        self._incoming: collections.deque[Sequence] = collections.deque()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._rows: list[Sequence] = []
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool: Any = None
        self._out: list[tuple[Sequence, Any]] = []
        self._logits_seen: list[Any] | None = None

    # --- control (any thread) ---------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llm-step-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, seq: Sequence) -> None:
        self._incoming.append(seq)
        self._wake.set()

    def cancel(self, seq: Sequence) -> None:
        """Free ``seq``'s slot at the next step boundary (no-op once it is done)."""
        seq.cancelled = True
        self._wake.set()

    @property
    def running(self) -> int:
        return len(self._rows)

    def check_against_model(self, prompt: list[int], steps: int = 3) -> float:
        """Greedy-decode ``steps`` tokens of ``prompt`` through the batched path, and recompute
        each step's logits with the model's own forward (no cache, its own mask); return the
        largest difference relative to the largest reference logit. Call before :meth:`start`.

        A model whose attention does not go through ``cache.update`` and the given 4D mask
        (see the module docstring of :mod:`server.engines.slot_cache`) fails this check.
        """
        torch = self.torch
        got: list[tuple[Sequence, Any]] = []
        seq = Sequence(prompt=list(prompt), params=SamplingParams(max_tokens=steps,
                                                                  temperature=0.0),
                       deliver=got.extend, detok=IncrementalDetokenizer(self.tokenizer))
        self._logits_seen = []
        try:
            with torch.inference_mode():
                self.submit(seq)
                while not seq.done:
                    self.step()
            ours = self._logits_seen
        finally:
            self._logits_seen = None
        for _, item in got:
            if isinstance(item, BaseException):
                raise item
        assert seq.detok is not None
        fed = list(prompt) + seq.detok.ids
        worst = 0.0
        with torch.inference_mode():
            for k, logits in enumerate(ours):
                ids = torch.tensor([fed[: len(prompt) + k]], device=self.device)
                ref = self.model(input_ids=ids, use_cache=False).logits[0, -1].float()
                scale = ref.abs().max().clamp_min(1e-6)
                worst = max(worst, float((logits[0] - ref).abs().max() / scale))
        return worst

    # --- the loop (step thread) -------------------------------------------------------------

    def _run(self) -> None:
        with self.torch.inference_mode():
            while not self._stop:
                if not (self._incoming or self._waiting or self._rows):
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                self.step()
        err = RuntimeError("the engine stopped")
        for seq in [*self._rows, *self._waiting, *self._incoming]:
            self._fail(seq, err)
        self._rows.clear()
        self._waiting.clear()
        self._incoming.clear()
        self._flush()

    def step(self) -> None:
        """One step: admit, prefill, decode, deliver. Runs on the step thread (or a test's)."""
        t0 = time.perf_counter()
        while self._incoming:
            self._waiting.append(self._incoming.popleft())
        for seq in [s for s in self._rows if s.cancelled]:
            self._release(seq)
        if any(s.cancelled for s in self._waiting):
            self._waiting = collections.deque(s for s in self._waiting if not s.cancelled)
        batch = self._admit()
        if batch:
            try:
                self._prefill(batch)
            except Exception as exc:
                self._failed(batch, exc)
            self._flush()  # first tokens go out now, not after the decode step
        if self._rows:
            t1 = time.perf_counter()
            try:
                self._decode()
            except Exception as exc:
                self._failed(list(self._rows), exc)
            self.stats.decode_seconds += time.perf_counter() - t1
        self.stats.busy_seconds += time.perf_counter() - t0
        self._flush()

    def _failed(self, seqs: list[Sequence], exc: Exception) -> None:
        """A forward pass failed: fail the sequences it computed (not the server, nor the
        sequences of the other pass of this step)."""
        _log.error("engine step failed for %d sequence(s)", len(seqs), exc_info=exc)
        self.stats.errors += 1
        for seq in seqs:
            if seq.done:
                continue
            if seq.slot >= 0:
                self._release(seq)
            self._fail(seq, exc)

    def _admit(self) -> list[Sequence]:
        batch: list[Sequence] = []
        longest = 0
        while self._waiting and len(self._rows) + len(batch) < self.slots:
            nxt = self._waiting[0]
            width = max(longest, len(nxt.prompt))
            if batch and (len(batch) + 1) * width > self.prefill_tokens:
                break
            batch.append(self._waiting.popleft())
            longest = width
        return batch

    # --- prefill ----------------------------------------------------------------------------

    def _prefill(self, batch: list[Sequence]) -> None:
        torch = self.torch
        m = len(batch)
        width = max(len(s.prompt) for s in batch)
        if self.cache.grow(width + 1):
            self._graphs.clear()
        first = len(self._rows)
        for i, seq in enumerate(batch):
            seq.slot = first + i
            self._rows.append(seq)
        ids = torch.zeros((m, width), dtype=torch.long)
        for i, seq in enumerate(batch):
            ids[i, : len(seq.prompt)] = torch.tensor(seq.prompt, dtype=torch.long)
        ids = ids.to(self.device)
        positions = torch.arange(width, device=self.device).unsqueeze(0).expand(m, width)
        causal = torch.ones((width, width), dtype=torch.bool, device=self.device).tril()
        mask = torch.zeros((1, 1, width, width), dtype=self.dtype, device=self.device)
        mask.masked_fill_(~causal, self._neg)
        last = torch.tensor([[len(s.prompt) - 1] for s in batch], device=self.device)
        slots = torch.tensor([s.slot for s in batch], device=self.device)
        self.cache.for_prefill(slots, width)
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask,
                         use_cache=True, logits_to_keep=last, **{self.cache_arg: self.cache})
        logits = out.logits[:, -1].float()
        for seq in batch:
            seq.length = len(seq.prompt)
        self.stats.prefill_steps += 1
        self.stats.prefill_tokens += sum(len(s.prompt) for s in batch)
        self._emit(batch, self._sample(batch, logits))

    # --- decode -----------------------------------------------------------------------------

    def _decode(self) -> None:
        rows = self._rows
        n = len(rows)
        width = max(s.length for s in rows) + 1
        if self.cache.grow(width):
            self._graphs.clear()
        if self.bucketed:
            logits = self._decode_bucketed(rows, width)
        else:
            logits = self._decode_eager(rows, width)
        for seq in rows:
            seq.length += 1
        self.stats.decode_steps += 1
        self.stats.decode_tokens += n
        self.stats.max_batch = max(self.stats.max_batch, n)
        self._emit(list(rows), self._sample(rows, logits))

    def _decode_inputs(self, rows: list[Sequence]) -> tuple[Any, Any]:
        torch = self.torch
        ids = torch.tensor([[s.last] for s in rows], dtype=torch.long)
        pos = torch.tensor([s.length for s in rows], dtype=torch.long)
        return ids, pos

    def _forward_decode(self, ids: Any, positions: Any, mask: Any) -> Any:
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask,
                         use_cache=True, **{self.cache_arg: self.cache})
        return out.logits[:, -1].float()

    def _decode_mask(self, pos: Any, width: int, out: Any = None) -> Any:
        torch = self.torch
        hide = torch.arange(width, device=pos.device).unsqueeze(0) > pos.unsqueeze(1)
        mask = torch.zeros((pos.shape[0], 1, 1, width), dtype=self.dtype, device=pos.device)
        mask.masked_fill_(hide.view(pos.shape[0], 1, 1, width), self._neg)
        if out is None:
            return mask
        out.copy_(mask)
        return out

    def _decode_eager(self, rows: list[Sequence], width: int) -> Any:
        ids, pos = self._decode_inputs(rows)
        ids, pos = ids.to(self.device), pos.to(self.device)
        slots = self.torch.arange(len(rows), device=self.device)
        self.cache.for_decode(slots, pos, width)
        return self._forward_decode(ids, pos.unsqueeze(1), self._decode_mask(pos, width))

    def _decode_bucketed(self, rows: list[Sequence], width: int) -> Any:
        torch = self.torch
        n = len(rows)
        nb = _bucket(n, 1, self.slots)
        wb = _bucket(width, 16, self.cache.capacity)
        key = (nb, wb)
        g = self._graphs.get(key)
        if g is None:
            g = self._new_static(nb, wb)
        ids, pos = self._decode_inputs(rows)
        full_ids = torch.zeros((nb, 1), dtype=torch.long)
        full_pos = torch.zeros((nb,), dtype=torch.long)
        full_rows = torch.full((nb,), self._scratch, dtype=torch.long)
        full_ids[:n], full_pos[:n] = ids, pos
        full_rows[:n] = torch.arange(n)
        g.ids.copy_(full_ids)
        g.pos.copy_(full_pos)
        g.positions.copy_(full_pos.unsqueeze(1))
        g.rows.copy_(full_rows)
        self._decode_mask(g.pos, wb, out=g.mask)
        self.cache.for_decode(g.rows, g.pos, wb)
        if g.graph is not None:
            g.graph.replay()
            return g.logits[:n]
        return self._forward_decode(g.ids, g.positions, g.mask)[:n]

    def _new_static(self, nb: int, wb: int) -> _Graph:
        torch, dev = self.torch, self.device
        g = _Graph(graph=None, ids=torch.zeros((nb, 1), dtype=torch.long, device=dev),
                   positions=torch.zeros((nb, 1), dtype=torch.long, device=dev),
                   rows=torch.full((nb,), self._scratch, dtype=torch.long, device=dev),
                   pos=torch.zeros((nb,), dtype=torch.long, device=dev),
                   mask=torch.zeros((nb, 1, 1, wb), dtype=self.dtype, device=dev), logits=None)
        if self.cuda_graphs:
            try:
                self._capture(g, wb)
                self.stats.graphs += 1
            except Exception:
                _log.warning("CUDA graph capture failed at batch %d, width %d; decoding eagerly "
                             "from now on", nb, wb, exc_info=True)
                self.cuda_graphs = False
                g.graph = None
        self._graphs[(nb, wb)] = g
        return g

    def _capture(self, g: _Graph, wb: int) -> None:
        """Record one decode step at this shape. Every row writes into the scratch slot while
        warming up (the real rows' caches are only read), and the capture itself runs no
        kernel."""
        torch = self.torch
        g.rows.fill_(self._scratch)
        g.pos.zero_()
        self._decode_mask(g.pos, wb, out=g.mask)
        self.cache.for_decode(g.rows, g.pos, wb)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward_decode(g.ids, g.positions, g.mask)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward_decode(g.ids, g.positions, g.mask)
        g.graph, g.logits = graph, logits

    # --- tokens -----------------------------------------------------------------------------

    def _sample(self, seqs: list[Sequence], logits: Any) -> list[int]:
        if self._logits_seen is not None:
            self._logits_seen.append(logits.detach().clone())
        return sample(self.torch, logits, [s.params.temperature for s in seqs],
                      [s.params.top_p for s in seqs], [s.generator for s in seqs]).tolist()

    def _emit(self, seqs: list[Sequence], tokens: list[int]) -> None:
        finished = []
        for seq, tok in zip(seqs, tokens):
            if seq.done:
                continue
            if tok in self.eos:
                self._out.append((seq, Token("", "stop")))
                finished.append(seq)
                continue
            seq.produced += 1
            seq.last = tok
            assert seq.detok is not None
            text = seq.detok.add(tok)
            if seq.produced >= seq.params.max_tokens:
                self._out.append((seq, Token(text + seq.detok.flush(), "length")))
                finished.append(seq)
            else:
                self._out.append((seq, Token(text)))
        for seq in finished:
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Free ``seq``'s slot, moving the last running sequence into it to stay packed."""
        seq.done = True
        if seq.slot < 0:
            return
        slot, last = seq.slot, len(self._rows) - 1
        if slot != last:
            moved = self._rows[last]
            self.cache.move(last, slot, moved.length)
            moved.slot = slot
            self._rows[slot] = moved
        self._rows.pop()
        seq.slot = -1

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        seq.done = True
        seq.slot = -1
        self._out.append((seq, exc))

    def _flush(self) -> None:
        if not self._out:
            return
        out, self._out = self._out, []
        groups: dict[int, tuple[Deliver, list[tuple[Sequence, Any]]]] = {}
        for seq, item in out:
            key = id(seq.deliver)
            if key not in groups:
                groups[key] = (seq.deliver, [])
            groups[key][1].append((seq, item))
        for deliver, items in groups.values():
            try:
                deliver(items)
            except Exception:  # the consumer went away (its event loop closed)
                _log.debug("dropping %d output(s): consumer gone", len(items), exc_info=True)
