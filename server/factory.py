"""Application factory: ``create_app(settings)`` wires engine, admission, drain and routes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.admission import for_engine as admission_for
from server.api.generation import Generation
from server.api.routes import router
from server.auth import GateMiddleware
from server.drain import DrainController, SigtermHook
from server.engines import Engine, build_engine
from server.errors import install_handlers
from server.metrics import Metrics
from server.settings import Settings
from server.state import AppState

_log = logging.getLogger("server")


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """Build the app. ``engine`` overrides the one chosen by ``settings.engine`` (tests)."""
    engine = engine or build_engine(settings)
    admission, running, waiting = admission_for(engine, settings.max_concurrency,
                                                settings.max_queue)
    metrics = Metrics(running=running, waiting=waiting)

    def abort_waiting() -> None:
        admission.abort_waiting()
        engine.abort_waiting()

    drain = DrainController(settings.drain_seconds, on_abort=abort_waiting)
    state = AppState(
        settings=settings, engine=engine, admission=admission, metrics=metrics, drain=drain,
        generation=Generation(engine, admission, metrics, aborting=lambda: drain.aborting),
    )

    async def load() -> None:
        t0 = time.monotonic()
        try:
            await engine.load()
        except Exception as exc:  # reported by /health and /ready; the process stays up
            _log.exception("loading the model failed")
            state.load_error = f"{type(exc).__name__}: {exc}"
            return
        state.loaded = True
        _log.info("engine %s ready (%s) in %.1fs", engine.kind, settings.model_name,
                  time.monotonic() - t0)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        hook = SigtermHook(drain)
        hook.install()
        # Load in the background so /health answers while weights load; /ready says when done.
        loader = asyncio.create_task(load(), name="load-model")
        try:
            yield
        finally:
            hook.uninstall()
            loader.cancel()
            await engine.close()

    app = FastAPI(title="llm-serving", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.llm = state
    app.include_router(router)
    install_handlers(app, on_invalid=lambda: metrics.reject("invalid"))
    app.add_middleware(GateMiddleware, state=state)
    return app
