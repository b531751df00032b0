"""The latency model every benchmark replica runs (the sim engine's settings)."""

from __future__ import annotations

from dataclasses import dataclass

from bench import des


@dataclass(frozen=True)
class SimModel:
    """Latency model of every replica (sim engine), chosen so that 4 replicas on 2 shared cores
    are bound by the model, not the CPU: ~40 ms decode steps keep the aggregate SSE rate under
    ~850 events/s at saturation."""

    slots: int = 8
    prefill_base_ms: float = 50
    prefill_ms_per_token: float = 0.25
    decode_base_ms: float = 30
    decode_ms_per_seq: float = 1.0
    prefix_cache_tokens: int = 65_536
    max_tokens: int = 384
    max_model_len: int = 16_384

    def env(self) -> dict[str, str]:
        return {
            "LLM_MAX_CONCURRENCY": str(self.slots), "LLM_MAX_QUEUE": "1024",
            "LLM_MAX_TOKENS": str(self.max_tokens), "LLM_MAX_MODEL_LEN": str(self.max_model_len),
            "LLM_SIM_PREFILL_BASE_MS": str(self.prefill_base_ms),
            "LLM_SIM_PREFILL_MS_PER_TOKEN": str(self.prefill_ms_per_token),
            "LLM_SIM_DECODE_BASE_MS": str(self.decode_base_ms),
            "LLM_SIM_DECODE_MS_PER_SEQ": str(self.decode_ms_per_seq),
            "LLM_SIM_PREFIX_CACHE_TOKENS": str(self.prefix_cache_tokens),
            "LLM_DRAIN_SECONDS": "2", "LLM_LOG_LEVEL": "warning",
        }

    def des_params(self, replicas: int) -> des.Params:
        """The same model for the discrete-event model (bench/des.py), in seconds."""
        return des.Params(replicas, self.slots, self.prefill_base_ms / 1e3,
                          self.prefill_ms_per_token / 1e3, self.decode_base_ms / 1e3,
                          self.decode_ms_per_seq / 1e3)

    def describe(self) -> str:
        return (f"sim: prefill {self.prefill_base_ms:g} ms + {self.prefill_ms_per_token:g} "
                f"ms/uncached token (cached free), decode step {self.decode_base_ms:g} ms + "
                f"{self.decode_ms_per_seq:g} ms × active; {self.slots} slots/replica, "
                f"prefix cache {self.prefix_cache_tokens} tokens/replica")
