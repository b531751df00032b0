"""Scaling a running `LocalCluster` one replica at a time, in the order Kubernetes does it.

`Elastic` is a mixin of `LocalCluster` (it uses the cluster's replica list, nginx reload and
state file). Nothing here blocks for a model load or a drain, so an autoscaler loop keeps
polling while replicas come and go:

* `add_replica()` starts a replica on the next free port and returns at once; like a pod that
  is not Ready yet, it gets no traffic.
* `admit_ready()` puts every added replica that answers `/ready` into nginx's upstream (one
  reload), like the endpoints controller adding a Ready pod.
* `retire_replica()` takes the newest replica away: one still loading is stopped at once (a
  ReplicaSet deletes unready pods first); a serving one is first removed from nginx (reload:
  no new requests reach it) and only then gets SIGTERM, so it drains what it has, like
  endpoints removal before the preStop hook and SIGTERM in the cluster.
* `reap_draining()` collects retired replicas that have exited, and SIGKILLs one still
  running after the drain deadline (the pod's terminationGracePeriodSeconds).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from local import procs
from local.procs import LocalModeError


class Elastic:
    workdir: Path | None
    first_replica_port: int
    _replicas: list[Any]
    _draining: list[Any]
    _nginx: subprocess.Popen[bytes] | None

    # Also provided by LocalCluster: _replica, _spawn_replica, _save_state, _stop_deadline,
    # reload_nginx, _refuse_scaling (scaling serves one model).

    @property
    def serving(self) -> int:
        """Replicas in nginx's upstream."""
        return sum(1 for r in self._replicas if r.admitted)

    @property
    def serving_ports(self) -> list[int]:
        """Ports of the replicas in nginx's upstream (what a Service's endpoints would hold)."""
        return [r.port for r in self._replicas if r.admitted]

    @property
    def starting(self) -> int:
        """Replicas added by scaling that are not ready yet."""
        return sum(1 for r in self._replicas if not r.admitted)

    @property
    def draining(self) -> int:
        """Retired replicas still finishing their requests."""
        return len(self._draining)

    def add_replica(self) -> int:
        """Start one more replica (not routed to until `admit_ready`); return its index."""
        self._refuse_scaling()
        used = {r.index for r in self._replicas + self._draining}
        index = 0
        while index in used or procs.port_in_use(self.first_replica_port + index):
            index += 1
            if self.first_replica_port + index > 65_535:
                raise LocalModeError("no free port left above first_replica_port")
        replica = self._replica(index)
        replica.admitted = False
        replica.log.write_bytes(b"")
        self._spawn_replica(replica)
        self._replicas.append(replica)
        self._save_state()
        return index

    def admit_ready(self) -> list[int]:
        """Route to every added replica that is ready now; return their indexes.

        A replica that exited while loading is dropped (and reported by its log).
        """
        ready, dead = [], []
        with httpx.Client(timeout=1.0) as client:
            for replica in self._replicas:
                if replica.admitted:
                    continue
                if not replica.running():
                    dead.append(replica)
                    continue
                try:
                    if client.get(replica.url + "/ready").status_code == 200:
                        ready.append(replica)
                except httpx.TransportError:
                    pass
        for replica in dead:
            self._replicas.remove(replica)
        if ready:
            for replica in ready:
                replica.admitted = True
            self.reload_nginx()
        if dead:
            self._save_state()
            raise LocalModeError(
                "replica(s) exited while loading: "
                + "; ".join(f"{r.label}, log {r.log}:\n{procs.log_tail(r.log)}" for r in dead))
        return [r.index for r in ready]

    def retire_replica(self) -> int | None:
        """Remove the newest replica (loading ones first); None when only one serves."""
        self._refuse_scaling()
        loading = [r for r in self._replicas if not r.admitted]
        if loading:
            victim = max(loading, key=lambda r: r.index)
        elif len(self._replicas) > 1:
            victim = max(self._replicas, key=lambda r: r.index)
        else:
            return None
        self._replicas.remove(victim)
        if victim.admitted:
            self.reload_nginx()  # new workers no longer route to it; it still finishes streams
        if victim.running():
            assert victim.proc is not None
            victim.proc.send_signal(signal.SIGTERM)
            victim.retired_at = time.monotonic()
            self._draining.append(victim)
        self._save_state()
        return victim.index

    def reap_draining(self) -> list[int]:
        """Forget retired replicas that exited; SIGKILL those past the drain deadline."""
        gone = []
        for replica in list(self._draining):
            assert replica.proc is not None
            if replica.proc.poll() is not None:
                gone.append(replica)
            elif time.monotonic() - replica.retired_at > self._stop_deadline():
                procs.signal_group(replica.proc.pid, signal.SIGKILL)
                replica.proc.wait(timeout=10)
                gone.append(replica)
        for replica in gone:
            self._draining.remove(replica)
        if gone:
            self._save_state()
        return [r.index for r in gone]
