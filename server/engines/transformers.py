"""Real causal LM with Hugging Face transformers, on CUDA when present, else CPU.

torch and transformers are imported inside ``load()`` only, so the sim engine (and
``import server``) never pays for them.

Each sequence runs its own token-by-token loop (prefill, then one forward pass per token with its
KV cache); forward passes run in a thread pool with one worker per slot, so up to
LLM_MAX_CONCURRENCY sequences progress at once (torch releases the GIL while computing). This is
not batched like vLLM: it is meant for small models, CPU nodes and tests, with load that is real.
Sampling uses a per-request ``torch.Generator``, so a seed reproduces the same text even with
other requests running.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from server.engines.base import Engine, SamplingParams, Token
from server.settings import Settings

_log = logging.getLogger(__name__)

# Used when a tokenizer ships no chat template (base models).
_FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class TransformersEngine(Engine):
    kind = "transformers"

    def __init__(self, settings: Settings) -> None:
        assert settings.model, "LLM_MODEL is required"  # enforced by Settings
        self.settings = settings
        self._context_length = settings.max_model_len
        self._pool = ThreadPoolExecutor(max_workers=settings.max_concurrency,
                                        thread_name_prefix="llm-seq")
        self._model: Any = None
        self._tokenizer: Any = None
        self._torch: Any = None
        self._device = "cpu"
        self._eos: set[int] = set()
        self._cache_arg = "cache"

    @property
    def context_length(self) -> int:
        return self._context_length

    async def load(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._load)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

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
        _log.info("loading %s (revision %s) on %s as %s", s.model, s.model_revision or "main",
                  device, dtype)
        revision = s.model_revision or None  # HF_TOKEN and HF_HOME are read by huggingface_hub
        tokenizer = AutoTokenizer.from_pretrained(s.model, revision=revision)
        if not getattr(tokenizer, "chat_template", None):
            _log.warning("%s has no chat template; using a plain 'role: content' one", s.model)
            tokenizer.chat_template = _FALLBACK_TEMPLATE
        model = AutoModelForCausalLM.from_pretrained(s.model, revision=revision, dtype=dtype)
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
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._torch, self._tokenizer, self._model = torch, tokenizer, model
        self._device, self._eos, self._context_length = device, eos, limit

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def model_card(self) -> dict[str, Any]:
        return {"simulated": False, "device": self._device}

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        text = self._tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True)
        # The template already holds BOS etc.; do not add special tokens twice.
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_text(self, text: str) -> list[int]:
        return list(self._tokenizer(text)["input_ids"])

    def _forward(self, input_ids: list[int], past: Any, gen: Any, temperature: float,
                 top_p: float) -> tuple[int, Any]:
        torch = self._torch
        with torch.inference_mode():
            x = torch.tensor([input_ids], device=self._device)
            out = self._model(input_ids=x, use_cache=True, **{self._cache_arg: past})
            cache = getattr(out, self._cache_arg)
            logits = out.logits[0, -1].float().cpu()
            if temperature == 0:
                return int(torch.argmax(logits)), cache
            probs = torch.softmax(logits / temperature, dim=-1)
            if top_p < 1.0:
                sorted_p, order = torch.sort(probs, descending=True)
                # keep the smallest set whose mass reaches top_p (always the top token)
                drop = torch.cumsum(sorted_p, dim=-1) - sorted_p >= top_p
                sorted_p[drop] = 0.0
                pick = torch.multinomial(sorted_p, 1, generator=gen)
                return int(order[pick]), cache
            return int(torch.multinomial(probs, 1, generator=gen)), cache

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Token]:
        if self._model is None:
            raise RuntimeError("transformers engine not loaded")
        torch = self._torch
        loop = asyncio.get_running_loop()
        gen = torch.Generator(device="cpu")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        gen.manual_seed(seed % (2**63))
        produced: list[int] = []
        text_so_far = ""
        past = None
        feed = prompt_ids
        while len(produced) < params.max_tokens:
            token, past = await loop.run_in_executor(
                self._pool, self._forward, feed, past, gen, params.temperature, params.top_p)
            if token in self._eos:
                yield Token("", "stop")
                return
            produced.append(token)
            feed = [token]
            text = self._tokenizer.decode(produced, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                delta = ""  # incomplete multi-byte character: wait for the next token
            else:
                delta, text_so_far = text[len(text_so_far):], text
            finish = "length" if len(produced) >= params.max_tokens else None
            if finish and text != text_so_far:
                delta, text_so_far = text[len(text_so_far):], text
            yield Token(delta, finish)
