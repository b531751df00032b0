"""Real causal LM with Hugging Face transformers, served by one engine-wide batched step loop.

torch and transformers are imported inside ``load()`` only, so the sim engine (and
``import server``) never pays for them.

**How it runs.** One thread owns the model and runs :class:`~server.engines.batching.StepLoop`:
every step, all running sequences advance together in one forward pass (continuous batching:
a request joins at the next step boundary after it arrives, and leaves at the one after it
finishes or its client disconnects). New prompts are prefilled in a separate forward before
the decode step, up to a token budget per step. Sampling runs on the device for the whole batch,
each request drawing from its own ``torch.Generator``, so a ``seed`` reproduces the same text
whatever else runs; text is detokenised incrementally. On CUDA the decode step is replayed as a
CUDA graph (``LLM_CUDA_GRAPHS``, on by default there, never on a CPU).

**Why not transformers' own continuous batching.** transformers 5.24 ships one
(``generate_batch`` / ``ContinuousBatchingManager``, paged KV cache). Measured against the raw
batched forward of the same model and work on a 2-core CPU (``python -m server.bench --engine
transformers --compare-library``; server/README.md): one ``generate_batch`` call ran at 8-11%
(it builds and destroys a manager per call), a persistent, warmed-up manager at 41-61%, where
this engine serves 65-72% through HTTP; on one H200 it ran ~78 ms per step where a CUDA-graph
step of the same model takes ~3 ms. What rules it out is what it cannot do for a server with our
contract: it samples with one global ``torch.multinomial`` (no per-request generator, so a seed
would not reproduce text while other requests run), ``do_sample`` is fixed per manager (greedy
and sampled requests cannot share it), and per-request temperature / top-p exist only as opt-in
processors that divide by the temperature (0, our greedy, is not allowed). The facts, with the
lines they come from, are in tests/contracts/data/transformers-5.24.0.json.

**Which models.** Any causal LM whose attention layers call ``cache.update(...)`` and take the
4D mask and position ids they are given, as transformers 5.24's Llama, Mistral and Qwen2 do (read
at the tag; attention implementation ``sdpa``, or ``eager`` where sdpa is unsupported).
Sliding-window layers attend over the whole context here (a given 4D mask is used as it is). At load the engine
checks its batched path against the model's own forward on a short prompt and refuses a model
whose logits differ (``/health`` then reports the error).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import Any

from server.engines.base import Engine, SamplingParams, Token
from server.settings import Settings

_log = logging.getLogger(__name__)

# Used when a tokenizer ships no chat template (base models).
_FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

CHECK_TOLERANCE = {"float32": 1e-3, "float16": 0.1, "bfloat16": 0.1}
"""Largest logit difference (relative to the largest logit) between the batched path and the
model's own forward that the load-time check accepts, per weight dtype. Measured on the 23 M
random model on a CPU: float32 ~1e-6, float16 ~1e-3, bfloat16 ~1e-2 (rounding grows with depth,
hence the margin); a model that ignores the engine's cache is off by far more than 0.1."""


class TransformersEngine(Engine):
    kind = "transformers"

    def __init__(self, settings: Settings) -> None:
        assert settings.model, "LLM_MODEL is required"  # enforced by Settings
        self.settings = settings
        self._context_length = settings.max_model_len
        self._model: Any = None
        self._tokenizer: Any = None
        self._torch: Any = None
        self._device = "cpu"
        self._loop: Any = None
        self._graphs = False
        self._delivers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary())

    @property
    def context_length(self) -> int:
        return self._context_length

    async def load(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from server.engines.batching import StepLoop

        s = self.settings
        if s.device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            device = s.device
        if s.dtype != "auto":
            dtype = getattr(torch, s.dtype)
        elif device == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
        graphs = device == "cuda" and s.cuda_graphs != "off"
        if s.cuda_graphs == "on" and device != "cuda":
            _log.warning("LLM_CUDA_GRAPHS=on needs a CUDA device; decoding eagerly on %s",
                         device)
        _log.info("loading %s (revision %s) on %s as %s", s.model, s.model_revision or "main",
                  device, dtype)
        revision = s.model_revision or None  # HF_TOKEN and HF_HOME are read by huggingface_hub
        tokenizer = AutoTokenizer.from_pretrained(s.model, revision=revision)
        if not getattr(tokenizer, "chat_template", None):
            _log.warning("%s has no chat template; using a plain 'role: content' one", s.model)
            tokenizer.chat_template = _FALLBACK_TEMPLATE
        try:
            model = AutoModelForCausalLM.from_pretrained(s.model, revision=revision, dtype=dtype,
                                                         attn_implementation="sdpa")
        except (ValueError, ImportError):  # no sdpa attention for this architecture
            _log.warning("%s does not support sdpa attention; using eager", s.model)
            model = AutoModelForCausalLM.from_pretrained(s.model, revision=revision, dtype=dtype,
                                                         attn_implementation="eager")
        model.to(device)
        model.eval()

        eos: set[int] = set()
        for source in (getattr(model, "generation_config", None), model.config, tokenizer):
            ids = getattr(source, "eos_token_id", None)
            if isinstance(ids, int):
                eos.add(ids)
            elif isinstance(ids, (list, tuple)):
                eos.update(int(i) for i in ids)
        limit = s.max_model_len
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(model.config, attr, None)
            if isinstance(value, int) and value > 0:
                if value < limit:
                    _log.warning("LLM_MAX_MODEL_LEN=%d exceeds the model's %s=%d; using %d",
                                 limit, attr, value, value)
                limit = min(limit, value)
                break
        # transformers 5 renamed the KV-cache argument `past_key_values` to `cache`.
        params = inspect.signature(model.forward).parameters
        cache_arg = "cache" if "cache" in params else "past_key_values"
        loop = StepLoop(torch, model, tokenizer, slots=s.max_concurrency, context=limit,
                        eos=frozenset(eos), cache_arg=cache_arg, cuda_graphs=graphs)
        probe = list(tokenizer("The engine checks itself.")["input_ids"])[: limit // 2] or [0]
        worst = loop.check_against_model(probe)
        tolerance = CHECK_TOLERANCE.get(str(dtype).removeprefix("torch."), 0.1)
        if worst > tolerance:
            raise RuntimeError(
                f"{s.model}: the batched engine's logits differ from the model's own forward by "
                f"{worst:.2g} (relative; {tolerance:g} allowed): its attention does not use the "
                "cache and mask the engine passes, so it cannot be served by this engine")
        _log.info("batched path checked against the model's forward (relative difference "
                  "%.2g); %d slots, context %d, KV cache %.0f MiB so far, CUDA graphs %s",
                  worst, s.max_concurrency, limit, loop.cache.nbytes() / 2**20,
                  "on" if loop.cuda_graphs else "off")
        loop.start()
        self._torch, self._tokenizer, self._model = torch, tokenizer, model
        self._device, self._context_length, self._loop = device, limit, loop

    async def close(self) -> None:
        if self._loop is not None:
            await asyncio.to_thread(self._loop.stop)

    def model_card(self) -> dict[str, Any]:
        card: dict[str, Any] = {"simulated": False, "device": self._device}
        if self._loop is not None:
            card["batching"] = {"slots": self._loop.slots,
                                "cuda_graphs": self._loop.cuda_graphs,
                                **self._loop.stats.as_dict()}
        return card

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        text = self._tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True)
        # The template already holds BOS etc.; do not add special tokens twice.
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_text(self, text: str) -> list[int]:
        return list(self._tokenizer(text)["input_ids"])

    def _deliverer(self, loop: asyncio.AbstractEventLoop) -> Any:
        """One callback per event loop: the step thread hands it a step's outputs at once."""
        deliver = self._delivers.get(loop)
        if deliver is None:
            def put_all(items: list[tuple[Any, Any]]) -> None:
                for seq, item in items:
                    seq.consumer.put_nowait(item)

            def deliver(items: list[tuple[Any, Any]]) -> None:
                loop.call_soon_threadsafe(put_all, items)

            self._delivers[loop] = deliver
        return deliver

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Token]:
        if self._loop is None:
            raise RuntimeError("transformers engine not loaded")
        from server.engines.batching import Sequence as Seq
        from server.engines.sampling import IncrementalDetokenizer

        gen = None
        if params.temperature > 0:
            gen = self._torch.Generator(device=self._device)
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            gen.manual_seed(seed % (2**63))
        queue: asyncio.Queue[Any] = asyncio.Queue()
        seq = Seq(prompt=list(prompt_ids), params=params,
                  deliver=self._deliverer(asyncio.get_running_loop()), consumer=queue,
                  generator=gen, detok=IncrementalDetokenizer(self._tokenizer))
        self._loop.submit(seq)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:  # the consumer stopped early (client gone, stop string, drain)
                self._loop.cancel(seq)
