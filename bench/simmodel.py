"""The latency model every benchmark replica runs: a profile (server/profiles/) and the
benchmark's token limits. The numbers live in the profile; this module only passes them on
(to the replicas as ``LLM_SIM_PROFILE``, to the discrete-event model as ``des.Params``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bench import des
from server.engines.profile import (
    ContinuousScheduler,
    Profile,
    ProfileError,
    SlotsLinearCost,
    SlotsScheduler,
    load_profile,
)
from server.engines.scheduler import SchedulerConfig

DEFAULT_PROFILE = "cpu-sim"
"""The regime of every benchmark figure so far (4 replicas on 2 CPU cores)."""


def _default() -> Profile:
    return load_profile(DEFAULT_PROFILE)


def with_max_num_seqs(profile: Profile, max_num_seqs: int) -> Profile:
    """``profile`` with its scheduler's max_num_seqs replaced (continuous profiles only)."""
    s = profile.scheduler
    if not isinstance(s, ContinuousScheduler):
        raise ProfileError(f"profile {profile.name} is a {profile.kind} profile: max_num_seqs "
                           "applies to continuous profiles (a slots profile has slots)")
    if not 1 <= max_num_seqs <= s.max_num_batched_tokens:
        raise ProfileError(f"max_num_seqs must be 1 to max_num_batched_tokens "
                           f"({s.max_num_batched_tokens}), got {max_num_seqs}")
    out = profile.model_copy(update={"scheduler": s.model_copy(update={"max_num_seqs":
                                                                        max_num_seqs})})
    return out.dilated(profile.time_dilation)


@dataclass(frozen=True)
class SimModel:
    profile: Profile = field(default_factory=_default)
    """The replicas' latency profile, time dilation included."""
    max_tokens: int = 384
    max_model_len: int = 16_384

    @classmethod
    def named(cls, profile: str, time_dilation: float = 1.0, max_num_seqs: int | None = None,
              **kw: int) -> SimModel:
        """A shipped profile's name or a path to a profile file (raises ProfileError);
        ``max_num_seqs`` overrides a continuous profile's (what `model.maxConcurrency` passes
        to vLLM as --max-num-seqs: prod runs 128, the profiles carry vLLM's default)."""
        loaded = load_profile(profile)
        if max_num_seqs is not None:
            loaded = with_max_num_seqs(loaded, max_num_seqs)
        return cls(loaded.dilated(time_dilation), **kw)

    @property
    def slots(self) -> int:
        """Sequences a replica admits at once (LLM_MAX_CONCURRENCY)."""
        return self.profile.scheduler.admission_slots

    @property
    def prefix_cache_tokens(self) -> int:
        s = self.profile.scheduler
        if isinstance(s, SlotsScheduler):
            return s.prefix_cache_tokens
        return s.kv_cache_tokens if s.enable_prefix_caching else 0

    @property
    def prefix_block_tokens(self) -> int:
        """Tokens per prefix-cache block (the keys the discrete-event model's jobs carry)."""
        s = self.profile.scheduler
        return s.prefix_cache_block_tokens if isinstance(s, SlotsScheduler) else s.block_size

    @property
    def nginx_output_tokens(self) -> int:
        """What sizes nginx's read timeout (max_output_tokens x per-token seconds): the
        benchmark's max_tokens, stretched by the time dilation."""
        return math.ceil(self.max_tokens * max(1.0, self.profile.time_dilation))

    def full_step_seconds(self) -> float:
        """A decode step with every slot busy (dilated)."""
        return self.profile.decode_step_seconds(self.slots, self.max_model_len // 2)

    def env(self) -> dict[str, str]:
        env = {
            "LLM_SIM_PROFILE": self.profile.ref,
            "LLM_MAX_CONCURRENCY": str(self.slots), "LLM_MAX_QUEUE": "1024",
            "LLM_MAX_TOKENS": str(self.max_tokens), "LLM_MAX_MODEL_LEN": str(self.max_model_len),
            "LLM_DRAIN_SECONDS": "2", "LLM_LOG_LEVEL": "warning",
        }
        if self.profile.time_dilation != 1:
            env["LLM_SIM_TIME_DILATION"] = repr(self.profile.time_dilation)
        return env

    def des_params(self, replicas: int) -> des.Params | des.BatchedParams:
        """The same model for the discrete-event model (bench/des.py), in seconds (dilated):
        slots replicas for a slots profile, continuous-batching ones (the scheduler the
        batched sim engine runs) for a continuous profile."""
        s = self.profile.scheduler
        if isinstance(s, ContinuousScheduler):
            config = SchedulerConfig(max_model_len=self.max_model_len,
                                     max_num_seqs=s.max_num_seqs, **s.limits())
            return des.BatchedParams(replicas, config, self.profile.step_seconds)
        cost = self.profile.cost
        if not isinstance(cost, SlotsLinearCost):
            raise ValueError(f"profile {self.profile.name}: a slots scheduler needs the "
                             f"slots-linear cost form, not {type(cost).__name__}")
        p, d = cost.params, self.profile.time_dilation
        return des.Params(replicas, self.slots, d * p.prefill_base_ms / 1e3,
                          d * p.prefill_ms_per_token / 1e3, d * p.decode_base_ms / 1e3,
                          d * p.decode_ms_per_seq / 1e3, s.prefix_cache_tokens,
                          s.prefix_cache_block_tokens, d * p.prefill_ms_per_cached_token / 1e3)

    def describe(self) -> str:
        return f"sim: {self.profile.describe()}"
