"""The state file's processes: is a recorded cluster alive, and stopping it from outside
(`python -m local down`, when the supervisor is gone or is another process)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from local import procs

DEFAULT_DRAIN_SECONDS = 30.0
"""The server's own default for LLM_DRAIN_SECONDS (server/settings.py)."""
KILL_GRACE_SECONDS = 5.0
"""Added to the drain deadline before SIGKILL: process exit and nginx's own wind-down."""


def recorded_alive(state: Mapping[str, Any]) -> bool:
    """True when any process recorded in a state file still runs (with its command line)."""
    entries = [state.get("supervisor"), state.get("nginx"), state.get("prometheus"),
               *state.get("replicas", [])]
    return any(entry and entry.get("pid") and procs.owns(entry["pid"], entry["markers"])
               for entry in entries)


def stop_recorded(workdir: Path, on_progress: Callable[[str], None] = lambda _m: None) -> bool:
    """Stop the cluster recorded in `workdir/state.json` (`python -m local down`).

    The supervisor (`python -m local up`), if alive, gets SIGTERM and stops everything in
    order itself; whatever is left (a supervisor that was SIGKILLed) is stopped here the same
    way. Returns False when nothing was recorded.
    """
    state = procs.read_state(workdir)
    if state is None:
        return False
    deadline = float(state.get("stop_timeout", DEFAULT_DRAIN_SECONDS + KILL_GRACE_SECONDS))
    supervisor = state.get("supervisor")
    if supervisor and procs.owns(supervisor["pid"], supervisor["markers"]):
        on_progress(f"stopping the supervisor (pid {supervisor['pid']})")
        os.kill(supervisor["pid"], signal.SIGTERM)
        procs.wait_gone([supervisor["pid"]], deadline + KILL_GRACE_SECONDS)
    nginx = state.get("nginx")
    leftovers: list[int] = []
    if nginx and procs.owns(nginx["pid"], nginx["markers"]):
        on_progress(f"stopping nginx (pid {nginx['pid']})")
        os.kill(nginx["pid"], signal.SIGQUIT)
        leftovers.append(nginx["pid"])
    for replica in state.get("replicas", []):
        if replica.get("pid") and procs.owns(replica["pid"], replica["markers"]):
            on_progress(f"stopping replica {replica['index'] + 1} (pid {replica['pid']})")
            os.kill(replica["pid"], signal.SIGTERM)
            leftovers.append(replica["pid"])
    prometheus = state.get("prometheus")
    if prometheus and procs.owns(prometheus["pid"], prometheus["markers"]):
        on_progress(f"stopping prometheus (pid {prometheus['pid']})")
        os.kill(prometheus["pid"], signal.SIGTERM)
        leftovers.append(prometheus["pid"])
    for pid in procs.wait_gone(leftovers, deadline):
        procs.signal_group(pid, signal.SIGKILL)  # each was started as its own group leader
    procs.remove_state(workdir)
    return True
