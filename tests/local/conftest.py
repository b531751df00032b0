"""Fixtures for local mode: real replicas and a real nginx on 127.0.0.1, always stopped."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from local import LocalCluster
from local.procs import LocalModeError, find_nginx
from tests.local.support import FAST_SIM, assert_gone, free_port_range

# Skipped on a laptop without nginx; never in CI, where .ci/run installs it and a
# missing binary must fail loudly rather than pass as skipped.
try:
    find_nginx()
except LocalModeError:
    if not os.environ.get("CI"):
        pytest.skip("nginx is not installed (apt-get install nginx-light)", allow_module_level=True)


@pytest.fixture
def make_cluster() -> Iterator[Callable[..., LocalCluster]]:
    """Start clusters on free consecutive ports; stop them all and check nothing survives."""
    started: list[LocalCluster] = []

    def make(replicas: int = 3, **kwargs: Any) -> LocalCluster:
        """`replicas` of one model, or `models=[LocalModel(...), ...]`."""
        models = kwargs.get("models")
        count = sum(m.replicas for m in models) if models else replicas
        base = free_port_range(count + 2)  # one spare: a test grows to replicas + 1
        kwargs.setdefault("server_env", FAST_SIM)
        cluster = LocalCluster(None if models else replicas, port=base,
                               first_replica_port=base + 1, **kwargs)
        started.append(cluster)
        return cluster.start(timeout=30)

    yield make
    for cluster in started:
        pids = [cluster.nginx_pid, *cluster.replica_pids]
        cluster.stop()
        assert_gone([pid for pid in pids if pid is not None])
