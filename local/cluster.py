"""`LocalCluster`: N server replicas behind a real nginx on one machine, no root needed.

The same `nginx.conf` recipe as cluster mode (`components.balancing.nginx_conf`) runs in a
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
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from components.balancing import HEALTH_PATH, LoadBalancingConfig, nginx_conf
from local import privileges, procs
from local import tls as local_tls
from local.procs import LocalModeError
from server.settings import SettingsError, from_env

REPO_ROOT = Path(__file__).resolve().parents[1]
"""Replicas run `uvicorn server:app` from here."""

ENGINES = ("sim", "transformers")
DEFAULT_DRAIN_SECONDS = 30.0
"""The server's own default for LLM_DRAIN_SECONDS (server/settings.py)."""
KILL_GRACE_SECONDS = 5.0
"""Added to the drain deadline before SIGKILL: process exit and nginx's own wind-down."""
_POLL_SECONDS = 0.05
_WAITING_NOTE_EVERY = 10.0


@dataclass
class _Replica:
    index: int
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

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


class LocalCluster:
    """Replicas of the OpenAI-compatible server on consecutive ports, behind nginx.

    Use as a context manager (`with LocalCluster(3) as c:`) or call `start()`/`stop()`.
    `endpoint` is the OpenAI base URL through nginx; `replica_urls` reach replicas directly.
    Without `workdir` a private temporary directory is used and removed by `stop()`; pass one
    to keep the logs (`replica-<i>.log`, `nginx/error.log`).
    """

    def __init__(
        self,
        replicas: int = 3,
        *,
        engine: str = "sim",
        model: str | None = None,
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
        made at start; clients pass it as the CA to trust)."""
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        if engine == "transformers" and not model:
            raise ValueError("model is required with engine='transformers' (a hub id or a "
                             "local directory)")
        if not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {replicas!r}")
        _check_port("port", port)
        _check_port("first_replica_port", first_replica_port)
        _check_port("first_replica_port + replicas - 1", first_replica_port + replicas - 1)
        if api_key is not None and not api_key.strip():
            raise ValueError("api_key must not be blank; pass None to generate one")
        self.engine = engine
        self.model = model
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
        """Name clients send as `model`; confirmed from /v1/models once a replica is up."""
        self.supervisor_markers: list[str] | None = None
        """Set by the CLI: records this process in the state file so `down` signals it."""
        self._progress = on_progress or (lambda _message: None)
        self._nginx_arg = nginx
        self._nginx_bin: str | None = None
        self._owned_workdir = workdir is None
        self.workdir: Path | None = None if workdir is None else Path(workdir).resolve()
        self._replicas = [self._replica(i) for i in range(replicas)]
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
            self.model_name = self._served_model_name()
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
                raise LocalModeError(f"port {replica.port} is in use ({replica.label}); "
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
        before = _children(self._nginx.pid)
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
            self.workdir = Path(tempfile.mkdtemp(prefix="llm-local-")).resolve()
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
        return _Replica(index, self.first_replica_port + index, log_dir / f"replica-{index}.log")

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
            "policy": self.policy.method,
            "stop_timeout": self._stop_deadline(),
            "supervisor": supervisor,
            "nginx": nginx,
            "replicas": [
                {"index": r.index, "port": r.port, "log": str(r.log),
                 "pid": r.proc.pid if r.running() and r.proc else None, "markers": r.markers}
                for r in self._replicas
            ],
        })

    def _finish_stop(self) -> None:
        for replica in self._replicas:
            self._reap(replica)
        self._nginx = None
        self._stopped = True
        privileges.remove_temp_dir(self._nginx_temp)
        self._nginx_temp = None
        if self.workdir is not None:
            procs.remove_state(self.workdir)
            if self._owned_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    # --- replicas -----------------------------------------------------------------------------

    def _replica_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env |= {"LLM_ENGINE": self.engine, "LLM_API_KEY": self.api_key,
                "PYTHONUNBUFFERED": "1"}
        if self.model:
            env["LLM_MODEL"] = self.model
        env |= self.server_env
        return env

    def _spawn_replica(self, replica: _Replica) -> None:
        args = [sys.executable, "-m", "uvicorn", "server:app", "--host", "127.0.0.1",
                "--port", str(replica.port),
                # Access lines would grow the logs by one line per request under load.
                "--no-access-log", "--log-level", "warning"]
        replica.proc = procs.spawn(args, log=replica.log, env=self._replica_env(), cwd=REPO_ROOT)

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
                    if _answers(client, replica.url + "/ready"):
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
        """The served name, as server/settings.py derives it (before a replica confirms it)."""
        named = self.server_env.get("LLM_SERVED_MODEL_NAME")
        if named:
            return named
        return self.model or "sim-llm"

    def _served_model_name(self) -> str:
        """Ask the first replica: environment variables may change the name we expect."""
        try:
            answer = httpx.get(self._replicas[0].url + "/v1/models", timeout=5.0,
                               headers={"Authorization": f"Bearer {self.api_key}"})
            return str(answer.json()["data"][0]["id"])
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            return self.model_name

    # --- nginx --------------------------------------------------------------------------------

    @property
    def _prefix(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "nginx"

    @property
    def _conf_path(self) -> Path:
        return self._prefix / "nginx.conf"

    def _nginx_args(self, *extra: str) -> list[str]:
        assert self._nginx_bin is not None
        # -e: nginx opens its compiled-in error log (under /var/log) before reading the config.
        return [self._nginx_bin, "-p", f"{self._prefix}/", "-c", str(self._conf_path),
                "-e", str(self._prefix / "error.log"), *extra]

    def _admission_limit(self, replicas: int) -> int:
        """Requests the replicas admit at once (running + queued), from their own settings."""
        try:
            settings = from_env(self._replica_env())
        except SettingsError as exc:
            raise LocalModeError(f"replica settings are invalid: {exc}") from None
        return replicas * (settings.max_concurrency + settings.max_queue)

    def _replica_slots(self) -> int:
        """Each replica's LLM_MAX_CONCURRENCY (session_hash_bounded's bound counts in it)."""
        return from_env(self._replica_env()).max_concurrency

    def _write_conf(self, replicas: list[_Replica]) -> None:
        if self.tls and self.tls_certificate is None:
            self.tls_certificate, self._tls_key = local_tls.self_signed(self._prefix)
        # As root, nginx's workers run as an unprivileged account (never root) with their own
        # temp dir; see local/privileges.py.
        account = privileges.worker_account()
        if account is not None and self._nginx_temp is None:
            self._nginx_temp = privileges.make_temp_dir(account)
        try:
            conf = nginx_conf(
                self.policy, [f"127.0.0.1:{r.port}" for r in replicas], self.port,
                self.max_output_tokens, prefix=self._prefix, daemon=False,
                worker_processes=self.workers,
                user=account.user if account else None, group=account.group if account else None,
                temp_dir=self._nginx_temp, admission_limit=self._admission_limit(len(replicas)),
                replica_slots=self._replica_slots(),
                tls_certificate=self.tls_certificate, tls_key=self._tls_key,
            )
        except ValueError as exc:  # e.g. a workdir path with spaces, which nginx.conf rejects
            raise LocalModeError(f"cannot render nginx.conf: {exc}; pick another --workdir") \
                from None
        self._conf_path.write_text(conf)

    def _check_conf(self) -> None:
        result = subprocess.run(self._nginx_args("-t", "-q"), capture_output=True, text=True,
                                timeout=30, check=False)
        if result.returncode != 0:
            raise LocalModeError(f"nginx rejected {self._conf_path}:\n"
                                 + (result.stderr or result.stdout).strip())

    def _start_nginx(self, timeout: float) -> None:
        self._write_conf(self._replicas)
        self._check_conf()
        start = time.monotonic()
        log = self.workdir / "nginx.log" if self.workdir else Path("nginx.log")
        self._nginx = procs.spawn(self._nginx_args(), log=log)
        self._save_state()
        scheme = "https" if self.tls else "http"
        verify: Any = str(self.tls_certificate) if self.tls_certificate else True
        with httpx.Client(timeout=1.0, verify=verify) as client:
            while True:
                code = self._nginx.poll()
                if code is not None:
                    error_log = self._prefix / "error.log"
                    raise LocalModeError(
                        f"nginx exited with code {code}; last lines of {error_log}:\n"
                        + procs.log_tail(error_log) + "\n" + procs.log_tail(log))
                if _answers(client, f"{scheme}://127.0.0.1:{self.port}{HEALTH_PATH}"):
                    break
                if time.monotonic() - start > timeout:
                    raise LocalModeError(f"nginx did not answer {HEALTH_PATH} on :{self.port} "
                                         f"within {timeout:.0f} s")
                time.sleep(_POLL_SECONDS)
        self._progress(f"nginx on :{self.port} ready, {policy_label(self.policy)} over "
                       f"{self.replicas} replica(s) ({time.monotonic() - start:.1f} s)")

    def _wait_new_workers(self, before: set[int] | None, timeout: float = 5.0,
                          old_grace: float = 2.0) -> None:
        """Return once the new config is live: new workers run and the old ones are gone.

        Until an old worker has processed its QUIT it still accepts connections with the old
        upstreams. One that stays longer serves in-flight requests (streams) but no longer
        accepts, so after `old_grace` it is left to finish on its own.
        """
        if before is None:
            time.sleep(0.5)  # no /proc children list: give the master time to swap workers
            return
        assert self._nginx is not None
        deadline = time.monotonic() + timeout
        while True:
            now = _children(self._nginx.pid) or set()
            if now - before:
                break
            if time.monotonic() > deadline:
                raise LocalModeError(f"nginx did not start new workers within {timeout:.0f} s "
                                     f"after reload; see {self._prefix / 'error.log'}")
            time.sleep(_POLL_SECONDS)
        old_deadline = time.monotonic() + old_grace
        while before & (_children(self._nginx.pid) or set()) and time.monotonic() < old_deadline:
            time.sleep(_POLL_SECONDS)

    # --- stopping -----------------------------------------------------------------------------

    def _procs(self) -> list[subprocess.Popen[bytes]]:
        found = [r.proc for r in self._replicas if r.proc is not None]
        return found + ([self._nginx] if self._nginx is not None else [])

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

    def _check_ports(self, ports: list[tuple[int, str]]) -> None:
        for port, owner in ports:
            if procs.port_in_use(port):
                raise LocalModeError(f"port {port} is in use ({owner}); pick --port/--first-port "
                                     "or stop what holds it")


# --- module helpers ---------------------------------------------------------------------------


def policy_label(policy: LoadBalancingConfig) -> str:
    if policy.method == "session_hash":
        return f"session_hash on {policy.session_header}"
    return policy.method


def recorded_alive(state: Mapping[str, Any]) -> bool:
    """True when any process recorded in a state file still runs (with its command line)."""
    entries = [state.get("supervisor"), state.get("nginx"), *state.get("replicas", [])]
    return any(entry and entry.get("pid") and procs.owns(entry["pid"], entry["markers"])
               for entry in entries)


def stop_recorded(workdir: Path, on_progress: Callable[[str], None] = lambda _m: None) -> bool:
    """Stop the cluster recorded in `workdir/state.json` (`python -m local down`).

    The supervisor (`python -m local up`), if alive, gets SIGTERM and stops everything in
    order itself; whatever is left (a supervisor that was SIGKILLed) is stopped here the same
    way. Returns False when nothing was recorded.
    """
    state = procs.read_state(workdir)
    if state is None:
        return False
    deadline = float(state.get("stop_timeout", DEFAULT_DRAIN_SECONDS + KILL_GRACE_SECONDS))
    supervisor = state.get("supervisor")
    if supervisor and procs.owns(supervisor["pid"], supervisor["markers"]):
        on_progress(f"stopping the supervisor (pid {supervisor['pid']})")
        os.kill(supervisor["pid"], signal.SIGTERM)
        procs.wait_gone([supervisor["pid"]], deadline + KILL_GRACE_SECONDS)
    nginx = state.get("nginx")
    leftovers: list[int] = []
    if nginx and procs.owns(nginx["pid"], nginx["markers"]):
        on_progress(f"stopping nginx (pid {nginx['pid']})")
        os.kill(nginx["pid"], signal.SIGQUIT)
        leftovers.append(nginx["pid"])
    for replica in state.get("replicas", []):
        if replica.get("pid") and procs.owns(replica["pid"], replica["markers"]):
            on_progress(f"stopping replica {replica['index'] + 1} (pid {replica['pid']})")
            os.kill(replica["pid"], signal.SIGTERM)
            leftovers.append(replica["pid"])
    for pid in procs.wait_gone(leftovers, deadline):
        procs.signal_group(pid, signal.SIGKILL)  # each was started as its own group leader
    procs.remove_state(workdir)
    return True


def _check_port(what: str, port: int) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65_535:
        raise ValueError(f"{what} must be a port 1-65535, got {port!r}")


def _answers(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.TransportError:
        return False


def _children(pid: int) -> set[int] | None:
    """Child PIDs from /proc (Linux); None where the kernel does not list them."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return {int(child) for child in path.read_text().split()}
    except (OSError, ValueError):
        return None
