"""Replica processes of `LocalCluster`: spawn, wait for /ready, names, stop deadlines.

`ReplicaProcesses` is a mixin; `LocalCluster` provides `models`, `api_key`, `server_env`,
`model_name`, `model_names`, `_named_models`, `_replicas` and `_progress`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from local import procs
from local.models import LocalModel
from local.nginx import answers
from local.procs import LocalModeError
from local.state import DEFAULT_DRAIN_SECONDS, KILL_GRACE_SECONDS

REPO_ROOT = Path(__file__).resolve().parents[1]
"""Replicas run `uvicorn server:app` from here."""
_POLL_SECONDS = 0.05
_WAITING_NOTE_EVERY = 10.0


@dataclass
class _Replica:
    index: int
    port: int
    log: Path
    model: int = 0
    """Which of the cluster's models it serves (an index into `models`)."""
    proc: subprocess.Popen[bytes] | None = None
    admitted: bool = True
    """In nginx's upstream; False while a replica added by scaling still loads."""
    retired_at: float | None = None
    """When scale-down sent SIGTERM (monotonic), for the kill deadline."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def label(self) -> str:
        return f"replica {self.index + 1} on :{self.port}"

    @property
    def markers(self) -> list[str]:
        # The trailing space keeps "--port 800" from matching "--port 8000".
        return ["server:app", f"--port {self.port} "]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class ReplicaProcesses:
    models: tuple[LocalModel, ...]
    api_key: str
    server_env: dict[str, str]
    model_name: str
    model_names: list[str]
    _named_models: bool
    _replicas: list[Any]
    _progress: Any

    def _replica_env(self, model: int = 0) -> dict[str, str]:
        """The environment of a replica of `models[model]`."""
        spec = self.models[model]
        env = dict(os.environ)
        env |= {"LLM_ENGINE": spec.engine, "LLM_API_KEY": self.api_key,
                "PYTHONUNBUFFERED": "1"}
        if spec.model_id:
            env["LLM_MODEL"] = spec.model_id
        env |= self.server_env
        if self._named_models:  # nginx routes by these names: each replica must serve its own
            env["LLM_SERVED_MODEL_NAME"] = spec.served_name
        return env

    def _spawn_replica(self, replica: _Replica) -> None:
        args = [sys.executable, "-m", "uvicorn", "server:app", "--host", "127.0.0.1",
                "--port", str(replica.port),
                # Access lines would grow the logs by one line per request under load.
                "--no-access-log", "--log-level", "warning"]
        replica.proc = procs.spawn(args, log=replica.log, env=self._replica_env(replica.model),
                                   cwd=REPO_ROOT)

    def _wait_ready(self, replicas: list[_Replica], timeout: float) -> None:
        """Poll /ready on every replica; report each as it turns ready; fail on exit/timeout."""
        start = time.monotonic()
        pending = list(replicas)
        total = len(self._replicas)
        next_note = start + _WAITING_NOTE_EVERY
        with httpx.Client(timeout=1.0) as client:
            while pending:
                for replica in list(pending):
                    assert replica.proc is not None
                    code = replica.proc.poll()
                    if code is not None:
                        raise LocalModeError(
                            f"{replica.label} exited with code {code} before it was ready; "
                            f"last lines of {replica.log}:\n{procs.log_tail(replica.log)}")
                    if answers(client, replica.url + "/ready"):
                        pending.remove(replica)
                        self._progress(f"replica {replica.index + 1}/{total} on "
                                       f":{replica.port} ready ({time.monotonic() - start:.1f} s)")
                now = time.monotonic()
                if pending and now - start > timeout:
                    replica = pending[0]
                    raise LocalModeError(
                        f"{replica.label} was not ready after {timeout:g} s; last lines of "
                        f"{replica.log}:\n{procs.log_tail(replica.log)}")
                if pending and now >= next_note:
                    next_note = now + _WAITING_NOTE_EVERY
                    waiting = ", ".join(f":{r.port}" for r in pending)
                    self._progress(f"still loading: {waiting} ({now - start:.0f} s)")
                if pending:
                    time.sleep(_POLL_SECONDS)

    def _reap(self, replica: _Replica) -> None:
        if replica.proc is not None and replica.proc.poll() is not None:
            replica.proc = None

    def _expected_model_name(self) -> str:
        """The (first) served name, as server/settings.py derives it (before a replica
        confirms it)."""
        if self._named_models:
            return self.models[0].served_name
        named = self.server_env.get("LLM_SERVED_MODEL_NAME")
        if named:
            return named
        return self.models[0].model_id or "sim-llm"

    def _served_model_name(self, replica: _Replica) -> str | None:
        """The name `replica` serves, from its /v1/models; None when it does not say."""
        try:
            answer = httpx.get(replica.url + "/v1/models", timeout=5.0,
                               headers={"Authorization": f"Bearer {self.api_key}"})
            return str(answer.json()["data"][0]["id"])
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            return None

    def _confirm_model_names(self) -> None:
        """One model: take the name its first replica serves (environment variables may change
        the name we expect). Several: each model's first replica must serve its name, which
        nginx routes by."""
        if not self._named_models:
            self.model_name = self._served_model_name(self._replicas[0]) or self.model_name
            return
        for number, model in enumerate(self.models):
            replica = next(r for r in self._replicas if r.model == number)
            served = self._served_model_name(replica)
            if served != model.served_name:
                raise LocalModeError(
                    f"{replica.label} serves {served!r}, not {model.served_name!r}: nginx "
                    "routes by the name, so no request would reach it")

    def _stop_deadline(self) -> float:
        """Seconds a stop may take: the replicas' drain deadline plus a grace period."""
        raw = self.server_env.get("LLM_DRAIN_SECONDS", os.environ.get("LLM_DRAIN_SECONDS", ""))
        try:
            drain = float(raw) if raw.strip() else DEFAULT_DRAIN_SECONDS
        except ValueError:
            drain = DEFAULT_DRAIN_SECONDS
        return drain + KILL_GRACE_SECONDS

    @staticmethod
    def _wait_or_kill(processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
        """Wait for `processes` to exit; SIGKILL the process groups of any still running."""
        left = procs.wait_gone([p.pid for p in processes], timeout, processes)
        for pid in left:
            procs.signal_group(pid, signal.SIGKILL)
        procs.wait_gone(left, 10.0, processes)
        for proc in processes:
            # nginx workers share the master's group: take any the master left behind.
            procs.signal_group(proc.pid, signal.SIGKILL)
