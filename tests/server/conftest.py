"""Fixtures: tiny local model, in-process uvicorn servers (thread), real server processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from server import create_app, from_env

from .support import (
    FAST_SIM,
    REPO,
    RunningServer,
    free_port,
    serve_in_thread,
    tiny_transformers_server,
    wait_ready,
)


@pytest.fixture
def sim_server() -> Iterator[Callable[..., RunningServer]]:
    """Factory: ``sim_server(max_queue=1, ...)`` starts a sim app (fast latencies by default)."""
    stack = contextlib.ExitStack()

    def start(engine: Any = None, **overrides: Any) -> RunningServer:
        settings = from_env({}, **{**FAST_SIM, **overrides})
        app = create_app(settings, engine=engine)
        return RunningServer(stack.enter_context(serve_in_thread(app)), app)

    with stack:
        yield start


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def small_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~23 M-parameter random Llama (the benchmark's default size): slow enough per token that
    a stream is still running when a test acts on it."""
    from server.engines.random_llama import build_random_llama

    path = tmp_path_factory.mktemp("small-llama")
    build_random_llama(path, "20m")
    return path


@pytest.fixture(scope="session")
def hf_server(tiny_model_dir: Path) -> Iterator[RunningServer]:
    with tiny_transformers_server(tiny_model_dir, max_concurrency=4) as srv:
        yield srv


@pytest.fixture(scope="module")
def shared_sim() -> Iterator[RunningServer]:
    settings = from_env({}, **FAST_SIM)
    app = create_app(settings)
    with serve_in_thread(app) as base:
        yield RunningServer(base, app)


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    base_url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: start ``uvicorn server:app`` (or another ``app``, ``--factory`` when ``factory``)
    as a real process; always killed at teardown."""
    procs: list[subprocess.Popen] = []

    def start(env: dict[str, str], wait: bool = True, app: str = "server:app",
              factory: bool = False) -> ServerProcess:
        port = free_port()
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
        full_env.update(env)
        log = tmp_path / f"server-{port}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1",
                 "--port", str(port), *(["--factory"] if factory else [])],
                cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        sp = ServerProcess(proc, f"http://127.0.0.1:{port}", log)
        if wait:
            wait_ready(sp.base_url, timeout=30, proc=proc)
        return sp

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
