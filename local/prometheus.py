"""A real Prometheus for local mode, scraping every replica's `/metrics` on 127.0.0.1.

Local autoscaling reads the same PromQL text the cluster's KEDA ScaledObject sends, so the
scrape gives each replica the labels a cluster scrape gives a pod: `namespace` (the stack's
namespace, which the queries select on), `pod` and `instance`.

API
---
``LocalPrometheus(workdir, namespace=..., port=9090, scrape_interval_seconds=1.0,
rule_files=(), evaluation_interval_seconds=None, binary=None)``

* ``start(timeout)``: writes ``<workdir>/prometheus/prometheus.yml`` (``scrape_config``), checks
  it (and every rule file) with ``promtool`` when that is installed, starts ``prometheus``
  bound to 127.0.0.1 with its TSDB under ``<workdir>/prometheus/data``, and waits for
  ``/-/ready``. Raises ``LocalModeError`` when the binary is missing (with the install
  command), the port is taken, a rule file is invalid, or it does not become ready.
* ``set_targets(ports)``: the replicas to scrape. Targets live in a file_sd file that
  Prometheus watches, so scaling needs no reload; a removed target's series go stale at once.
* ``query(promql)``: an instant query through the HTTP API, read the way KEDA's Prometheus
  scaler (v2.19.0) reads it: no series is 0 (``ignoreNullValues`` defaults to true), more
  than one series is an error.
* ``reload()``: SIGHUP, e.g. after editing a rule file in place.
* ``stop()``: SIGTERM, then SIGKILL after a deadline. Also a context manager.
* ``url``: ``http://127.0.0.1:<port>``, where the UI and ``/api/v1`` answer.

Alert or recording rules: pass ``rule_files`` (paths of Prometheus rule files, e.g. rendered
from the stack's alerting policy). They are validated with ``promtool check rules`` before
start and evaluated every ``evaluation_interval_seconds`` (default: the scrape interval);
their state shows at ``<url>/api/v1/rules`` and ``<url>/api/v1/alerts``. No Alertmanager is
configured: firing alerts are visible there, not delivered.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from components.policies.scaling import promql_duration
from local import procs
from local.procs import LocalModeError

PROMETHEUS_INSTALL_HINT = ("install it: sudo apt-get install prometheus (Debian/Ubuntu, ships "
                           "promtool) or brew install prometheus (macOS)")
JOB = "llm-serving-local"
DEFAULT_PORT = 9090


def find_prometheus(explicit: str | None = None) -> str:
    """The prometheus binary: `explicit`, else PATH (Debian: /usr/bin/prometheus)."""
    found = shutil.which(explicit or "prometheus")
    if found is None:
        where = f" at {explicit}" if explicit else ""
        raise LocalModeError(f"prometheus not found{where}; {PROMETHEUS_INSTALL_HINT}")
    return found


def scrape_config(targets_file: Path, *, scrape_interval_seconds: float,
                  evaluation_interval_seconds: float | None = None,
                  rule_files: Sequence[Path] = (), metrics_path: str = "/metrics") -> str:
    """prometheus.yml: one job reading its targets (and their labels) from `targets_file`.

    JSON is valid YAML, so the file is written as JSON (no YAML library needed).
    """
    if scrape_interval_seconds <= 0:
        raise ValueError(f"scrape_interval_seconds must be positive, got {scrape_interval_seconds}")
    interval = promql_duration(scrape_interval_seconds)
    config = {
        "global": {
            "scrape_interval": interval,
            # A scrape must end before the next one starts.
            "scrape_timeout": interval,
            "evaluation_interval": promql_duration(evaluation_interval_seconds
                                             or scrape_interval_seconds),
        },
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [{
            "job_name": JOB,
            "metrics_path": metrics_path,
            # Prometheus also watches the file; the re-read is the fallback, kept as short
            # as a scrape so a new replica is scraped within one interval.
            "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": interval}],
        }],
    }
    return json.dumps(config, indent=2) + "\n"


def targets_json(ports: Iterable[int], namespace: str) -> str:
    """file_sd content: each replica with the labels a cluster scrape puts on a pod."""
    groups = [{"targets": [f"127.0.0.1:{port}"],
               "labels": {"namespace": namespace, "pod": f"replica-{port}"}}
              for port in sorted(ports)]
    return json.dumps(groups, indent=2) + "\n"


def parse_instant(body: Mapping[str, object], query: str) -> float:
    """The value of an instant-query answer, as KEDA's Prometheus scaler reads it."""
    if body.get("status") != "success":
        raise LocalModeError(f"prometheus query {query!r} failed: {body.get('error', body)}")
    data = body.get("data")
    result = data.get("result") if isinstance(data, dict) else None
    if not isinstance(result, list):
        raise LocalModeError(f"prometheus query {query!r}: unexpected answer {body}")
    if not result:
        return 0.0  # ignoreNullValues: true (KEDA's default)
    if len(result) > 1:
        raise LocalModeError(f"prometheus query {query!r} returned {len(result)} series; "
                             "a scaling query must return one")
    value = float(result[0]["value"][1])
    return 0.0 if value != value or value in (float("inf"), float("-inf")) else value


class LocalPrometheus:
    """A Prometheus process under `<workdir>/prometheus`, listening on 127.0.0.1:`port`."""

    def __init__(self, workdir: Path, *, namespace: str, port: int = DEFAULT_PORT,
                 scrape_interval_seconds: float = 1.0, rule_files: Sequence[Path] = (),
                 evaluation_interval_seconds: float | None = None,
                 binary: str | None = None) -> None:
        if not 1 <= port <= 65_535:
            raise ValueError(f"port must be 1-65535, got {port!r}")
        self.dir = Path(workdir).resolve() / "prometheus"
        self.namespace = namespace
        self.port = port
        self.scrape_interval_seconds = scrape_interval_seconds
        self.evaluation_interval_seconds = evaluation_interval_seconds
        self.rule_files = [Path(p) for p in rule_files]
        self._binary_arg = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._client = httpx.Client(timeout=5.0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def config_path(self) -> Path:
        return self.dir / "prometheus.yml"

    @property
    def targets_path(self) -> Path:
        return self.dir / "targets.json"

    @property
    def markers(self) -> list[str]:
        """Command-line markers for the state file (`python -m local down` checks them)."""
        return ["prometheus", f"--config.file={self.config_path}"]

    def start(self, timeout: float = 30.0) -> Self:
        binary = find_prometheus(self._binary_arg)
        if procs.port_in_use(self.port):
            raise LocalModeError(f"{procs.port_busy(self.port, 'prometheus')}; pick "
                                 "--prometheus-port or stop what holds it")
        for rule_file in self.rule_files:
            if not rule_file.is_file():
                raise LocalModeError(f"rule file {rule_file} does not exist")
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        if not self.targets_path.exists():
            self.set_targets([])
        self.config_path.write_text(scrape_config(
            self.targets_path, scrape_interval_seconds=self.scrape_interval_seconds,
            evaluation_interval_seconds=self.evaluation_interval_seconds,
            rule_files=self.rule_files))
        self._promtool("config", str(self.config_path))
        log = self.dir / "prometheus.log"
        self._proc = procs.spawn([
            binary, f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1d", "--log.level=warn",
        ], log=log)
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise LocalModeError(f"prometheus exited with code {code}; last lines of "
                                     f"{log}:\n{procs.log_tail(log)}")
            try:
                if self._client.get(self.url + "/-/ready").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise LocalModeError(f"prometheus was not ready on :{self.port} within "
                                     f"{timeout:g} s; see {log}")
            time.sleep(0.1)

    def set_targets(self, ports: Iterable[int]) -> None:
        """Scrape exactly these replica ports (atomic write; Prometheus watches the file)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.targets_path.with_suffix(".tmp")
        tmp.write_text(targets_json(ports, self.namespace))
        os.replace(tmp, self.targets_path)

    def query(self, promql: str) -> float:
        try:
            answer = self._client.get(self.url + "/api/v1/query", params={"query": promql})
        except httpx.HTTPError as exc:
            raise LocalModeError(f"prometheus query {promql!r}: {exc}") from None
        try:
            body = answer.json()
        except ValueError:
            raise LocalModeError(f"prometheus query {promql!r}: HTTP {answer.status_code}") \
                from None
        return parse_instant(body, promql)

    def reload(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            if procs.wait_gone([self._proc.pid], timeout, [self._proc]):
                procs.signal_group(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=10)
        self._proc = None

    def close(self) -> None:
        self.stop()
        self._client.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _promtool(self, kind: str, *paths: str) -> None:
        """`promtool check config|rules`, when promtool is installed (it ships with Debian's
        prometheus package); `check config` also checks the rule files it names."""
        promtool = shutil.which("promtool")
        if promtool is None:
            return
        result = subprocess.run([promtool, "check", kind, *paths], capture_output=True,
                                text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise LocalModeError(f"promtool check {kind} failed:\n"
                                 + (result.stdout + result.stderr).strip())
