"""nginx in a private prefix for `LocalCluster`: render, check, start, reload.

`NginxControl` is a mixin: `LocalCluster` provides `workdir`, `policy`, `port`, `workers`,
`max_output_tokens`, `model_names`, `_nginx_bin`, `_nginx`, `_replicas`, `_progress` and
`_save_state`.
The configuration comes from `components.policies.nginx_conf.nginx_conf`, the recipe cluster mode uses.
"""

from __future__ import annotations

import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from components.policies.balancing import HEALTH_PATH, LoadBalancingConfig
from components.policies.nginx_conf import nginx_conf
from local import privileges, procs
from local import tls as local_tls
from local.procs import LocalModeError
from server.settings import Settings, SettingsError, from_env

POLL_SECONDS = 0.05


class NginxControl:
    workdir: Path | None
    policy: LoadBalancingConfig
    port: int
    workers: int
    max_output_tokens: int
    model_names: list[str]
    models_created: int
    _nginx_bin: str | None
    _nginx: subprocess.Popen[bytes] | None
    _replicas: list[Any]
    _progress: Any
    tls: bool
    tls_certificate: Path | None
    _tls_key: Path | None
    _nginx_temp: Path | None
    # Also provided by LocalCluster: _save_state, _replica_env.

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

    def _replica_settings(self) -> Settings:
        """The replicas' own settings (admission limits), parsed as the server parses them."""
        try:
            return from_env(self._replica_env())
        except SettingsError as exc:
            raise LocalModeError(f"replica settings are invalid: {exc}") from None

    def _write_conf(self, replicas: list[Any]) -> None:
        replicas = [r for r in replicas if r.admitted]  # loading replicas join once ready
        if self.tls and self.tls_certificate is None:
            self.tls_certificate, self._tls_key = local_tls.self_signed(self._prefix)
        # As root, nginx's workers run as an unprivileged account (never root) with their own
        # temp dir; see local/privileges.py.
        account = privileges.worker_account()
        if account is not None and self._nginx_temp is None:
            self._nginx_temp = privileges.make_temp_dir(account)
        settings = self._replica_settings()
        upstreams: list[str] | dict[str, list[str]] = [f"127.0.0.1:{r.port}" for r in replicas]
        if len(self.model_names) > 1:  # one upstream per model, routed by the body's `model`
            upstreams = {name: [f"127.0.0.1:{r.port}" for r in replicas if r.model == number]
                         for number, name in enumerate(self.model_names)}
        try:
            conf = nginx_conf(
                self.policy, upstreams, self.port,
                self.max_output_tokens, prefix=self._prefix, daemon=False,
                worker_processes=self.workers,
                user=account.user if account else None, group=account.group if account else None,
                temp_dir=self._nginx_temp,
                # Requests the replicas admit at once (running + queued); session_hash_bounded's
                # bound counts in each replica's slots.
                admission_limit=max(len(replicas), 1) * (settings.max_concurrency
                                                         + settings.max_queue),
                replica_slots=settings.max_concurrency,
                tls_certificate=self.tls_certificate, tls_key=self._tls_key,
                models_created=self.models_created,
            )
        except ValueError as exc:  # e.g. a workdir path with spaces, which nginx.conf rejects
            raise LocalModeError(f"cannot render nginx.conf: {exc}; pick another --workdir") \
                from None
        self._conf_path.write_text(conf)

    def _check_conf(self) -> None:
        result = subprocess.run(self._nginx_args("-t", "-q"), capture_output=True, text=True,
                                timeout=30, check=False)
        if result.returncode != 0:
            message = (result.stderr or result.stdout).strip()
            if "LIMIT_HEAP" in message:  # the model-routing regex needs PCRE2
                message += ("\nrouting several models needs nginx 1.21.5 or later built with "
                            "PCRE2 (as Debian 12's nginx is)")
            raise LocalModeError(f"nginx rejected {self._conf_path}:\n{message}")

    def _start_nginx(self, timeout: float) -> None:
        self._write_conf(self._replicas)
        self._check_conf()
        start = time.monotonic()
        log = self.workdir / "nginx.log" if self.workdir else Path("nginx.log")
        self._nginx = procs.spawn(self._nginx_args(), log=log)
        self._save_state()
        scheme = "https" if self.tls else "http"
        verify: Any = (ssl.create_default_context(cafile=str(self.tls_certificate))
                       if self.tls_certificate else True)
        with httpx.Client(timeout=1.0, verify=verify) as client:
            while True:
                code = self._nginx.poll()
                if code is not None:
                    error_log = self._prefix / "error.log"
                    raise LocalModeError(
                        f"nginx exited with code {code}; last lines of {error_log}:\n"
                        + procs.log_tail(error_log) + "\n" + procs.log_tail(log))
                if answers(client, f"{scheme}://127.0.0.1:{self.port}{HEALTH_PATH}"):
                    break
                if time.monotonic() - start > timeout:
                    raise LocalModeError(f"nginx did not answer {HEALTH_PATH} on :{self.port} "
                                         f"within {timeout:.0f} s")
                time.sleep(POLL_SECONDS)
        models = f" of {len(self.model_names)} models" if len(self.model_names) > 1 else ""
        self._progress(f"nginx on :{self.port} ready, {policy_label(self.policy)} over "
                       f"{self.replicas} replica(s){models} ({time.monotonic() - start:.1f} s)")

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
            now = children(self._nginx.pid) or set()
            if now - before:
                break
            if time.monotonic() > deadline:
                raise LocalModeError(f"nginx did not start new workers within {timeout:.0f} s "
                                     f"after reload; see {self._prefix / 'error.log'}")
            time.sleep(POLL_SECONDS)
        old_deadline = time.monotonic() + old_grace
        while before & (children(self._nginx.pid) or set()) and time.monotonic() < old_deadline:
            time.sleep(POLL_SECONDS)


def policy_label(policy: LoadBalancingConfig) -> str:
    if policy.method == "session_hash":
        return f"session_hash on {policy.session_header}"
    return policy.method


def answers(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.TransportError:
        return False


def children(pid: int) -> set[int] | None:
    """Child PIDs from /proc (Linux); None where the kernel does not list them."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return {int(child) for child in path.read_text().split()}
    except (OSError, ValueError):
        return None
