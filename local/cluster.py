"""`LocalCluster`: N server replicas behind a real nginx on one machine, no root needed.

One model by default; with `models` (local/models.py), the replicas of every model on
consecutive ports, model after model, and nginx routes each request by its `model` field
(components/policies/model_routing.py).

The same `nginx.conf` recipe as cluster mode (`components.policies.nginx_conf.nginx_conf`) runs in a
private prefix, so what a benchmark or a developer sees locally is the balancing, retry and
streaming behaviour of the deployed stack - only the replicas are processes instead of pods.

Stop order matters: nginx quits first (it closes its listener at once and lets in-flight
requests finish), the replicas get SIGTERM and drain (`LLM_DRAIN_SECONDS`), and whatever is
still alive after that deadline gets SIGKILL. Everything started is recorded in
`<workdir>/state.json`, so `python -m local down` can stop a cluster whose supervisor is gone.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from components.policies.balancing import LoadBalancingConfig
from local import cleanup, privileges, procs
from local.elastic import Elastic
from local.models import ENGINES, LocalModel, check_models  # noqa: F401 - ENGINES public
from local.nginx import NginxControl, answers, children, policy_label  # noqa: F401 - public
from local.procs import LocalModeError
from local.replicas import REPO_ROOT, ReplicaProcesses, _Replica  # noqa: F401 - public
from local.state import (  # noqa: F401 - public here too
    DEFAULT_DRAIN_SECONDS,
    KILL_GRACE_SECONDS,
    recorded_alive,
    stop_recorded,
)


class LocalCluster(NginxControl, Elastic, ReplicaProcesses):
    """Replicas of the OpenAI-compatible server on consecutive ports, behind nginx.

    Use as a context manager (`with LocalCluster(3) as c:`) or call `start()`/`stop()`.
    `endpoint` is the OpenAI base URL through nginx; `replica_urls` reach replicas directly.
    Without `workdir` a private temporary directory is used and removed by `stop()`; pass one
    to keep the logs (`replica-<i>.log`, `nginx/error.log`).
    """

    def __init__(
        self,
        replicas: int | None = None,
        *,
        engine: str = "sim",
        model: str | None = None,
        models: Sequence[LocalModel] | None = None,
        policy: LoadBalancingConfig | None = None,
        port: int = 8080,
        first_replica_port: int = 8000,
        api_key: str | None = None,
        workdir: Path | None = None,
        server_env: Mapping[str, str] | None = None,
        max_output_tokens: int = 512,
        on_progress: Callable[[str], None] | None = None,
        workers: int = 1,
        nginx: str | None = None,
        tls: bool = False,
    ) -> None:
        """`workers`: nginx worker_processes (1 by default; the upstream zone is shared
        anyway). `nginx`: path of the nginx binary, else PATH and the usual locations.
        `tls`: nginx serves HTTPS only, with a self-signed certificate (`tls_certificate`,
        made at start; clients pass it as the CA to trust).

        One model: `replicas` (default 3) of `engine`, loading `model` with transformers.
        Several: `models` instead (not with `replicas`, `engine` or `model`), each served under
        its own name by its own replicas; the first is the default model."""
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        if engine == "transformers" and not model:
            raise ValueError("model is required with engine='transformers' (a hub id or a "
                             "local directory)")
        if models is not None:
            if replicas is not None or engine != "sim" or model is not None:
                raise ValueError("pass either models or replicas/engine/model, not both")
            self.models = check_models(models)
        else:
            replicas = 3 if replicas is None else replicas
            if not isinstance(replicas, int) or replicas < 1:
                raise ValueError(f"replicas must be at least 1, got {replicas!r}")
            named = (server_env or {}).get("LLM_SERVED_MODEL_NAME")
            self.models = (LocalModel(named or model or "sim-llm", replicas, engine, model),)
        self._named_models = models is not None
        """Each replica gets its model's LLM_SERVED_MODEL_NAME (one model: the server's own
        name, confirmed once a replica is up)."""
        total = sum(m.replicas for m in self.models)
        _check_port("port", port)
        _check_port("first_replica_port", first_replica_port)
        _check_port("first_replica_port + replicas - 1", first_replica_port + total - 1)
        if api_key is not None and not api_key.strip():
            raise ValueError("api_key must not be blank; pass None to generate one")
        self.engine = self.models[0].engine
        self.model = self.models[0].model_id
        self.policy = policy if policy is not None else LoadBalancingConfig()
        self.port = port
        self.first_replica_port = first_replica_port
        self.api_key = api_key.strip() if api_key is not None else secrets.token_urlsafe(24)
        self.server_env = dict(server_env or {})
        self.max_output_tokens = max_output_tokens
        self.workers = workers
        self.tls = tls
        self.tls_certificate: Path | None = None
        """The self-signed certificate nginx presents (with `tls`), once started."""
        self._tls_key: Path | None = None
        self.endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{port}/v1"
        self.model_name = self._expected_model_name()
        """Name clients send as `model` (the first model's); confirmed from /v1/models once a
        replica is up."""
        self.models_created = int(time.time())
        """`created` of the model cards nginx lists at /v1/models (several models)."""
        self.supervisor_markers: list[str] | None = None
        """Set by the CLI: records this process in the state file so `down` signals it."""
        self._progress = on_progress or (lambda _message: None)
        self._nginx_arg = nginx
        self._nginx_bin: str | None = None
        self._owned_workdir = workdir is None
        self.workdir: Path | None = None if workdir is None else Path(workdir).resolve()
        self._replicas = [self._replica(i) for i in range(total)]
        self.extra_state: dict[str, Any] = {}
        """Recorded in state.json beside the cluster (e.g. the local Prometheus)."""
        self._draining: list[_Replica] = []
        """Replicas removed by scale-down that are still finishing their requests."""
        self._nginx: subprocess.Popen[bytes] | None = None
        self._nginx_temp: Path | None = None
        self._stopped = True

    # --- public API ------------------------------------------------------------------------

    @property
    def replica_urls(self) -> list[str]:
        """`http://127.0.0.1:<port>` of every replica (no /v1), for direct access."""
        return [replica.url for replica in self._replicas]

    @property
    def replicas(self) -> int:
        """How many replicas nginx balances over."""
        return len(self._replicas)

    @property
    def model_names(self) -> list[str]:
        """Served names, in order; the first is the default model."""
        return [self.model_name] if not self._named_models else \
            [m.served_name for m in self.models]

    @property
    def replica_models(self) -> list[str]:
        """The served name of every replica (as `replica_urls` lists them)."""
        return [self.model_names[r.model] for r in self._replicas]

    @property
    def replica_logs(self) -> list[Path]:
        return [replica.log for replica in self._replicas]

    @property
    def running(self) -> bool:
        """True between a successful start() and stop()."""
        return not self._stopped

    @property
    def nginx_pid(self) -> int | None:
        """PID of the nginx master while it runs, else None."""
        if self._nginx is None or self._nginx.poll() is not None:
            return None
        return self._nginx.pid

    @property
    def replica_pids(self) -> list[int | None]:
        """PID of every replica, None for one that is not running."""
        return [r.proc.pid if r.running() and r.proc else None for r in self._replicas]

    def start(self, timeout: float = 120.0) -> Self:
        """Start the replicas, wait for /ready on each, then nginx and /nginx-health.

        Raises LocalModeError (after stopping whatever it started) when nginx is missing, a
        port is taken, a replica exits or is not ready in time, or nginx fails.
        """
        if not self._stopped:
            raise LocalModeError("this cluster is already running")
        self._nginx_bin = procs.find_nginx(self._nginx_arg)
        self._refuse_if_running()
        self._check_ports([(self.port, "nginx")]
                          + [(r.port, f"replica {r.index + 1}") for r in self._replicas])
        self._prepare_workdir()
        self._stopped = False
        try:
            for replica in self._replicas:
                replica.log.write_bytes(b"")  # a fresh run: the tail shows only this run
                self._spawn_replica(replica)
            self._save_state()
            self._wait_ready(self._replicas, timeout)
            self._confirm_model_names()
            self._start_nginx(timeout=min(timeout, 15.0))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """nginx graceful quit, replicas SIGTERM (they drain), SIGKILL after the deadline.

        Idempotent. A Ctrl-C while waiting kills everything at once and re-raises.
        """
        if self._stopped:
            return
        try:
            if self._nginx is not None and self._nginx.poll() is None:
                os.kill(self._nginx.pid, signal.SIGQUIT)
            for replica in self._replicas:
                if replica.running():
                    assert replica.proc is not None
                    replica.proc.send_signal(signal.SIGTERM)
            self._wait_or_kill(self._procs(), self._stop_deadline())
        except KeyboardInterrupt:
            self._wait_or_kill(self._procs(), 0.0)
            self._finish_stop()
            raise
        self._finish_stop()

    def start_replica(self, index: int, timeout: float = 60.0) -> None:
        """Start replica `index` if it is not running, and wait until it is ready."""
        replica = self._replica_at(index)
        if not replica.running():
            self._reap(replica)
            if procs.port_in_use(replica.port):
                raise LocalModeError(f"{procs.port_busy(replica.port, f'replica {replica.index + 1}')}; "
                                     "stop what holds it")
            self._spawn_replica(replica)
            self._save_state()
        self._wait_ready([replica], timeout)

    def restart_replica(self, index: int, timeout: float = 60.0) -> None:
        """SIGTERM replica `index`, wait for it to drain and exit, start it, wait for ready,
        then reload nginx.

        The draining replica's 503s were retried elsewhere but also marked its port failed
        (max_fails), so nginx would skip the ready replica for fail_timeout; with 2 replicas
        a second restart inside that window leaves no live upstream (502). Fresh nginx
        workers start without failure marks.
        """
        replica = self._replica_at(index)
        if replica.running():
            assert replica.proc is not None
            replica.proc.send_signal(signal.SIGTERM)
            self._wait_or_kill([replica.proc], self._stop_deadline())
        self.start_replica(index, timeout)
        if self._nginx is not None and self._nginx.poll() is None:
            self.reload_nginx()

    def kill_replica(self, index: int) -> None:
        """SIGKILL replica `index` (fault drills): no drain, connections are reset."""
        replica = self._replica_at(index)
        if replica.running():
            assert replica.proc is not None
            procs.signal_group(replica.proc.pid, signal.SIGKILL)
            replica.proc.wait(timeout=10)
        self._reap(replica)

    def reload_nginx(self, replicas: int | None = None,
                     policy: LoadBalancingConfig | None = None) -> None:
        """Re-render nginx.conf and reload nginx without dropping connections.

        With `replicas`, new replicas are started (and ready) before the reload, and surplus
        ones are drained and stopped after it, so no request is routed to a missing replica.
        """
        if self._nginx is None or self._nginx.poll() is not None:
            raise LocalModeError("nginx is not running; start() the cluster first")
        if replicas is not None and (not isinstance(replicas, int) or replicas < 1):
            raise ValueError(f"replicas must be at least 1, got {replicas!r}")
        if replicas is not None and replicas != self.replicas:
            self._refuse_scaling()
        wanted = self.replicas if replicas is None else replicas
        added = [self._replica(i) for i in range(self.replicas, wanted)]
        if added:
            _check_port("first_replica_port + replicas - 1", added[-1].port)
            self._check_ports([(r.port, f"replica {r.index + 1}") for r in added])
            self._replicas.extend(added)
            for replica in added:
                replica.log.write_bytes(b"")
                self._spawn_replica(replica)
            self._save_state()
            self._wait_ready(added, 60.0)
        if policy is not None:
            self.policy = policy
        surplus = self._replicas[wanted:]
        self._write_conf(self._replicas[:wanted])
        self._check_conf()
        before = children(self._nginx.pid)
        self._nginx.send_signal(signal.SIGHUP)
        self._wait_new_workers(before)
        self._progress(f"nginx reloaded: {policy_label(self.policy)} over {wanted} replica(s)")
        if surplus:
            del self._replicas[wanted:]
            for replica in surplus:
                if replica.running():
                    assert replica.proc is not None
                    replica.proc.send_signal(signal.SIGTERM)
            self._wait_or_kill([r.proc for r in surplus if r.proc is not None],
                               self._stop_deadline())
            self._save_state()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # --- workdir, state ---------------------------------------------------------------------

    def _prepare_workdir(self) -> None:
        if self.workdir is None or (self._owned_workdir and not self.workdir.exists()):
            # Only [A-Za-z0-9_] in mkdtemp's suffix: nginx_conf accepts the path.
            self.workdir = cleanup.temp_dir("llm-local-")
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.workdir / "nginx").mkdir(mode=0o700, exist_ok=True)
        for replica in self._replicas:
            replica.log = self.workdir / f"replica-{replica.index}.log"

    def _refuse_if_running(self) -> None:
        """A second `up` on the same workdir would overwrite the first one's state file."""
        if self.workdir is None or self._owned_workdir:
            return
        recorded = procs.read_state(self.workdir)
        if recorded is not None and recorded_alive(recorded):
            raise LocalModeError(
                f"a local cluster is already running from {self.workdir} "
                f"({recorded.get('endpoint')}); stop it with: python -m local down "
                f"--workdir {self.workdir}")

    def _replica(self, index: int) -> _Replica:
        # Until start() picks the workdir (a temporary one by default) the log path is a
        # placeholder; _prepare_workdir sets the real one.
        log_dir = self.workdir if self.workdir is not None else Path(".")
        return _Replica(index, self.first_replica_port + index, log_dir / f"replica-{index}.log",
                        model=self._model_at(index))

    def _model_at(self, index: int) -> int:
        """The model of the replica at `index`: models take consecutive ranges, in order
        (scaling, one model only, adds replicas beyond them)."""
        end = 0
        for number, model in enumerate(self.models):
            end += model.replicas
            if index < end:
                return number
        return len(self.models) - 1

    def _refuse_scaling(self) -> None:
        if len(self.models) > 1:
            raise LocalModeError(
                f"scaling a running cluster serves one model; this one serves "
                f"{len(self.models)} ({', '.join(self.model_names)})")

    def _replica_at(self, index: int) -> _Replica:
        if not 0 <= index < len(self._replicas):
            raise IndexError(f"replica index {index} out of range 0-{len(self._replicas) - 1}")
        return self._replicas[index]

    def _save_state(self) -> None:
        assert self.workdir is not None
        nginx = None
        if self._nginx is not None and self._nginx.poll() is None:
            nginx = {"pid": self._nginx.pid, "markers": [f"-c {self._conf_path}"]}
        supervisor = None
        if self.supervisor_markers is not None:
            supervisor = {"pid": os.getpid(), "markers": self.supervisor_markers}
        procs.write_state(self.workdir, {
            "endpoint": self.endpoint,
            "api_key": self.api_key,
            "model": self.model_name,
            "models": self.model_names,
            "policy": self.policy.method,
            "stop_timeout": self._stop_deadline(),
            "supervisor": supervisor,
            "nginx": nginx,
            **self.extra_state,
            "replicas": [
                {"index": r.index, "port": r.port, "log": str(r.log),
                 "model": self.model_names[r.model],
                 "pid": r.proc.pid if r.running() and r.proc else None, "markers": r.markers}
                for r in self._replicas + self._draining
            ],
        })

    def save_state(self) -> None:
        """Rewrite state.json (after changing `extra_state`)."""
        self._save_state()

    def _finish_stop(self) -> None:
        for replica in self._replicas:
            self._reap(replica)
        self._draining.clear()
        self._nginx = None
        self._stopped = True
        privileges.remove_temp_dir(self._nginx_temp)
        self._nginx_temp = None
        if self.workdir is not None:
            procs.remove_state(self.workdir)
            if self._owned_workdir:
                cleanup.remove_temp_dir(self.workdir)

    # --- stopping -----------------------------------------------------------------------------

    def _procs(self) -> list[subprocess.Popen[bytes]]:
        found = [r.proc for r in self._replicas + self._draining if r.proc is not None]
        return found + ([self._nginx] if self._nginx is not None else [])

    def _check_ports(self, ports: list[tuple[int, str]]) -> None:
        for port, owner in ports:
            if procs.port_in_use(port):
                raise LocalModeError(f"{procs.port_busy(port, owner)}; pick --port/--first-port "
                                     "or stop what holds it")


# --- module helpers ---------------------------------------------------------------------------


def _check_port(what: str, port: int) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65_535:
        raise ValueError(f"{what} must be a port 1-65535, got {port!r}")
