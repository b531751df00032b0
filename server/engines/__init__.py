"""Inference engines behind one interface (:class:`server.engines.base.Engine`).

``build_engine`` imports the chosen engine lazily: the sim engine never imports torch. The sim
engine's class follows its latency profile's kind (server/engines/profile.py): ``slots`` is
:class:`~server.engines.sim.SimEngine`, ``continuous`` (the GPU regime: vLLM's scheduler over the
profile's step model) :class:`~server.engines.sim_batched.SimBatchedEngine`.
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
        from server.engines.sim_batched import SimBatchedEngine, scheduler_config

        # The engine applies the dilation itself (and reports it), so it gets the undilated
        # step model.
        return SimBatchedEngine(
            settings, scheduler_config(settings, **profile.scheduler.limits()),
            profile.dilated(1.0).step_seconds, profile.time_dilation,
            description=profile.describe(),
            profile={"name": profile.name, "kind": profile.kind,
                     "source": profile.provenance.source})
    from server.engines.transformers import TransformersEngine

    return TransformersEngine(settings)
