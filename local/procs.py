"""Process, port and state-file helpers for local mode (and the benchmarks).

Every process local mode starts runs in its own session (process group) so that a Ctrl-C in the
terminal reaches only the supervisor, which then stops things in the right order (nginx first,
then the replicas drain). Signals always go to a PID (or the group) that local mode started and
whose command line still matches - never to a process found by name. `spawn` records every
group in `local.cleanup`, so a command run with `run_command` leaves none behind, whichever
signals stop it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from local import cleanup

NGINX_CANDIDATES: tuple[str, ...] = (
    "/usr/sbin/nginx",  # Debian/Ubuntu: not on a non-root user's PATH
    "/usr/local/sbin/nginx",
    "/usr/local/bin/nginx",
    "/opt/homebrew/bin/nginx",  # Homebrew on Apple silicon
)
"""Where nginx lives when it is not on PATH."""

NGINX_INSTALL_HINT = (
    "install it: sudo apt-get install nginx-light (Debian/Ubuntu) or brew install nginx (macOS)"
)

STATE_FILE = "state.json"


class LocalModeError(Exception):
    """A failure meant for the user: the CLI prints the message alone and exits with 2."""


# --- nginx and ports ---------------------------------------------------------------------------


def find_nginx(explicit: str | None = None, candidates: Sequence[str] = NGINX_CANDIDATES) -> str:
    """The nginx binary: `explicit` if given, else PATH, else the usual install locations."""
    if explicit is not None:
        path = shutil.which(explicit)
        if path is None:
            raise LocalModeError(f"nginx not found at {explicit}; {NGINX_INSTALL_HINT}")
        return path
    found = shutil.which("nginx")
    if found is not None:
        return found
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    raise LocalModeError(f"nginx not found; {NGINX_INSTALL_HINT}")


_PROC_NET = ("/proc/net/tcp", "/proc/net/tcp6")
_TCP_LISTEN = "0A"
"""Socket state of a listener in /proc/net/tcp."""


def _socket_inodes(port: int) -> list[str]:
    """Inodes of the TCP sockets listening on `port` on this host (Linux /proc/net); empty
    where /proc/net does not exist."""
    found: list[str] = []
    for table in _PROC_NET:
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or int(fields[1].rsplit(":", 1)[1], 16) != port:
                continue
            if fields[3] == _TCP_LISTEN and fields[9] != "0":
                found.append(fields[9])
    return found


def _process_name(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        command = " ".join(" ".join(a.decode(errors="replace").split()) for a in argv if a)
    except OSError:
        command = ""
    return (command[:80] + "...") if len(command) > 80 else command or "?"


def port_holder(port: int) -> str | None:
    """Who holds `port`, as `pid 123 (python3 -m http.server)`: read from /proc (Linux), else
    from `lsof` when it is installed. A socket whose process this user may not inspect reads
    as "a process of another user"; None when nothing can be told."""
    inodes = _socket_inodes(port)
    if inodes:
        wanted = {f"socket:[{inode}]" for inode in inodes}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fds = list((entry / "fd").iterdir())
            except OSError:  # another user's process, or gone
                continue
            for fd in fds:
                try:
                    if os.readlink(fd) in wanted:
                        return f"pid {entry.name} ({_process_name(int(entry.name))})"
                except OSError:
                    continue
        return "a process of another user"
    lsof = shutil.which("lsof")
    if lsof is None:
        return None
    try:
        out = subprocess.run([lsof, "-nP", f"-iTCP:{port}", "-sTCP:LISTEN", "-Fpc"],
                             capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    fields = {line[0]: line[1:] for line in out.splitlines() if line[:1] in ("p", "c")}
    return f"pid {fields['p']} ({fields.get('c', '?')})" if "p" in fields else None


def port_busy(port: int, wanted_by: str) -> str:
    """`port 8080 (wanted by nginx) is in use by pid 123 (...)`: the start of the message when a
    port local mode needs is taken, naming which of our processes wanted it and who holds it."""
    holder = port_holder(port)
    return f"port {port} (wanted by {wanted_by}) is in use" + (f" by {holder}" if holder else "")


def port_in_use(port: int) -> bool:
    """True when nothing could listen on 127.0.0.1:`port` right now.

    SO_REUSEADDR mirrors what uvicorn and nginx set, so a port held only by TIME_WAIT
    connections of a previous run counts as free, as it is for them.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


# --- processes ---------------------------------------------------------------------------------


def spawn(args: Sequence[str], *, log: Path | int | None, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start `args` in a new session with stdout and stderr appended to `log` (a path;
    `subprocess.DEVNULL`; None: this process's own), recorded for `local.cleanup`.

    Raises LocalModeError once the command is stopping: nothing new starts then."""
    if cleanup.stopping():
        raise LocalModeError(f"not starting {os.path.basename(args[0])}: stopping")
    output = open(log, "ab") if isinstance(log, Path) else contextlib.nullcontext(log)
    with cleanup.recording(), output as out:  # the child keeps its own descriptor
        return cleanup.track(subprocess.Popen(
            list(args), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        ))


def run_command(main: Callable[[], int], *, what: str) -> int:
    """Run a command that starts processes under `local.cleanup.supervised()`.

    Its first SIGINT/SIGTERM/SIGHUP interrupts it and its own cleanup runs; whatever it
    started is gone when this returns. Returns `main()`'s code; 2 with the message for a
    LocalModeError; 128 + the signal's number after an interrupt, with a line saying so.
    """
    try:
        with cleanup.supervised():
            return main()
    except KeyboardInterrupt:
        sig = cleanup.interrupted_by() or signal.SIGINT
        _tell(f"{what}: interrupted by {sig.name}; stopped everything it started")
        return 128 + int(sig)
    except LocalModeError as exc:
        _tell(f"error: {exc}")
        return 2


def _tell(message: str) -> None:
    """To stderr, unless the terminal is gone (SIGHUP): then nowhere."""
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


def cmdline(pid: int) -> str | None:
    """The command line of `pid` as one string (NULs as spaces); None if it is gone.

    nginx rewrites its title ("nginx: master process /usr/sbin/nginx -p ..."), so callers
    match substrings, not argv lists.
    """
    proc = Path(f"/proc/{pid}/cmdline")
    if proc.parent.parent.exists():  # Linux
        try:
            raw = proc.read_bytes()
        except OSError:
            return None
        return raw.replace(b"\0", b" ").decode(errors="replace").strip() or None
    result = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True,
                            text=True, check=False)  # macOS and other systems without /proc
    return result.stdout.strip() or None


def owns(pid: int, markers: Sequence[str]) -> bool:
    """True when `pid` is alive and its command line contains every marker (not a reused PID)."""
    line = cmdline(pid)
    return line is not None and all(marker in line for marker in markers)


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    status = Path(f"/proc/{pid}/stat")
    try:
        # Field 3, after the parenthesised name, is the state; Z is a zombie.
        return status.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Send `sig` to the process group led by `pid` (a session we started); ignore if gone."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def wait_gone(pids: Sequence[int], timeout: float,
              procs: Sequence[subprocess.Popen[bytes]] = ()) -> list[int]:
    """Wait until every PID has exited (reaping our own children); return those still alive."""
    deadline = time.monotonic() + timeout
    by_pid = {proc.pid: proc for proc in procs}
    remaining = list(pids)
    while True:
        still = []
        for pid in remaining:
            proc = by_pid.get(pid)
            if proc is not None:
                if proc.poll() is None:
                    still.append(pid)
            elif alive(pid):
                still.append(pid)
        remaining = still
        if not remaining or time.monotonic() >= deadline:
            return remaining
        time.sleep(0.05)


def log_tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log, indented for an error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "    (no log)"
    tail = text.rstrip("\n").splitlines()[-lines:]
    return "\n".join("    " + line for line in tail) if tail else "    (log is empty)"


# --- state file --------------------------------------------------------------------------------


def write_state(workdir: Path, state: dict[str, Any]) -> None:
    """Atomically write `state.json` (0600: it holds the API key)."""
    tmp = workdir / (STATE_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(state, out, indent=2)
    os.replace(tmp, workdir / STATE_FILE)


def read_state(workdir: Path) -> dict[str, Any] | None:
    """The recorded cluster, or None when no state file exists (or it is unreadable)."""
    try:
        return json.loads((workdir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def remove_state(workdir: Path) -> None:
    (workdir / STATE_FILE).unlink(missing_ok=True)
