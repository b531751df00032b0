"""K NGINX instances over the same replicas, as K ingress-controller pods behind a cloud load
balancer: each has its own upstream zone, so its in-flight counts (least_conn, max_conns) are
its own, and the client spreads its requests across them. session_hash_bounded's bound is
shared out over the instances, as the cluster rendering shares it over the controller pods.

Each instance is the local-mode nginx.conf (`components.policies.nginx_conf.nginx_conf`) in a private
prefix with one worker, started in the foreground (in its own session, recorded by
`local.cleanup` like every process local mode starts) and stopped by the PID started here.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Self

import httpx

from bench.ports import free_ports
from components.policies.balancing import HEALTH_PATH, LoadBalancingConfig
from components.policies.nginx_conf import nginx_conf
from local import cleanup, privileges
from local.procs import find_nginx, signal_group, spawn


class _PortTaken(Exception):
    pass


class NginxPool:
    """``instances`` nginx processes on consecutive free ports (``first_port`` seeds the choice;
    `ports` says which)."""

    def __init__(self, upstreams: Sequence[str], instances: int, first_port: int, *,
                 max_output_tokens: int, replica_slots: int, admission_limit: int) -> None:
        if instances < 1:
            raise ValueError(f"instances must be at least 1, got {instances}")
        self.upstreams = list(upstreams)
        self.instances = instances
        self._rng = random.Random(first_port)
        base = free_ports(instances, self._rng)
        self.ports = [base + i for i in range(instances)]
        self.max_output_tokens = max_output_tokens
        self.replica_slots = replica_slots
        self.admission_limit = admission_limit
        self._bin = find_nginx()
        self._dir = cleanup.temp_dir("bench_nginx_")
        self._account = privileges.worker_account()
        self._temp = privileges.make_temp_dir(self._account) if self._account else None
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def endpoints(self) -> list[str]:
        return [f"http://127.0.0.1:{port}/v1" for port in self.ports]

    def start(self, policy: LoadBalancingConfig, timeout: float = 15.0) -> None:
        """(Re)start every instance with ``policy``: fresh processes, so no counts carry over.
        A port taken meanwhile by another process moves the pool to other free ports."""
        for attempt in range(5):
            try:
                return self._start(policy, timeout)
            except _PortTaken:
                self.stop()
                base = free_ports(self.instances, self._rng)
                self.ports = [base + i for i in range(self.instances)]
        raise RuntimeError(f"no free ports for {self.instances} nginx instance(s)")

    def _start(self, policy: LoadBalancingConfig, timeout: float) -> None:
        self.stop()
        for i, port in enumerate(self.ports):
            prefix = self._dir / f"nginx{i}"
            prefix.mkdir(exist_ok=True)
            conf = nginx_conf(
                policy, self.upstreams, port, self.max_output_tokens, prefix=prefix,
                worker_processes=1, admission_limit=self.admission_limit,
                user=self._account.user if self._account else None,
                group=self._account.group if self._account else None,
                temp_dir=(self._temp / f"nginx{i}") if self._temp else None,
                replica_slots=self.replica_slots, nginx_instances=self.instances)
            if self._temp is not None and self._account is not None:
                (self._temp / f"nginx{i}").mkdir(exist_ok=True)
                shutil.chown(self._temp / f"nginx{i}", self._account.uid, self._account.gid)
            (prefix / "nginx.conf").write_text(conf)
            (prefix / "error.log").write_text("")  # spill_count and the port check read it
            self._procs.append(spawn(
                [self._bin, "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"),
                 "-e", str(prefix / "error.log")], log=subprocess.DEVNULL))
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as client:
            for proc, port in zip(self._procs, self.ports):
                while True:
                    if proc.poll() is not None:
                        if "Address already in use" in self.error_log(self.ports.index(port)):
                            raise _PortTaken(port)
                        raise RuntimeError(f"nginx on :{port} exited with {proc.returncode}: "
                                           + self.error_log(self.ports.index(port))[-2000:])
                    try:
                        if client.get(f"http://127.0.0.1:{port}{HEALTH_PATH}").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"nginx on :{port} did not become ready")
                    time.sleep(0.05)

    def error_log(self, i: int) -> str:
        path = self._dir / f"nginx{i}" / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def spill_count(self) -> int:
        """Requests that found every replica at its bound so far (nginx logs each one)."""
        return sum(self.error_log(i).count("no live upstreams") for i in range(self.instances))

    def picker(self, seed: int):
        """Which instance a request goes to: uniformly at random, as a cloud load balancer
        hashing each new connection's ports would."""
        rng = random.Random(seed)
        endpoints = self.endpoints
        return lambda _request: rng.choice(endpoints) + "/chat/completions"

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            signal_group(proc.pid, signal.SIGKILL)  # a worker its master left behind
        self._procs = []

    def close(self) -> None:
        self.stop()
        cleanup.remove_temp_dir(self._dir)
        privileges.remove_temp_dir(self._temp)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
