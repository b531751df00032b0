"""Simulated engine in the GPU regime: vLLM's continuous batching, in real time, with no weights.

One asyncio step loop runs the pure scheduler (server/engines/scheduler.py: vLLM 0.33.0's rules
for the token budget, chunked prefill, ``max_num_seqs``, KV blocks, recompute preemption and the
prefix cache). Each step lasts ``step_seconds(batch) × time_dilation``, where ``step_seconds`` is
a latency profile's step model; at its end every sequence whose prefill is complete receives one
token. The discrete-event model (bench/des.py) runs the same scheduler, so the two agree by
construction; tests/server/test_sim_batched.py checks the real server against it.

* **Time dilation** ``D``: every step takes D times the profile's time, so a regime of ~10 ms
  steps and hundreds of sequences per replica fits the CPU of a small machine. Latencies
  measured against a dilated engine are divided by D to read them in the profile's regime
  (queueing is scale-free: arrivals must be slowed by the same D). The model card says D.
* **Queues.** The engine keeps vLLM's own queues: ``running`` (admitted into the batch, at most
  ``max_num_seqs`` = LLM_MAX_CONCURRENCY) and ``waiting`` (not admitted yet, or preempted).
  The admission controller in front only bounds the total (LLM_MAX_CONCURRENCY + LLM_MAX_QUEUE,
  then 429), and ``llm_requests_running`` / ``llm_requests_waiting`` report the scheduler's
  counts, as vLLM's ``vllm:num_requests_running`` / ``vllm:num_requests_waiting`` do.
* **Cancellation.** When a consumer goes away (client gone, stop string), its sequence leaves
  the scheduler at once and its KV blocks are freed.
* **Text** is the sim engine's (its tokenizer, chat template and vocabulary, imported): the same
  seed and prompt give the same words as LLM_ENGINE=sim. Generated tokens are known in advance,
  so their blocks enter the prefix cache once full, as vLLM caches generated blocks.

Timing is drift-free like the sim engine's: step k+1 starts at the planned end of step k, unless
the loop fell more than one step behind (then it starts now instead of bursting).
"""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from server.engines.base import SamplingParams, Token
from server.engines.scheduler import Scheduler, SchedulerConfig, Seq, block_keys
from server.engines.sim import VOCAB, SimLoopEngine
from server.engines.steps import StepBatch
from server.settings import Settings

_ABORT = object()
"""Delivered instead of a token when the engine gives up on a waiting sequence."""


def scheduler_config(settings: Settings, kv_cache_tokens: int, **limits: Any) -> SchedulerConfig:
    """The scheduler of one replica: ``max_num_seqs`` is LLM_MAX_CONCURRENCY (as prod passes
    model.maxConcurrency to vLLM as --max-num-seqs), the context LLM_MAX_MODEL_LEN; ``limits``
    overrides vLLM's other defaults (max_num_batched_tokens, block_size, ...)."""
    return SchedulerConfig(kv_cache_tokens=kv_cache_tokens, max_model_len=settings.max_model_len,
                           max_num_seqs=settings.max_concurrency, **limits)


class SimBatchedEngine(SimLoopEngine):
    own_queue = True
    _loop_name = "sim-step-loop"

    def __init__(self, settings: Settings, config: SchedulerConfig,
                 step_seconds: Callable[[StepBatch], float], time_dilation: float = 1.0,
                 description: str = "", profile: dict[str, str] | None = None) -> None:
        if time_dilation <= 0:
            raise ValueError(f"time_dilation must be > 0, got {time_dilation}")
        if config.max_model_len != settings.max_model_len:
            raise ValueError(f"the scheduler's max_model_len ({config.max_model_len}) must be "
                             f"LLM_MAX_MODEL_LEN ({settings.max_model_len})")
        self.config = config
        self.scheduler = Scheduler(config)
        self.step_seconds = step_seconds
        self.time_dilation = time_dilation
        self.description = description
        self.profile = profile
        """Which latency profile the step model comes from (name, kind, source), if one."""
        self.load_seconds = settings.sim_load_seconds
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def context_length(self) -> int:
        return self.config.max_model_len

    @property
    def requests_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def requests_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def model_card(self) -> dict[str, Any]:
        c = self.config
        return {
            "simulated": True,
            "description": ("Simulated model: no weights, deterministic text, continuous batching "
                            "as vLLM 0.33.0 schedules it" + (f"; {self.description}"
                                                             if self.description else "")),
            "time_dilation": self.time_dilation,
            **({"profile": self.profile} if self.profile is not None else {}),
            "scheduler": {"max_num_seqs": c.max_num_seqs,
                          "max_num_batched_tokens": c.max_num_batched_tokens,
                          "kv_cache_tokens": c.num_blocks * c.block_size,
                          "block_size": c.block_size,
                          "enable_prefix_caching": c.enable_prefix_caching,
                          "enable_chunked_prefill": c.enable_chunked_prefill,
                          "long_prefill_token_threshold": c.long_prefill_token_threshold},
            "prefix_cache": self.scheduler.stats(),
        }

    def abort_waiting(self) -> None:
        """End every sequence that has not started (the drain deadline): it finishes with
        reason ``abort`` and no token."""
        for seq in [s for s in self.scheduler.waiting if s.num_output == 0]:
            self.scheduler.abort(seq)
            seq.data.put_nowait(_ABORT)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Token]:
        if self._loop_task is None:
            raise RuntimeError("sim engine not loaded")
        rng = random.Random(zlib.crc32(repr((params.seed or 0, prompt_ids)).encode()))
        words = [rng.choice(VOCAB) for _ in range(params.max_tokens)]
        keys = None
        if self.config.enable_prefix_caching:
            out_ids = [zlib.crc32(w.encode()) & 0x7FFFFFFF for w in words]  # sim_tokenize(w)
            keys = block_keys(prompt_ids + out_ids, self.config.block_size)
        tokens: asyncio.Queue[object] = asyncio.Queue()
        seq = Seq(len(prompt_ids), params.max_tokens, keys, tokens)
        self.scheduler.add(seq)
        self._wakeup.set()
        try:
            for k, word in enumerate(words):
                if await tokens.get() is _ABORT:
                    yield Token("", "abort")
                    return
                yield Token(" " + word, "length" if k == len(words) - 1 else None)
        finally:
            self.scheduler.abort(seq)  # a no-op once it finished

    async def _run_loop(self) -> None:  # the step loop
        sched = self.scheduler
        next_start: float | None = None
        last = 0.0
        while True:
            if not sched.has_work:
                self._wakeup.clear()
                await self._wakeup.wait()
                next_start = None
            now = time.monotonic()
            # Drift-free schedule; if we fell behind by more than one step (overload, idle
            # restart), start now instead of bursting to catch up.
            if next_start is None or now - next_start > last:
                next_start = now
            plan = sched.plan_step()
            if plan.empty:  # only aborted sequences left, or nothing fits: wait for a change
                self._wakeup.clear()
                await self._wakeup.wait()
                next_start = None
                continue
            last = self.step_seconds(plan.batch) * self.time_dilation
            end = next_start + last
            delay = end - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            out = sched.finish_step(plan)
            for seq in out.emitted:
                seq.data.put_nowait(None)
            next_start = end
