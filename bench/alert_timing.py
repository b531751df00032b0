"""How long an alert of the stack's rules takes to fire and to resolve, measured
with a real Prometheus scraping the local replicas.

`AlertWatch(cluster, alert)` starts local mode's Prometheus (local/prometheus.py)
with the rule file rendered from the stack's alerting policy
(components/policies/alerting.py, target "local") and polls its /api/v1/alerts from a
thread, recording when the alert turns firing and when it is gone. A drill
marks when its fault started and ended and asks for the two delays.

The policy keeps every expression and threshold of the stack; only its clock is
shortened (`for`, rate windows), because a drill lasts seconds, not minutes.
The figures are therefore detection delays of the pipeline (scrape interval,
rule evaluation, `for`), reported with the `for` they include.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from components.config.parse import parse_stack_config
from components.config.stack import StackConfig
from components.policies.alerting import alert_policy, rules_file
from local.prometheus import JOB, LocalPrometheus

DEFAULT_STACK = {"model": {"id": "sim-llm"}}
"""The stack whose policy the drill loads: the defaults (backlog above
autoscaling.targetWaitingPerReplica = 2 per replica)."""
POLL_SECONDS = 0.1


@dataclass(frozen=True)
class AlertTiming:
    alert: str
    for_seconds: int
    scrape_seconds: float
    fired_after: float | None
    """Seconds from the fault's start to the alert firing; None: it never fired."""
    resolved_after: float | None
    """Seconds from the fault's end to the alert gone; None: it did not resolve in time."""

    def notes(self) -> list[str]:
        fired = "never fired" if self.fired_after is None else f"{self.fired_after:.1f} s"
        if self.resolved_after is None:
            resolved = "did not resolve after its end"
        elif self.resolved_after < 0:
            resolved = f"resolved {-self.resolved_after:.1f} s before its end"
        else:
            resolved = f"resolved {self.resolved_after:.1f} s after its end"
        return [
            f"alert {self.alert} (real Prometheus, scrape/eval {self.scrape_seconds:g} s, "
            f"for {self.for_seconds} s): fired {fired} after overload start, {resolved}"
        ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AlertWatch:
    """A local Prometheus with the stack's rules, watching one alert."""

    def __init__(self, cluster: Any, workdir: Path, alert: str = "LlmQueueBacklog", *,
                 config: StackConfig | None = None, for_seconds: int = 2,
                 window_seconds: int = 4, scrape_seconds: float = 0.5) -> None:
        cfg = config if config is not None else parse_stack_config(DEFAULT_STACK)
        self.policy = alert_policy(cfg, "local", job=JOB).with_timing(
            for_seconds=for_seconds, window_seconds=window_seconds)
        self.alert = alert
        self.cluster = cluster
        self.scrape_seconds = scrape_seconds
        self.rules = Path(workdir) / "alert-rules.yml"
        self.rules.parent.mkdir(parents=True, exist_ok=True)
        self.rules.write_text(rules_file(self.policy))
        self.prometheus = LocalPrometheus(
            workdir, namespace=cfg.namespace, port=_free_port(),
            scrape_interval_seconds=scrape_seconds, rule_files=[self.rules])
        self.transitions: list[tuple[float, bool]] = []
        """(monotonic time, firing) at each change seen."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self.prometheus.start()
        ports = [int(u.rsplit(":", 1)[1]) for u in self.cluster.replica_urls]
        self.prometheus.set_targets(ports)
        self._wait_scraping(len(ports))
        self._thread = threading.Thread(target=self._poll, name="alerts", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.prometheus.close()

    def _wait_scraping(self, count: int, timeout: float = 30.0) -> None:
        """Prometheus hands discovered targets to its scrapers every 5 s: wait for them."""
        from local.procs import LocalModeError

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                targets = httpx.get(self.prometheus.url + "/api/v1/targets", timeout=2).json()
                up = [t for t in targets["data"]["activeTargets"] if t["health"] == "up"]
                if len(up) >= count:
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise LocalModeError(f"prometheus did not scrape the {count} replicas within {timeout:g} s")

    def firing(self) -> bool:
        answer = httpx.get(self.prometheus.url + "/api/v1/alerts", timeout=2).json()
        return any(a["labels"].get("alertname") == self.alert and a["state"] == "firing"
                   for a in answer["data"]["alerts"])

    def _poll(self) -> None:
        last = False
        while not self._stop.wait(POLL_SECONDS):
            try:
                now = self.firing()
            except (httpx.HTTPError, KeyError, ValueError):
                continue
            if now != last:
                self.transitions.append((time.monotonic(), now))
                last = now

    def wait_resolved(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.transitions and not self.transitions[-1][1]:
                return
            time.sleep(POLL_SECONDS)

    def timing(self, started: float, ended: float) -> AlertTiming:
        fired = next((t for t, on in self.transitions if on and t >= started), None)
        resolved = next((t for t, on in self.transitions if not on and t >= ended), None)
        if resolved is None and fired is not None:
            # Resolved while the last requests were still being sent counts from the end too.
            resolved = next((t for t, on in self.transitions if not on and t > fired), None)
        return AlertTiming(
            alert=self.alert, for_seconds=self.policy.for_seconds,
            scrape_seconds=self.scrape_seconds,
            fired_after=None if fired is None else fired - started,
            resolved_after=None if resolved is None else resolved - ended,
        )


class _Skipped:
    """Stands in for AlertWatch when no Prometheus can run; says why in the notes."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def finish(self, records: Any, load_ended: float) -> list[str]:
        return [f"alert timing skipped: {self.reason}"]

    def close(self) -> None:
        pass


class _Running:
    def __init__(self, watch: AlertWatch) -> None:
        self.watch = watch

    def finish(self, records: Any, load_ended: float, timeout: float = 20.0) -> list[str]:
        """Wait for the alert to resolve, then the timing notes (fault = the load's span)."""
        sent = [r.sent for r in records if r.sent == r.sent]  # NaN: never sent
        started = min(sent) if sent else load_ended
        self.watch.wait_resolved(timeout)
        return self.watch.timing(started, load_ended).notes()

    def close(self) -> None:
        self.watch.__exit__(None, None, None)


def start(cluster: Any, alert: str = "LlmQueueBacklog") -> _Running | _Skipped:
    """Start watching `alert` on the cluster, or a stand-in when Prometheus cannot run."""
    from local.procs import LocalModeError

    workdir = Path(getattr(cluster, "workdir", None) or Path.cwd() / ".local-run")
    try:
        return _Running(AlertWatch(cluster, workdir, alert).__enter__())
    except LocalModeError as exc:
        return _Skipped(str(exc).splitlines()[0])
