"""The local autoscaler: the cluster's scaling rule, run against a real Prometheus.

Every polling interval it sends each trigger's PromQL (the text the ScaledObject carries) to
Prometheus, feeds the values to `ScalingPolicy.rule()` (the HPA algorithm) and scales the
`LocalCluster`: up by starting replicas that join nginx once `/ready`, down by taking a
replica out of nginx and then letting it drain (see `local.elastic`). Between polls it admits
replicas that turned ready and reaps drained ones, like the endpoints and ReplicaSet
controllers do between two HPA syncs.

As in the cluster, the replica count the rule sees is the scale target's (pods that exist,
loading ones included; draining ones not), and Prometheus scrapes only replicas that serve
(a Service's endpoints hold Ready pods only).

Every decision goes to `<workdir>/autoscaler.jsonl`; changes (and, with `verbose`, every
decision) are also reported through `on_event`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from components.engines import PROFILES
from components.policies.alerting import local_rules
from components.policies.scaling import Decision, ScalingPolicy
from local import cleanup
from local.procs import LocalModeError
from local.prometheus import LocalPrometheus

HOUSEKEEPING_SECONDS = 0.2
"""How often, between polls, ready replicas are admitted and drained ones reaped."""


@dataclass(frozen=True)
class Sample:
    """The cluster at one instant: one type for every autoscaling time series (this
    autoscaler's own record, the benchmark's plots and replica-seconds)."""

    t: float
    """Seconds: the monotonic clock where recorded; the benchmark shifts it to its trace."""
    serving: int
    starting: int
    draining: int
    waiting: float | None = None
    """Requests queued, summed over the serving replicas' /metrics; None where not read."""
    running: float | None = None
    """Sequences in generation, summed alike; None where not read."""

    @property
    def processes(self) -> int:
        """Replicas that cost money: loading, serving or draining."""
        return self.serving + self.starting + self.draining


class LocalAutoscaler:
    """Run with `start()` (a background thread) and `stop()`, or call `step()` yourself."""

    def __init__(self, cluster: Any, prometheus: LocalPrometheus, policy: ScalingPolicy, *,
                 on_event: Callable[[str], None] | None = None, log: Path | None = None,
                 verbose: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.cluster = cluster
        self.prometheus = prometheus
        self.policy = policy
        self.rule = policy.rule()
        self.decisions: list[Decision] = []
        self.samples: list[Sample] = []
        self.events: list[tuple[float, str, int]] = []
        """(time, "added" | "serving" | "retired" | "drained", replica index)."""
        self.errors: list[str] = []
        self._say = on_event or (lambda _m: None)
        self._log = log
        self._verbose = verbose
        self._clock = clock
        self._t0 = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sync_targets()

    # --- one poll ---

    def step(self) -> Decision:
        """Query, decide, act (one HPA sync)."""
        now = self._clock()
        values = tuple(self.prometheus.query(t.query) for t in self.policy.triggers)
        current = self.cluster.replicas
        decision = self.rule.evaluate(now, current, values)
        self.decisions.append(decision)
        changed = decision.desired != current
        if changed:
            for _ in range(decision.desired - current):
                index = self.cluster.add_replica()
                self._event(now, "added", index)
            for _ in range(current - decision.desired):
                index = self.cluster.retire_replica()
                if index is not None:
                    self._event(now, "retired", index)
            self._sync_targets()
        line = self.describe(decision)
        if changed or self._verbose:
            self._say(line)
        self._write_log(decision)
        return decision

    def housekeeping(self) -> None:
        now = self._clock()
        for index in self.cluster.admit_ready():
            self._event(now, "serving", index)
            self._sync_targets()
        for index in self.cluster.reap_draining():
            self._event(now, "drained", index)
        self.samples.append(Sample(now, self.cluster.serving, self.cluster.starting,
                                   self.cluster.draining))

    def describe(self, d: Decision) -> str:
        metrics = ", ".join(f"{t.metric}={v:g} (target {t.threshold:g}/replica)"
                            for t, v in zip(self.policy.triggers, d.metrics))
        arrow = f"{d.current} -> {d.desired}" if d.desired != d.current else f"stay {d.current}"
        return f"[autoscaler +{d.at - self._t0:7.1f}s] {arrow}: {metrics}; {d.reason}"

    # --- loop ---

    def start(self) -> LocalAutoscaler:
        self._thread = threading.Thread(target=self._run, name="local-autoscaler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        next_poll = self._clock()
        while not self._stop.is_set():
            try:
                self.housekeeping()
                if self._clock() >= next_poll:
                    self.step()
                    # A slow step (an nginx reload) delays the next poll rather than
                    # bunching polls up to catch up.
                    next_poll = max(next_poll + self.policy.polling_interval_seconds,
                                    self._clock())
            except LocalModeError as exc:  # reported, and the loop goes on (as the HPA does)
                if self._stop.is_set() or cleanup.stopping():
                    break  # the command is stopping: nothing new starts (local/cleanup.py)
                self.errors.append(str(exc))
                self._say(f"[autoscaler] error: {exc}")
            wait = min(HOUSEKEEPING_SECONDS, max(0.0, next_poll - self._clock()))
            self._stop.wait(wait)

    # --- internals ---

    def _sync_targets(self) -> None:
        self.prometheus.set_targets(self.cluster.serving_ports)

    def _event(self, now: float, kind: str, index: int) -> None:
        self.events.append((now, kind, index))
        if kind in ("serving", "drained"):
            self._say(f"[autoscaler +{now - self._t0:7.1f}s] replica {index + 1} {kind}")

    def _write_log(self, decision: Decision) -> None:
        if self._log is None:
            return
        record = asdict(decision) | {"t": round(decision.at - self._t0, 3)}
        with open(self._log, "a") as out:
            out.write(json.dumps(record) + "\n")


# --- wiring for `python -m local up --autoscale` ------------------------------------------------


def stack_file(stack: str | Path) -> Path:
    """The stack file `stack` names: a path to a `Pulumi.<name>.yaml`, or a stack name looked
    up as `Pulumi.<name>.yaml` in the current directory, then in the project."""
    path = Path(stack)
    if path.exists() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    for folder in (Path.cwd(), Path(__file__).resolve().parents[1]):
        candidate = folder / f"Pulumi.{stack}.yaml"
        if candidate.exists():
            return candidate
    raise LocalModeError(f"no stack file for {stack!r}: pass Pulumi.<name>.yaml or the name "
                         "of a stack of this project")


def stack_config(path: Path | None) -> Any:
    """The `StackConfig` of a Pulumi stack file, or, without one, the defaults with
    autoscaling on (secrets are not needed here and are skipped)."""
    import yaml

    from components.config.parse import ConfigError, parse_stack_config

    raw: dict[str, Any] = {"model": {"id": "sim-llm"}, "autoscaling": {"enabled": True}}
    if path is not None:
        try:
            document = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise LocalModeError(f"cannot read stack file {path}: {exc}") from None
        prefix = "llm-serving:"
        raw = {k.removeprefix(prefix): v for k, v in (document.get("config") or {}).items()
               if k.startswith(prefix)}
    try:
        return parse_stack_config(raw)
    except ConfigError as exc:
        raise LocalModeError(str(exc)) from None


def local_policy(cfg: Any, time_factor: float = 1.0) -> ScalingPolicy:
    """The stack's policy with the local server's metric names, on a clock `time_factor`
    times faster (1: the cluster's own periods and windows)."""
    from components.engines import PROFILES

    policy = ScalingPolicy.for_stack(cfg, PROFILES["server"])
    return policy if time_factor == 1 else policy.compressed(time_factor)


def start_autoscaling(cluster: Any, cfg: Any, *, port: int, time_factor: float = 1.0,
                      on_event: Callable[[str], None] | None = None,
                      verbose: bool = False) -> tuple[LocalPrometheus, LocalAutoscaler]:
    """Start Prometheus under the cluster's workdir and the autoscaler loop."""
    policy = local_policy(cfg, time_factor)
    interval = max(0.25, cfg.monitoring.interval_seconds / time_factor)
    # The stack's alert and recording rules, on the same compressed clock.
    rules = cluster.workdir / "prometheus-rules.yml"
    rules.write_text(local_rules(cfg, time_factor, scrape_seconds=interval,
                                 profile=PROFILES["server"]))
    prometheus = LocalPrometheus(cluster.workdir, namespace=cfg.namespace, port=port,
                                 scrape_interval_seconds=interval, rule_files=[rules])
    prometheus.set_targets(cluster.serving_ports)
    prometheus.start()
    cluster.extra_state["prometheus"] = {"pid": prometheus.pid, "markers": prometheus.markers,
                                         "url": prometheus.url}
    cluster.save_state()
    try:
        scaler = LocalAutoscaler(cluster, prometheus, policy, on_event=on_event,
                                 log=cluster.workdir / "autoscaler.jsonl", verbose=verbose)
    except BaseException:
        prometheus.close()
        raise
    return prometheus, scaler.start()
