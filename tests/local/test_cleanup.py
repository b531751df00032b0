"""local/cleanup.py with real signals: a command that starts processes and makes temporary
folders leaves none of them behind, whichever signals stop it and however many."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from local import cleanup, procs
from local.procs import LocalModeError
from tests.leaks import Watched

COMMAND = textwrap.dedent("""
    import subprocess, sys, time
    from local import cleanup, procs
    from local.procs import LocalModeError

    def main():
        child = procs.spawn(["sleep", "600"], log=subprocess.DEVNULL)
        cleanup.temp_dir("llm-local-")
        print("ready", flush=True)
        try:
            if sys.argv[1] == "fail":
                time.sleep(1)  # long enough for the test to see the sleep run
                raise LocalModeError("the replica failed")
            time.sleep(600)
        finally:
            print("stopping", flush=True)
            if sys.argv[1] == "drain":
                child.wait()  # a drain that never ends on its own
            elif sys.argv[1] == "hang":
                time.sleep(600)  # cleanup code that hangs
        return 0

    code = procs.run_command(main, what="demo")
    if sys.argv[1] == "linger":  # a slow exit after the stop, like interpreter teardown
        print("stopped", flush=True)
        time.sleep(1)
    sys.exit(code)
""")


def _start(tmp_path: Path, mode: str, *prefix: str) -> Watched:
    return Watched([*prefix, sys.executable, "-c", COMMAND, mode], tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=lambda s: s.name)
def test_one_signal_runs_the_cleanup_and_leaves_nothing(tmp_path: Path, sig) -> None:
    run = _start(tmp_path, "plain")
    try:
        run.until("ready", 20)
        run.signal(sig)
        assert run.wait(20) == 128 + sig
        assert f"demo: interrupted by {sig.name}; stopped everything it started" in run.text()
        assert "Traceback" not in run.text()
        assert len(run.processes) == 1  # the sleep was seen, so "none left" means something
        assert run.leftovers() == {}
    finally:
        run.kill_leftovers()


def test_a_second_signal_kills_what_a_cleanup_waits_for_without_a_traceback(tmp_path) -> None:
    run = _start(tmp_path, "drain")
    try:
        run.until("ready", 20)
        run.signal(signal.SIGINT)
        run.until("stopping", 10)
        time.sleep(0.2)  # a second press, not an echo of the first (cleanup.ECHO_SECONDS)
        run.signal(signal.SIGINT)
        assert run.wait(20) == 130
        assert "SIGINT again: killed every process this run started" in run.text()
        assert "Traceback" not in run.text()
        assert run.leftovers() == {}
    finally:
        run.kill_leftovers()


def test_a_second_ctrl_c_after_the_stop_finished_is_ignored(tmp_path) -> None:
    run = _start(tmp_path, "linger")
    try:
        run.until("ready", 20)
        run.signal(signal.SIGINT)
        run.until("stopped", 10)
        run.signal(signal.SIGINT)
        assert run.wait(20) == 130
        assert "Traceback" not in run.text() and "KeyboardInterrupt" not in run.text()
        assert run.leftovers() == {}
    finally:
        run.kill_leftovers()


def test_a_third_signal_ends_a_hung_cleanup_and_still_leaves_nothing(tmp_path) -> None:
    run = _start(tmp_path, "hang")
    try:
        run.until("ready", 20)
        run.signal(signal.SIGTERM)
        run.until("stopping", 10)
        for _ in range(2):
            time.sleep(0.2)  # presses, not echoes of the one before (cleanup.ECHO_SECONDS)
            run.signal(signal.SIGTERM)
        assert run.wait(20) == -signal.SIGTERM
        assert run.leftovers() == {}
    finally:
        run.kill_leftovers()


def test_an_error_leaves_nothing_and_says_what_failed(tmp_path) -> None:
    run = _start(tmp_path, "fail")
    try:
        assert run.wait(20) == 2
        assert "error: the replica failed" in run.text() and "Traceback" not in run.text()
        assert len(run.processes) == 1
        assert run.leftovers() == {}
    finally:
        run.kill_leftovers()


def test_a_signal_ignored_at_start_stays_ignored(tmp_path) -> None:
    """`nohup` ignores SIGHUP: a command started under it survives its terminal closing."""
    run = _start(tmp_path, "plain", "nohup")
    try:
        run.until("ready", 20)
        run.signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            run.proc.wait(timeout=1.5)
        run.signal(signal.SIGTERM)
        assert run.wait(20) == 128 + signal.SIGTERM
        assert run.leftovers() == {}
    finally:
        run.kill_leftovers()


def test_nothing_new_starts_once_stopping_and_a_folder_is_forgotten_when_removed(
        tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(cleanup._REG, "stopping", True)
    with pytest.raises(LocalModeError, match="not starting sleep: stopping"):
        procs.spawn(["sleep", "600"], log=subprocess.DEVNULL)
    monkeypatch.setattr(cleanup._REG, "stopping", False)
    folder = cleanup.temp_dir("llm-local-")
    assert folder in cleanup._REG.folders and folder.is_dir()
    cleanup.remove_temp_dir(folder)
    assert folder not in cleanup._REG.folders and not folder.exists()


def test_the_same_signal_twice_at_once_is_one_stop(monkeypatch) -> None:
    """SIGTERM to `make local`'s process group reaches the command twice (make forwards its
    own): that is one stop, with the ordered drain, not a second press."""
    kills: list[str] = []
    monkeypatch.setattr(cleanup, "kill_all", lambda: kills.append("kill"))
    handlers = {sig: signal.getsignal(sig) for sig in cleanup.SIGNALS}
    with cleanup.supervised():
        with pytest.raises(KeyboardInterrupt):
            cleanup._on_signal(signal.SIGTERM, None)
        cleanup._on_signal(signal.SIGTERM, None)  # 1 ms later: the same stop
        assert kills == [] and cleanup.received() == [signal.SIGTERM]
        time.sleep(cleanup.ECHO_SECONDS + 0.02)
        cleanup._on_signal(signal.SIGTERM, None)  # a second press
        assert kills == ["kill"]
    # Over: what this process starts next is not killed, nor refused.
    assert not cleanup.stopping() and cleanup._REG.kills == 0
    assert cleanup.interrupted_by() == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # a late press does nothing
    for sig, handler in handlers.items():  # this test process goes on (and starts others)
        signal.signal(sig, handler)


ASYNC_COMMAND = textwrap.dedent("""
    import asyncio, os, signal, sys
    from local import procs

    async def step():
        os.kill(os.getpid(), signal.SIGTERM)  # arrives inside this task's step
        for _ in range(100):
            await asyncio.sleep(0.01)

    async def main_task():
        task = asyncio.create_task(step())  # like the benchmark client's streams
        await asyncio.sleep(2)
        return task

    sys.exit(procs.run_command(lambda: asyncio.run(main_task()), what="demo"))
""")


def test_an_interrupt_inside_an_asyncio_task_prints_no_traceback(tmp_path) -> None:
    """The benchmarks' clients run in asyncio: the interrupt lands in a task, which keeps it
    too, and asyncio would report it as never retrieved when the task is collected."""
    run = Watched([sys.executable, "-c", ASYNC_COMMAND], tmp_path)
    assert run.wait(20) == 128 + signal.SIGTERM
    assert "demo: interrupted by SIGTERM" in run.text()
    assert "Traceback" not in run.text() and "never retrieved" not in run.text()
