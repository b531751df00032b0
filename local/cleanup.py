"""What a command started, and one way out that leaves none of it behind.

Every process local mode and the benchmarks start goes through `local.procs.spawn` (its own
session, so a terminal's Ctrl-C reaches only the command), and every temporary folder through
`temp_dir`. Both are recorded here. A command that starts processes runs inside `supervised()`:

* the first SIGINT, SIGTERM or SIGHUP raises KeyboardInterrupt in the main thread, so the
  command's own `finally` blocks stop things in order (nginx first, replicas drain);
* any further signal kills every recorded process group at once (SIGKILL) and lets the
  cleanup that is under way finish - it no longer raises, so no `finally` is cut short;
* a third one also removes the folders and ends the process by that signal;
* on the way out, whatever path it took, every recorded group still alive is killed and every
  recorded folder removed; after a stop by signal, later signals are ignored (the command is
  ending with nothing left running).

A signal ignored when the command starts (SIGHUP under `nohup`, SIGINT in a background job)
stays ignored. Nothing is ever signalled by name: only the groups recorded here, which this
process started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""What stops a command: Ctrl-C, `kill`/`timeout`/a CI job's limit, a closed terminal."""
ECHO_SECONDS = 0.05
"""A repeat of the same signal this soon is one stop delivered twice, not a second press:
SIGTERM to `make local`'s process group reaches the command, and make forwards its own."""


class _Registry:
    def __init__(self) -> None:
        self.owner = os.getpid()
        self.lock = threading.Lock()
        self.groups: dict[int, subprocess.Popen[bytes]] = {}
        """Process-group leaders this process started (each in its own session)."""
        self.folders: dict[Path, None] = {}
        self.depth = 0
        self.stopping = False
        self.received: list[int] = []
        """Signals received inside `supervised()`, in order."""
        self.kills = 0
        """Signals that arrived while stopping: the first kills everything, the next ends us."""
        self.critical = 0
        """> 0 while the main thread starts or records something: an interrupt waits."""
        self.pending = False
        self.last_at = 0.0


_REG = _Registry()


# --- recording ----------------------------------------------------------------------------------


def stopping() -> bool:
    """True once a stop signal came (or the supervised block is ending): start nothing new.
    The autoscaler's thread may try to add a replica while the main thread stops."""
    return _REG.stopping


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """Around starting a process or making a folder and recording it: an interrupt arriving
    in between waits until the thing is recorded (else it could start and be lost)."""
    main = threading.current_thread() is threading.main_thread()
    if main:
        _REG.critical += 1
    try:
        yield
    finally:
        if main:
            _REG.critical -= 1
            if not _REG.critical and _REG.pending:
                _REG.pending = False
                raise KeyboardInterrupt


def track(proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    """Record `proc`, the leader of a new session (``start_new_session=True``)."""
    with _REG.lock:
        _prune()
        _REG.groups[proc.pid] = proc
    if _REG.kills:  # started after a second signal: no ordered stop is coming
        _kill_group(proc)
    return proc


def temp_dir(prefix: str) -> Path:
    """A new private folder in the system temp dir, removed at the latest on the way out."""
    with recording():
        path = Path(tempfile.mkdtemp(prefix=prefix)).resolve()
        with _REG.lock:
            _REG.folders[path] = None
    return path


def remove_temp_dir(path: Path | None) -> None:
    """Remove a folder from `temp_dir` now (idempotent)."""
    if path is None:
        return
    shutil.rmtree(path, ignore_errors=True)
    with _REG.lock:
        _REG.folders.pop(Path(path), None)


def _prune() -> None:
    """Forget leaders that were reaped and whose group is empty (caller holds the lock)."""
    for pid, proc in list(_REG.groups.items()):
        if proc.returncode is not None and not _group_exists(pid):
            del _REG.groups[pid]


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # A leader we have not reaped still holds its PID, so the group ID cannot have been reused;
    # once reaped, the group may live on in its members (nginx workers), which are ours too.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_all() -> None:
    """SIGKILL every recorded group (safe inside a signal handler: no lock, no I/O)."""
    for proc in list(_REG.groups.values()):
        _kill_group(proc)


def sweep(timeout: float = 10.0) -> None:
    """Kill whatever recorded group is left, reap the leaders, remove the recorded folders."""
    if os.getpid() != _REG.owner:  # a forked child must not clean up its parent's things
        return
    kill_all()
    deadline = time.monotonic() + timeout
    for proc in list(_REG.groups.values()):
        with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    with _REG.lock:
        _prune()
        folders = list(_REG.folders)
    for folder in folders:
        remove_temp_dir(folder)


# --- signals ------------------------------------------------------------------------------------


def _note(message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(sys.stderr.fileno(), message.encode())


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    now = time.monotonic()
    if _REG.received and signum == _REG.received[-1] and now - _REG.last_at < ECHO_SECONDS:
        return  # the same stop delivered twice (a group signal `make` also forwards)
    _REG.received.append(signum)
    _REG.last_at = now
    if not _REG.stopping:
        _REG.stopping = True
        if _REG.critical:
            _REG.pending = True  # raised once the process being started is recorded
            return
        raise KeyboardInterrupt  # the command's finally blocks stop things in order
    kill_all()
    _REG.kills += 1
    if _REG.kills == 1:
        again = " again" if len(_REG.received) > 1 else ""
        _note(f"\n{signal.Signals(signum).name}{again}: killed every process this run started\n")
        return  # the stop under way finishes quickly now; raising would cut it short
    for folder in list(_REG.folders):
        shutil.rmtree(folder, ignore_errors=True)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


class _InterruptEcho(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for our own interrupt: raised
    inside a task's step, the KeyboardInterrupt stops the command (asyncio re-raises it) and
    also stays on the task, which asyncio reports when the task is collected, often after the
    command has said it stopped."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, KeyboardInterrupt) and _REG.received)


@contextlib.contextmanager
def supervised() -> Iterator[None]:
    """Run a command that starts processes; see the module docstring. For a command's entry
    point: on the way out it stops everything this process started. Re-entrant: only the
    outermost block installs the handlers and sweeps."""
    if _REG.depth or threading.current_thread() is not threading.main_thread():
        _REG.depth += 1
        try:
            yield
        finally:
            _REG.depth -= 1
        return
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _InterruptEcho) for f in asyncio_log.filters):
        asyncio_log.addFilter(_InterruptEcho())
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    _REG.depth, _REG.stopping, _REG.received, _REG.pending, _REG.kills = 1, False, [], False, 0
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        _REG.stopping = True  # a signal from here on kills rather than interrupts the cleanup
        try:
            sweep()
        finally:
            for sig, handler in previous.items():
                if _REG.received:
                    # Stopped by a signal, so the command is ending and has nothing left
                    # running: a late press (a second Ctrl-C after the stop finished) must not
                    # end it with a traceback, nor kill it (Python resets its own handlers to
                    # the default while it shuts down): ignored by the kernel.
                    handler = signal.SIG_IGN
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            # `received` stays readable (interrupted_by); the rest starts afresh.
            _REG.depth, _REG.stopping, _REG.kills, _REG.pending = 0, False, 0, False


def received() -> list[signal.Signals]:
    """The stop signals received in the current (or last) `supervised()` block, in order."""
    return [signal.Signals(sig) for sig in _REG.received]


def interrupted_by() -> signal.Signals | None:
    """The first of `received()`, if any."""
    return signal.Signals(_REG.received[0]) if _REG.received else None

