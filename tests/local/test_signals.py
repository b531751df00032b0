"""`python -m local up` stopped by real signals (one Ctrl-C, two close together, SIGHUP) and a
start that fails half-way: no process of the run, no listening port and no temporary folder
is left behind, and no traceback is printed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

from tests.leaks import Watched
from tests.local.support import FAST_SIM, free_port_range

CLI = [sys.executable, "-m", "local", "up"]


def _up(tmp_path: Path, base: int, *extra: str, env: dict[str, str] | None = None) -> Watched:
    return Watched([*CLI, "--replicas", "1", "--port", str(base), "--first-port",
                    str(base + 1), "--workdir", str(tmp_path / "run"), *extra], tmp_path,
                   env={**FAST_SIM, **(env or {})})


def _require_prometheus() -> None:
    if shutil.which("prometheus") is None and not os.environ.get("CI"):
        pytest.skip("prometheus is not installed (apt-get install prometheus)")


def test_two_ctrl_c_close_together_stop_autoscaled_local_mode_completely(tmp_path) -> None:
    """The reported defect: the second Ctrl-C landed in the autoscaler's thread join (or in
    Prometheus's stop) and skipped the cluster's stop, leaving a replica, nginx and
    Prometheus running."""
    _require_prometheus()
    base = free_port_range(8)
    run = _up(tmp_path, base, "--autoscale", "--prometheus-port", str(base + 7),
              "--time-factor", "30")
    try:
        run.until("autoscaling: 1-4 replicas", 60)
        run.snapshot()
        assert {base, base + 1, base + 7} <= run.ports  # nginx, the replica, Prometheus
        run.signal(signal.SIGINT)
        time.sleep(0.2)
        run.signal(signal.SIGINT)
        assert run.wait(30) == 0
        text = run.text()
        assert "Traceback" not in text and "KeyboardInterrupt" not in text
        assert "SIGINT again: killed every process this run started" in text
        assert run.leftovers() == {}
    finally:
        run.kill_leftovers()


def test_sighup_stops_local_mode_like_ctrl_c(tmp_path) -> None:
    base = free_port_range(3)
    run = _up(tmp_path, base)
    try:
        run.until("stops everything", 60)
        run.signal(signal.SIGHUP)
        assert run.wait(30) == 0
        assert "stopped" in run.text() and "Traceback" not in run.text()
        assert len(run.processes) >= 3  # the replica, nginx's master and its worker
        assert run.leftovers() == {}
        assert not (tmp_path / "run" / "state.json").exists()
    finally:
        run.kill_leftovers()


def test_a_closed_terminal_still_gets_the_ordered_stop(tmp_path) -> None:
    """SIGHUP because the terminal went away: printing "stopping" fails (EPIPE here, EIO on a
    real terminal), which must not cut the drain short."""
    base = free_port_range(3)
    run = Watched([*CLI, "--replicas", "1", "--port", str(base), "--first-port", str(base + 1),
                   "--workdir", str(tmp_path / "run")], tmp_path, env=FAST_SIM,
                  read_output=False)
    try:
        assert run.proc.stdout is not None
        deadline = time.monotonic() + 60
        while "stops everything" not in run.proc.stdout.readline():
            assert time.monotonic() < deadline and run.proc.poll() is None
        run.proc.stdout.close()  # the terminal is gone: the next write fails
        run.signal(signal.SIGHUP)
        assert run.wait(30) == 0
        assert run.leftovers() == {}
        assert not (tmp_path / "run" / "state.json").exists()  # the cluster's own stop ran
    finally:
        run.kill_leftovers()


def test_a_start_that_fails_after_the_cluster_is_up_leaves_nothing(tmp_path) -> None:
    """Prometheus's port is taken: the replica and nginx already run (as root, nginx's
    temporary folder exists) when the start fails."""
    _require_prometheus()
    base = free_port_range(4)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", base + 3))
        holder.listen()
        run = _up(tmp_path, base, "--autoscale", "--prometheus-port", str(base + 3))
        try:
            assert run.wait(60) == 2
            assert f"error: port {base + 3} (wanted by prometheus) is in use" in run.text()
            assert "Traceback" not in run.text()
            assert run.processes  # the replica (and nginx) ran before the failure
            assert run.leftovers() == {}
        finally:
            run.kill_leftovers()


def test_a_second_interrupt_in_the_autoscaler_stop_does_not_skip_the_cluster_stop(
        monkeypatch) -> None:
    """In-process: whichever stop step an interrupt cuts short, the later ones still run,
    the cluster's last."""
    import local.__main__ as cli

    calls: list[str] = []

    class Cluster:
        engine, running = "sim", True
        models = (mock.Mock(replicas=1, engine="sim", served_name="sim-llm"),)
        first_replica_port = 8000

        def stop(self) -> None:
            calls.append("cluster")
            self.running = False

    class Scaler:
        policy = mock.Mock(min_replicas=1, max_replicas=4, triggers=())

        def stop(self) -> None:
            calls.append("scaler")
            raise KeyboardInterrupt  # a second Ctrl-C during the thread's join

    prometheus = mock.Mock(url="http://127.0.0.1:1")
    prometheus.close.side_effect = lambda: calls.append("prometheus")
    monkeypatch.setattr(cli, "_cluster", lambda *_a, **_k: Cluster())
    monkeypatch.setattr(cli, "start_autoscaling", lambda *_a, **_k: (prometheus, Scaler()))
    monkeypatch.setattr(cli, "banner", lambda _c: "")
    monkeypatch.setattr(cli, "_supervise", mock.Mock(side_effect=KeyboardInterrupt))
    Cluster.start = lambda self, timeout: None
    Cluster.workdir = Path("/nonexistent")
    args = cli._parser().parse_args(["up", "--autoscale"])
    try:
        code: object = cli._up(args)
    except KeyboardInterrupt:  # the old code let it out of the finally, skipping the rest
        code = "interrupted"
    assert calls == ["scaler", "prometheus", "cluster"]
    assert code == 0
