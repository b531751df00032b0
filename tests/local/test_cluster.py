"""LocalCluster with real replicas (sim engine) behind a real nginx."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from components.policies.balancing import LoadBalancingConfig
from local import LocalCluster, LocalModeError
from local.procs import find_nginx, port_in_use
from tests.local.support import FAST_SIM, assert_gone, chat, served

Make = Callable[..., LocalCluster]


def test_openai_client_streams_through_nginx(make_cluster: Make) -> None:
    cluster = make_cluster(2)
    assert cluster.endpoint == f"http://127.0.0.1:{cluster.port}/v1"
    assert cluster.replica_urls == [f"http://127.0.0.1:{cluster.first_replica_port + i}"
                                    for i in range(2)]
    assert len(cluster.api_key) >= 20 and cluster.model_name == "sim-llm"

    client = openai.OpenAI(base_url=cluster.endpoint, api_key=cluster.api_key, max_retries=0)
    stream = client.chat.completions.create(
        model=cluster.model_name, stream=True, max_tokens=8,
        messages=[{"role": "user", "content": "Hello"}])
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(text.split()) == 8 and chunks[-1].choices[0].finish_reason == "length"

    with pytest.raises(openai.AuthenticationError):  # the key is enforced behind nginx
        openai.OpenAI(base_url=cluster.endpoint, api_key="wrong", max_retries=0) \
            .models.list()


def test_stream_arrives_chunk_by_chunk(make_cluster: Make) -> None:
    # 20 tokens x 50 ms: the stream lasts about a second.
    cluster = make_cluster(1, server_env={**FAST_SIM, "LLM_SIM_DECODE_BASE_MS": "50"})
    arrivals: list[float] = []
    start = time.monotonic()
    with httpx.stream("POST", cluster.endpoint + "/chat/completions", timeout=10,
                      headers={"Authorization": f"Bearer {cluster.api_key}"},
                      json={"model": "sim-llm", "stream": True, "max_tokens": 20,
                            "messages": [{"role": "user", "content": "hi"}]}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content":" ' in line:
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 20
    assert arrivals[-1] >= 0.9
    assert arrivals[0] < 0.3, f"first token after {arrivals[0]:.2f} s: nginx buffered"
    assert arrivals[9] < arrivals[-1] - 0.3  # the middle, too, arrives before the end


def test_round_robin_spreads_requests_evenly(make_cluster: Make) -> None:
    cluster = make_cluster(3, policy=LoadBalancingConfig(method="round_robin"))
    for _ in range(30):
        assert chat(cluster.endpoint, cluster.api_key).status_code == 200
    assert [served(url) for url in cluster.replica_urls] == [10, 10, 10]


def test_session_hash_pins_a_session_to_one_replica(make_cluster: Make) -> None:
    cluster = make_cluster(3, policy=LoadBalancingConfig(method="session_hash"))
    for _ in range(12):
        response = chat(cluster.endpoint, cluster.api_key, headers={"X-Session-ID": "abc"})
        assert response.status_code == 200
    counts = [served(url) for url in cluster.replica_urls]
    assert sorted(counts) == [0, 0, 12]

    for session in range(30):  # different sessions do spread
        chat(cluster.endpoint, cluster.api_key, headers={"X-Session-ID": f"s{session}"})
    grown = [served(url) - before for url, before in zip(cluster.replica_urls, counts)]
    assert sum(grown) == 30 and sum(1 for g in grown if g > 0) >= 2


def test_killed_replica_is_skipped_and_restart_brings_it_back(make_cluster: Make) -> None:
    # fail_timeout 1 s: nginx retries a marked-down replica after a second.
    policy = LoadBalancingConfig(method="round_robin", fail_timeout_seconds=1)
    cluster = make_cluster(3, policy=policy)
    killed_pid = cluster.replica_pids[0]
    cluster.kill_replica(0)
    assert cluster.replica_pids[0] is None
    assert_gone([killed_pid])
    for _ in range(9):  # refused connections move to another replica
        assert chat(cluster.endpoint, cluster.api_key).status_code == 200
    assert served(cluster.replica_urls[1]) + served(cluster.replica_urls[2]) == 9

    cluster.restart_replica(0, timeout=20)
    assert cluster.replica_pids[0] not in (None, killed_pid)
    time.sleep(1.2)  # past fail_timeout
    for _ in range(12):
        assert chat(cluster.endpoint, cluster.api_key).status_code == 200
    # nginx's round robin lowers a failed peer's effective weight and raises it
    # back one pick at a time, so the returning replica's share starts small.
    assert served(cluster.replica_urls[0]) >= 1


def test_restart_replica_drains_and_replaces_a_running_one(make_cluster: Make) -> None:
    cluster = make_cluster(2, policy=LoadBalancingConfig(method="round_robin",
                                                         fail_timeout_seconds=1))
    old = cluster.replica_pids[1]
    cluster.restart_replica(1, timeout=20)
    assert_gone([old] if old else [])
    assert cluster.replica_pids[1] not in (None, old)
    time.sleep(1.2)
    for _ in range(6):
        assert chat(cluster.endpoint, cluster.api_key).status_code == 200
    assert served(cluster.replica_urls[1]) >= 2


def test_reload_nginx_grows_and_shrinks_the_upstreams(make_cluster: Make) -> None:
    cluster = make_cluster(2, policy=LoadBalancingConfig(method="round_robin"))
    cluster.reload_nginx(replicas=3)
    assert len(cluster.replica_urls) == 3
    for _ in range(9):
        assert chat(cluster.endpoint, cluster.api_key).status_code == 200
    assert served(cluster.replica_urls[2]) == 3

    dropped = cluster.replica_pids[1:]
    cluster.reload_nginx(replicas=1, policy=LoadBalancingConfig(method="least_conn"))
    assert cluster.replicas == 1
    assert_gone([pid for pid in dropped if pid is not None])
    for _ in range(4):
        assert chat(cluster.endpoint, cluster.api_key).status_code == 200
    conf = (cluster.workdir / "nginx" / "nginx.conf").read_text()
    assert "least_conn;" in conf and conf.count("server 127.0.0.1:") == 1


def test_stop_is_idempotent_and_frees_everything(tmp_path: Path) -> None:
    from tests.local.support import free_port_range
    base = free_port_range(3)
    cluster = LocalCluster(2, port=base, first_replica_port=base + 1, server_env=FAST_SIM)
    with cluster:
        pids = [cluster.nginx_pid, *cluster.replica_pids]
        workdir = cluster.workdir
        assert workdir is not None and (workdir / "state.json").exists()
    assert_gone([pid for pid in pids if pid is not None])
    assert not workdir.exists()  # the temporary workdir was ours
    assert not any(port_in_use(base + i) for i in range(3))
    cluster.stop()  # again: nothing to do


def test_missing_nginx_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(LocalModeError, match="nginx not found; install it: sudo apt-get "
                                             "install nginx-light"):
        find_nginx(candidates=())


def test_replica_not_ready_in_time_fails_and_stops_everything(tmp_path: Path) -> None:
    from tests.local.support import free_port_range
    base = free_port_range(3)
    cluster = LocalCluster(2, port=base, first_replica_port=base + 1, workdir=tmp_path / "run",
                           server_env=FAST_SIM)
    # No Python server imports its framework in 0.2 s: the deadline always passes first.
    with pytest.raises(LocalModeError, match=r"replica \d on :\d+ was not ready after 0.2 s; "
                                             r"last lines of .*replica-\d\.log"):
        cluster.start(timeout=0.2)
    assert not cluster.running and cluster.replica_pids == [None, None]
    assert not (tmp_path / "run" / "state.json").exists()
    assert not any(port_in_use(base + i) for i in range(3))


def test_back_to_back_restarts_of_two_replicas_drop_nothing(make_cluster: Make) -> None:
    # A draining replica's 503s mark its port failed in nginx for fail_timeout (10 s);
    # without the reload in restart_replica, restarting the other replica within that
    # window left no live upstream and nginx answered 502.
    import threading

    cluster = make_cluster(2)
    statuses: list[int] = []
    done = threading.Event()

    def trickle() -> None:
        while not done.is_set() and len(statuses) < 300:
            statuses.append(chat(cluster.endpoint, cluster.api_key).status_code)
            time.sleep(0.01)

    worker = threading.Thread(target=trickle)
    worker.start()
    try:
        time.sleep(0.3)
        cluster.restart_replica(0, timeout=20)
        time.sleep(0.5)
        cluster.restart_replica(1, timeout=20)
        time.sleep(0.3)
    finally:
        done.set()
        worker.join(timeout=30)
    assert len(statuses) >= 20
    assert [s for s in statuses if s != 200] == []
