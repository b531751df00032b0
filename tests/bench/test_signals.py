"""Every benchmark that starts processes, stopped by a real signal mid-run: no process of the
run, no listening port and no temporary folder is left, the exit code says which signal
stopped it, and no traceback is printed. Each run is bounded (tens of seconds)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time

import pytest

from local.procs import LocalModeError, find_nginx
from tests.leaks import Watched

PY = [sys.executable, "-m"]

try:
    find_nginx()
except LocalModeError:
    if not os.environ.get("CI"):
        pytest.skip("nginx is not installed (apt-get install nginx-light)", allow_module_level=True)


def _check(run: Watched, code: int, sig: signal.Signals) -> None:
    text = run.text()
    assert code == 128 + sig, text
    assert f"interrupted by {sig.name}; stopped everything it started" in text
    assert "Traceback" not in text
    assert run.leftovers() == {}


def test_timeout_sigterm_20s_stops_the_quick_balancing_benchmark(tmp_path) -> None:
    """`timeout -s TERM 20 python -m bench --quick`: SIGTERM reaches the benchmark (and its
    process group) while the replicas, nginx and the clients run."""
    run = Watched(["timeout", "-s", "TERM", "20", *PY, "bench", "--quick", "--out",
                   str(tmp_path / "out")], tmp_path)
    try:
        run.until("capacity", 20)  # the cluster is up and measured before the signal
        assert run.wait(60) == 124  # timeout's own code: the command ran out of time
        text = run.text()
        assert "python -m bench: interrupted by SIGTERM; stopped everything it started" in text
        assert "Traceback" not in text
        assert len(run.ports) >= 5  # 4 replicas and nginx were listening
        assert run.leftovers() == {}
        assert not (tmp_path / "out").exists()  # nothing half-written
    finally:
        run.kill_leftovers()


def test_two_sigints_stop_the_quick_autoscaling_benchmark(tmp_path) -> None:
    if shutil.which("prometheus") is None and not os.environ.get("CI"):
        pytest.skip("prometheus is not installed")
    run = Watched([*PY, "bench", "autoscale", "--quick", "--runs", "2", "--out",
                   str(tmp_path / "out")], tmp_path)
    try:
        run.until("run 1/1", 60)  # an autoscaled run: Prometheus and the autoscaler run
        time.sleep(1)
        run.signal(signal.SIGINT)
        time.sleep(0.2)
        run.signal(signal.SIGINT)
        _check(run, run.wait(30), signal.SIGINT)
    finally:
        run.kill_leftovers()


def test_sighup_stops_the_fault_drills(tmp_path) -> None:
    run = Watched([*PY, "bench", "faults", "--quick"], tmp_path)
    try:
        run.until("steady load", 60)
        time.sleep(1)
        run.signal(signal.SIGHUP)
        _check(run, run.wait(60), signal.SIGHUP)
    finally:
        run.kill_leftovers()


def test_sigterm_stops_the_server_benchmark_and_its_client_processes(tmp_path) -> None:
    run = Watched([*PY, "server.bench", "--streams", "16", "--duration", "30"], tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not run.ports:  # the server listens
            assert time.monotonic() < deadline and run.proc.poll() is None, run.text()
            time.sleep(0.1)
        time.sleep(3)  # the client processes stream
        run.signal(signal.SIGTERM)
        _check(run, run.wait(30), signal.SIGTERM)
        assert len(run.processes) >= 3  # the server and two client processes were seen
    finally:
        run.kill_leftovers()


def test_a_failed_start_is_a_clear_error_and_leaves_no_temporary_folder(tmp_path) -> None:
    """Replicas that cannot start (invalid settings inherited from the environment): the
    cluster's temporary folder (llm-local-*) and anything else started go with the error."""
    run = Watched([*PY, "bench", "--quick", "--out", str(tmp_path / "out")], tmp_path,
                  env={"LLM_SIM_LOAD_SECONDS": "-1"})
    try:
        code = run.wait(60)
        text = run.text()
        assert code == 2, text
        assert re.search(r"error: replica \d on :\d+ exited with code 2 before it was ready",
                         text), text  # whichever replica fails first
        assert "Traceback" not in text
        assert run.processes  # the replicas did start
        assert run.leftovers() == {}
    finally:
        run.kill_leftovers()
