"""Pulumi mocks for the infrastructure tests.

The mocks class itself lives in tools/offline.py because the offline render
uses the very same fake cloud; this file only scopes it to each test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pulumi
import pytest

from tools.offline import Recorded, RecordingMocks, capture, install_mocks

BASE_CONFIG: dict[str, Any] = {"model": {"id": "Qwen/Qwen2.5-0.5B-Instruct"}}

GPU_CONFIG: dict[str, Any] = {
    "engine": "vllm",
    "model": {"id": "Qwen/Qwen2.5-7B-Instruct", "loadTimeoutSeconds": 1800},
    # Two: a GPU rollout replaces pods in place, and one replica would mean downtime.
    "replicas": 2,
    "gpu": {
        "count": 2,
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "runtimeClassName": "nvidia",
    },
    "rollout": {"drainSeconds": 90, "preStopSeconds": 7},
}


@dataclass
class Run:
    mocks: RecordingMocks
    values: dict[str, Any] = field(default_factory=dict)
    """Resolved values of the Outputs the build function returned."""
    secrets: set[str] = field(default_factory=set)
    """Names of those Outputs that are Pulumi secrets."""

    def one(self, typ: str) -> Recorded:
        """The single object of this type the program creates (lookups excluded)."""
        found = [r for r in self.mocks.of_type(typ) if not r.read]
        assert len(found) == 1, f"expected one {typ}, got {[r.name for r in found]}"
        return found[0]


@pytest.fixture
def mocks() -> RecordingMocks:
    recording = install_mocks()
    yield recording
    pulumi.runtime.set_all_config({}, [])


@pytest.fixture
def run(mocks: RecordingMocks) -> Callable[[Callable[[], dict[str, Any]]], Run]:
    """Run `build` (creates resources, returns a dict of Outputs) to completion.

    pulumi.runtime.test waits for every registration and the returned Outputs,
    so recorded resources and values are complete when this returns.
    """

    def _run(build: Callable[[], dict[str, Any] | None]) -> Run:
        result = Run(mocks)

        def program() -> Any:
            return capture(build() or {}, result.values, result.secrets)

        pulumi.runtime.test(program)()
        return result

    return _run
