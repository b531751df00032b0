"""End to end: a real Prometheus scrapes real replicas, the rendered query runs unchanged, a
queue builds and the local autoscaler adds a replica that then serves; the sim engine's load
time delays readiness."""

from __future__ import annotations

import threading
import time

import httpx
from starlette.testclient import TestClient

from components.config.parse import parse_stack_config
from components.engines import PROFILES
from components.policies.scaling import ScalingPolicy
from local import LocalCluster
from local.autoscaler import LocalAutoscaler
from local.prometheus import LocalPrometheus
from server import create_app, from_env
from tests.local.support import FAST_SIM, free_port_range

SLOW_ONE_SLOT = {**FAST_SIM, "LLM_MAX_CONCURRENCY": "1", "LLM_SIM_DECODE_BASE_MS": "40",
                 "LLM_SIM_LOAD_SECONDS": "0.5"}
"""One slot and 40 ms per token: a handful of requests queue for seconds."""


def test_a_queue_builds_and_the_autoscaler_adds_a_replica_that_serves(tmp_path, binaries):
    cfg = parse_stack_config({
        "model": {"id": "m", "loadTimeoutSeconds": 10}, "namespace": "e2e",
        "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 2,
                        "targetWaitingPerReplica": 1, "pollingIntervalSeconds": 1,
                        "scaleDownStabilizationSeconds": 60},
    })
    policy = ScalingPolicy.for_stack(cfg, PROFILES["server"]).compressed(2)
    assert policy.triggers[0].query == 'sum(llm_requests_waiting{namespace="e2e"})'
    base = free_port_range(5)
    deadline = time.monotonic() + 40
    with LocalCluster(1, port=base, first_replica_port=base + 1, server_env=SLOW_ONE_SLOT,
                      workdir=tmp_path / "run") as cluster, \
            LocalPrometheus(tmp_path / "run", namespace="e2e", port=base + 4,
                            scrape_interval_seconds=0.25) as prom:
        scaler = LocalAutoscaler(cluster, prom, policy, log=tmp_path / "decisions.jsonl")
        scaler.start()
        try:
            # The replica's series must be in Prometheus before the load (its scrape manager
            # picks up new targets on a 5 s tick).
            while prom.query('count(up{namespace="e2e"} == 1)') < 1:
                assert time.monotonic() < deadline, "prometheus never scraped the replica"
                time.sleep(0.2)
            threads = [threading.Thread(target=_chat, args=(cluster,)) for _ in range(5)]
            for thread in threads:
                thread.start()
            while cluster.serving < 2:
                assert time.monotonic() < deadline, f"no replica added: {scaler.decisions[-3:]}"
                time.sleep(0.1)
            for thread in threads:
                thread.join(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            scaler.stop()
    up = [d for d in scaler.decisions if d.desired > d.current]
    assert up, "the rule never asked for more replicas"
    assert up[0].metrics[0] >= 2  # the waiting requests, read through the rendered query
    assert [kind for _, kind, _ in scaler.events][:2] == ["added", "serving"]
    assert not scaler.errors
    assert (tmp_path / "decisions.jsonl").read_text().count("\n") == len(scaler.decisions)


def _chat(cluster: LocalCluster) -> None:
    httpx.post(cluster.endpoint + "/chat/completions", timeout=30,
               headers={"Authorization": f"Bearer {cluster.api_key}"},
               json={"model": "sim-llm", "max_tokens": 40,
                     "messages": [{"role": "user", "content": "hi"}]})


def test_sim_load_seconds_keeps_ready_at_503_until_loaded():
    settings = from_env({}, sim_load_seconds=0.4)
    started = time.monotonic()
    with TestClient(create_app(settings)) as client:
        assert client.get("/ready").status_code == 503
        assert client.get("/health").status_code == 200
        while client.get("/ready").status_code != 200:
            assert time.monotonic() - started < 5
            time.sleep(0.02)
        assert time.monotonic() - started >= 0.4
    assert from_env({}).sim_load_seconds == 0
