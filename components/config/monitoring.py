"""Stack configuration sections of monitoring: the Prometheus Operator objects and the SLO
thresholds the alerts use (assembled in components/config/stack.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from components.config.sections import Section
from components.config.types import DnsLabel, Labels


class SloConfig(Section):
    ttft_p99_seconds: float = Field(2.0, gt=0, le=600)
    """Time-to-first-token objective: alert when the p99 stays above it."""
    refusal_ratio: float = Field(0.05, gt=0, le=1)
    """Alert when more than this fraction of requests is refused with 429 (engines that refuse)."""
    for_minutes: int = Field(5, ge=1, le=1440)
    """How long a condition must hold before its alert fires."""
    no_ready_for_minutes: int = Field(1, ge=1, le=1440)
    """How long the model may have no ready replica before that alert fires."""
    window_minutes: int = Field(5, ge=1, le=1440)
    """Range of the rate() windows behind request rates, percentiles and ratios."""


class MonitoringConfig(Section):
    service_monitor: bool = False
    """Create a ServiceMonitor (needs the Prometheus Operator's CRDs); with an installed ingress
    controller, also turn on and scrape the controller's metrics."""
    labels: Labels = {}
    """Labels your Prometheus selects ServiceMonitors and rules by, e.g. release: kube-prometheus-stack."""
    interval_seconds: int = Field(15, ge=1, le=3600)
    """Scrape interval."""
    rules: bool = False
    """Create a PrometheusRule: recording rules and SLO alerts (needs the Prometheus Operator's
    CRDs; the replica alerts read kube-state-metrics, see `kubeStateMetrics`)."""
    kube_state_metrics: Literal["present", "install"] | None = None
    """Where the replica alerts (LlmNoReadyReplica, LlmReplicasAtMax) get kube_deployment_*
    from. present: a kube-state-metrics your Prometheus already scrapes with honorLabels
    (kube-prometheus-stack's). install: kube-state-metrics 2.20.0 (chart 8.4.0) installed with
    Helm into `kubeStateMetricsNamespace`, watching only the stack's namespace, scraped through
    a ServiceMonitor labelled `labels`. Unset with `rules` on: a warning at every preview,
    since without kube-state-metrics those alerts never fire."""
    kube_state_metrics_namespace: DnsLabel = "kube-state-metrics"
    """Namespace kube-state-metrics is installed into (with kubeStateMetrics: install)."""
    dashboard: bool = False
    """Create a Grafana dashboard ConfigMap labelled for the kube-prometheus-stack sidecar."""
    dashboard_namespace: DnsLabel | None = None
    """Namespace of the dashboard ConfigMap (where the Grafana sidecar looks); unset: the stack's."""
    slo: SloConfig = SloConfig()
    """Alert thresholds; the queue-backlog alert uses autoscaling.targetWaitingPerReplica."""
