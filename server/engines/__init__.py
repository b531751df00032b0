"""Inference engines behind one interface (:class:`server.engines.base.Engine`).

``build_engine`` imports the chosen engine lazily: the sim engine never imports torch.
"""

from __future__ import annotations

from server.engines.base import Engine, SamplingParams, Token
from server.settings import Settings

__all__ = ["Engine", "SamplingParams", "Token", "build_engine"]


def build_engine(settings: Settings) -> Engine:
    if settings.engine == "sim":
        from server.engines.sim import SimEngine

        return SimEngine(settings)
    from server.engines.transformers import TransformersEngine

    return TransformersEngine(settings)
