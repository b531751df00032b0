"""Time dilation for local mode: run a regime faster than this machine can serve live.

A sim replica emits one SSE event per sequence per decode step, and every event costs CPU in
the replica, in nginx and in the client. At a GPU profile's full batch (h200-llama8b: 1,024
sequences in a ~58 ms step, ~18,000 events/s per replica) a few CPU cores fall far behind, and
then the CPU, not the profile, sets the timing. Dilating time by ``D`` (every modelled duration
x D, ``LLM_SIM_TIME_DILATION``) divides the event rate by ``D`` and keeps every ratio of the
regime: queueing, batching and the scheduler's decisions are the same, only slower. A
calibration divides measured times by ``D`` (the replicas report it in /v1/models).

``python -m local up --profile P`` without ``--time-dilation`` picks the smallest ``D`` that
keeps the event rate at the profile's full batch within ``TARGET_SHARE`` of the headroom
measured on this kind of machine (``local/headroom.yaml``, written by ``python -m bench.headroom
--write``), scaled to this machine's core count.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from server.engines.profile import Profile

HEADROOM_FILE = Path(__file__).resolve().parent / "headroom.yaml"
TARGET_SHARE = 0.8
"""Use at most this share of the measured headroom (the rest: nginx logs, top, Prometheus)."""
FULL_BATCH_KV_TOKENS = 512
"""KV tokens per sequence at "full batch": a short chat turn, the highest event rate."""


@dataclass(frozen=True)
class Headroom:
    events_per_s: float
    """SSE content events per second the sim replicas, nginx and one client process deliver
    with the model's timing intact."""
    cores: int
    replicas: int
    command: str
    date: str

    def for_this_machine(self) -> float:
        """Scaled linearly to this machine's cores (an assumption: the work is per event)."""
        return self.events_per_s * (os.cpu_count() or self.cores) / self.cores


def load_headroom(path: Path = HEADROOM_FILE) -> Headroom:
    data = yaml.safe_load(path.read_text())
    return Headroom(float(data["events_per_s"]), int(data["cores"]), int(data["replicas"]),
                    str(data["command"]), str(data["date"]))


def full_batch_event_rate(profile: Profile, replicas: int) -> float:
    """SSE events/s of ``replicas`` replicas decoding a full batch each (undilated profile
    times the profile's own dilation)."""
    batch = profile.scheduler.admission_slots
    step = profile.decode_step_seconds(batch, FULL_BATCH_KV_TOKENS)
    return replicas * batch / step


def pick_dilation(profile: Profile, replicas: int, headroom: Headroom) -> float:
    """The smallest dilation, rounded up to two significant digits and at least 1, that keeps
    the full-batch event rate within ``TARGET_SHARE`` of the headroom."""
    rate = full_batch_event_rate(profile.dilated(1.0), replicas)
    need = rate / (TARGET_SHARE * headroom.for_this_machine())
    if need <= 1:
        return 1.0
    digits = 10 ** (math.floor(math.log10(need)) - 1)
    return round(math.ceil(need / digits) * digits, 6)
