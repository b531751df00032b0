"""Inference engines behind one interface (:class:`server.engines.base.Engine`).

``build_engine`` imports the chosen engine lazily: the sim engine never imports torch. The sim
engine's class follows its latency profile's kind (server/engines/profile.py): ``slots`` is
:class:`~server.engines.sim.SimEngine`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.engines.base import Engine, SamplingParams, Token

if TYPE_CHECKING:  # server.settings imports server.engines.profile: no cycle at runtime
    from server.settings import Settings

__all__ = ["Engine", "SamplingParams", "Token", "build_engine"]


def build_engine(settings: Settings) -> Engine:
    if settings.engine == "sim":
        profile = settings.sim_latency_profile()
        if profile.kind == "slots":
            from server.engines.sim import SimEngine

            return SimEngine(settings, profile=profile)
        # The continuous-batching sim engine (vLLM's scheduler over profile.step_seconds)
        # plugs in here.
        raise ValueError(f"LLM_SIM_PROFILE: profile {profile.name} is {profile.kind}; this "
                         "build's sim engine runs slots profiles only")
    from server.engines.transformers import TransformersEngine

    return TransformersEngine(settings)
