"""The stack's rules in local mode's real Prometheus: the backlog alert fires
under a queue and resolves when it drains; the drill's timing arithmetic."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from bench.alert_timing import AlertWatch
from components.policies.alerting import LOCAL_JOB
from components.policies.scaling import AutoscalingConfig
from local.prometheus import JOB
from tests.local.conftest import make_cluster  # noqa: F401  (fixture; skips without nginx)
from tests.local.support import FAST_SIM
from tests.observability.test_top import _burst


def test_local_rules_select_the_job_local_prometheus_scrapes() -> None:
    assert LOCAL_JOB == JOB


class _Stub:
    replica_urls = ["http://127.0.0.1:1"]


def test_timing_counts_from_the_fault_start_and_end(tmp_path: Path) -> None:
    watch = AlertWatch(_Stub(), tmp_path)  # not started: only the arithmetic
    watch.transitions = [(5.0, True), (9.0, False), (20.0, True), (22.0, False)]
    timing = watch.timing(started=3.5, ended=8.0)
    assert (timing.fired_after, timing.resolved_after) == (1.5, 1.0)
    # A fire before the fault started is not this fault's.
    assert watch.timing(started=6.0, ended=21.0).fired_after == 14.0
    assert watch.timing(started=30.0, ended=31.0).fired_after is None
    assert "fired 1.5 s" in timing.notes()[0] and "for 2 s" in timing.notes()[0]
    assert "resolved 1.0 s after its end" in timing.notes()[0]
    # The rule file Prometheus loads is the stack's, on the drill's clock.
    text = (tmp_path / "alert-rules.yml").read_text()
    target = AutoscalingConfig().target_waiting_per_replica  # the drill runs the defaults
    assert f'llm_serving:waiting_per_replica:avg{{job="llm-serving-local"}} > {target}' in text
    assert "for: 2s" in text


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed")
def test_backlog_alert_fires_and_resolves_in_a_real_prometheus(make_cluster, tmp_path: Path) -> None:
    env = {**FAST_SIM, "LLM_MAX_CONCURRENCY": "1", "LLM_MAX_QUEUE": "8",
           "LLM_SIM_DECODE_BASE_MS": "40"}
    cluster = make_cluster(1, workdir=tmp_path / "run", server_env=env)
    with AlertWatch(cluster, tmp_path / "run", for_seconds=1) as watch:
        started = time.monotonic()
        load = threading.Thread(target=_burst, args=(cluster.endpoint, cluster.api_key,
                                                     cluster.model_name, 9))
        load.start()
        load.join()
        ended = time.monotonic()
        watch.wait_resolved(15)
        timing = watch.timing(started, ended)
    assert timing.fired_after is not None, watch.transitions
    assert timing.resolved_after is not None, watch.transitions
    assert 1.0 <= timing.fired_after < ended - started


def test_local_rules_compress_the_clock_but_keep_the_thresholds() -> None:
    from components.config.parse import parse_stack_config
    from components.policies.alerting import local_rules

    cfg = parse_stack_config({"model": {"id": "m/x"}, "monitoring": {"slo": {"ttftP99Seconds": 3}}})
    fast = yaml.safe_load(local_rules(cfg, time_factor=60, scrape_seconds=0.25))
    alerts = {r["alert"]: r for r in fast["groups"][1]["rules"]}
    assert alerts["LlmTtftP99AboveSlo"]["for"] == "5s"  # 5 min / 60
    assert alerts["LlmTtftP99AboveSlo"]["expr"].endswith("> 3.0")
    recording = {r["record"]: r["expr"] for r in fast["groups"][0]["rules"]}
    assert "[5s]" in recording["llm_serving:ttft_seconds:p99"]
    slow = yaml.safe_load(local_rules(cfg))
    assert {r["alert"]: r["for"] for r in slow["groups"][1]["rules"]}["LlmQueueBacklog"] == "5m"
    with pytest.raises(ValueError, match="time_factor"):
        local_rules(cfg, time_factor=0)


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed")
def test_local_up_autoscale_prometheus_loads_the_stack_rules(make_cluster, tmp_path: Path) -> None:
    import httpx

    from local.autoscaler import stack_config, start_autoscaling
    from local.top import Top
    from tests.local.support import free_port_range

    cluster = make_cluster(1, workdir=tmp_path / "run")
    prometheus, scaler = start_autoscaling(cluster, stack_config(None),
                                           port=free_port_range(1), time_factor=60)
    try:
        groups = httpx.get(prometheus.url + "/api/v1/rules", timeout=5).json()["data"]["groups"]
        names = {r["name"] for g in groups for r in g["rules"]}
        assert {"LlmQueueBacklog", "LlmNoReadyReplica", "llm_serving:ttft_seconds:p99"} <= names
        assert all(r["health"] != "err" for g in groups for r in g["rules"])
        with httpx.Client(timeout=5) as client:
            assert Top(workdir=tmp_path / "run").alerts(client) is not None
    finally:
        scaler.stop()
        prometheus.close()


def test_local_rules_of_a_vllm_stack_read_the_server_engine_local_mode_runs() -> None:
    from components.config.parse import parse_stack_config
    from components.engines import PROFILES
    from components.policies.alerting import local_rules

    cfg = parse_stack_config({"engine": "vllm", "gpu": {"count": 1}, "model": {"id": "m/x"},
                              "replicas": 2})
    text = local_rules(cfg, profile=PROFILES["server"])
    assert "llm_requests_waiting" in text and "vllm:" not in text
    assert "vllm:num_requests_waiting" in local_rules(cfg)  # without it: the stack's engine
