"""What every request handler shares: the app's engine, admission, metrics and drain state.

Its own module so the factory, the routes and the auth gate all import it, and none of them
imports another."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from server.admission import AdmissionController
from server.api.generation import Generation
from server.drain import DrainController
from server.engines import Engine
from server.metrics import Metrics
from server.settings import Settings


@dataclass(eq=False)
class AppState:
    settings: Settings
    engine: Engine
    admission: AdmissionController
    metrics: Metrics
    drain: DrainController
    generation: Generation
    started: int = field(default_factory=lambda: int(time.time()))
    loaded: bool = False
    load_error: str | None = None
