"""A server running the GPU-regime sim engine (SimBatchedEngine) with a stand-in step cost, for
tests: ``uvicorn --factory tests.server.batched_app:create`` reads the scheduler limits and the
time dilation from ``SIM_BATCHED_TEST`` (JSON) and everything else from ``LLM_*``.

The stand-in cost is a simple linear step model chosen for the tests (not measured): the
latency profiles carry the real ones.
"""

from __future__ import annotations

import json
import os
from typing import Any

from server import create_app, from_env
from server.engines.scheduler import SchedulerConfig
from server.engines.sim_batched import SimBatchedEngine
from server.engines.steps import StepBatch

SPEC_ENV = "SIM_BATCHED_TEST"


def stand_in_step_seconds(batch: StepBatch) -> float:
    """10 ms a step, plus 0.2 ms a sequence, 20 µs a new token, 50 ns a token read from KV."""
    kv = sum(batch.decode_kv) + sum(cached for _, cached in batch.prefill)
    return 0.010 + 2e-4 * batch.sequences + 2e-5 * batch.tokens + 5e-8 * kv


def spec_env(config: SchedulerConfig, time_dilation: float) -> dict[str, str]:
    fields = {name: getattr(config, name) for name in config.__dataclass_fields__}
    return {SPEC_ENV: json.dumps({"config": fields, "time_dilation": time_dilation})}


def create() -> Any:
    settings = from_env()
    spec = json.loads(os.environ[SPEC_ENV])
    engine = SimBatchedEngine(settings, SchedulerConfig(**spec["config"]), stand_in_step_seconds,
                              spec["time_dilation"], description="stand-in step cost (tests)")
    return create_app(settings, engine)
