"""Watching a command's processes, ports and temporary folders, to prove it leaves none behind.

`Watched` starts a command in a private temporary directory (``TMPDIR``) and, until it exits,
records every process descended from it (by parent PID, with its start time so a reused PID is
not mistaken for it) and every port those processes listen on. Afterwards `leftovers()` says
what of that is still alive or listening, and which files remain in the temporary directory.
Processes are found through /proc (Linux).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from local.procs import port_in_use

ROOT = Path(__file__).resolve().parents[1]


def _default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent PID, start time in clock ticks) of a live, non-zombie `pid`; None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def _listening_inodes() -> dict[int, int]:
    """Socket inode -> port of every TCP socket in LISTEN state (IPv4 and IPv6)."""
    found: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A":  # TCP_LISTEN
                found[int(cols[9])] = int(cols[1].rsplit(":", 1)[1], 16)
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def descendants(root: int) -> dict[int, int]:
    """PID -> start time of every live process below `root`."""
    parent: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            parent[int(entry)] = st
    found: dict[int, int] = {}
    frontier = [root]
    while frontier:
        current = frontier.pop()
        for pid, (ppid, started) in parent.items():
            if ppid == current and pid not in found:
                found[pid] = started
                frontier.append(pid)
    return found


@dataclass
class Watched:
    """A command run in `tmp` (its TMPDIR) and everything it started while it ran."""

    args: Sequence[str]
    tmp: Path
    env: dict[str, str] = field(default_factory=dict)
    processes: dict[int, int] = field(default_factory=dict)
    """PID -> start time of every descendant seen."""
    ports: set[int] = field(default_factory=set)
    """Ports any of them listened on."""
    read_output: bool = True
    """False: the test reads `proc.stdout` itself (to close it, like a terminal going away)."""

    def __post_init__(self) -> None:
        self.tmpdir = self.tmp / "tmpdir"
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TMPDIR": str(self.tmpdir), "PYTHONUNBUFFERED": "1", **self.env}
        # A terminal's Ctrl-C and hang-up: the command gets the default SIGINT and SIGHUP
        # even when the suite runs with them ignored (in the background, under nohup), which
        # children would inherit.
        self.proc = subprocess.Popen(
            list(self.args), cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, preexec_fn=_default_signals)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        assert self.proc.stdout is not None
        out = self.proc.stdout
        if self.read_output:
            threading.Thread(target=lambda: [self.lines.put(line) for line in out],
                             daemon=True).start()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while self.proc.poll() is None:
            self.snapshot()
            time.sleep(0.05)

    def snapshot(self) -> None:
        now = descendants(self.proc.pid)
        self.processes.update(now)
        listening = _listening_inodes()
        for pid in now:
            self.ports.update(listening[i] for i in _socket_inodes(pid) if i in listening)

    def until(self, needle: str, timeout: float) -> str:
        """Wait for a line containing `needle`; return the output so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.output.append(line)
            if needle in line:
                return "".join(self.output)
        raise AssertionError(f"no {needle!r} within {timeout:g} s:\n{''.join(self.output)}")

    def signal(self, sig: signal.Signals) -> None:
        self.snapshot()  # what runs right now, ports included
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """The exit code; fails (after cleaning up) when it takes longer than `timeout`."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_leftovers()
            raise AssertionError(f"still running {timeout:g} s later:\n{self.text()}") from None
        self._watcher.join(timeout=5)
        return code

    def text(self) -> str:
        while not self.lines.empty():
            self.output.append(self.lines.get())
        return "".join(self.output)

    def alive(self) -> list[int]:
        """Descendants seen while it ran that still run (same PID and start time)."""
        return [pid for pid, started in self.processes.items()
                if (st := _stat(pid)) is not None and st[1] == started]

    def leftovers(self) -> dict[str, list]:
        """What the command left: live processes, listening ports, files in its TMPDIR."""
        deadline = time.monotonic() + 5  # the kernel reaps orphans and frees ports quickly
        while time.monotonic() < deadline:
            found = {"processes": self.alive(),
                     "ports": sorted(p for p in self.ports if port_in_use(p)),
                     "temp files": sorted(str(p.relative_to(self.tmpdir))
                                          for p in self.tmpdir.iterdir())}
            if not any(found.values()):
                break
            time.sleep(0.1)
        return {k: v for k, v in found.items() if v}

    def kill_leftovers(self) -> None:
        """SIGKILL the command and whatever it started that still runs (test cleanup)."""
        if self.proc.poll() is None:
            self.snapshot()
            self.proc.kill()
            self.proc.wait(timeout=10)
        for pid in self.alive():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
