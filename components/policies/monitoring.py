"""What the stack scrapes besides the engine: the ingress controller's own metrics (its chart
values), on when `monitoring.serviceMonitor` is on and the stack installs the controller.
The ServiceMonitor of the engine is components/resources/monitoring.py; alert rules are
components/policies/alerting.py, the dashboard components/policies/dashboard.py."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from components.config.monitoring import MonitoringConfig
    from components.config.stack import StackConfig

# --- the ingress controller's own metrics ------------------------------------------
# F5 NGINX Ingress Controller chart 2.6.x (controller 5.5.x) values, read from
# nginx/kubernetes-ingress@v5.5.4:charts/nginx-ingress/values.yaml and its
# values.schema.json (tests/contracts/data/nginx-ingress-controller-5.5.4.prometheus.json).

CONTROLLER_METRICS_PORT = 9113
"""The chart's default `prometheus.port`; the exporter listens there in each controller pod."""

CONTROLLER_LATENCY_METRIC = "nginx_ingress_controller_upstream_server_response_latency_ms"
"""Histogram (milliseconds) of upstream response times, with `controller.enableLatencyMetrics`."""


def controller_metrics_enabled(cfg: "StackConfig") -> bool:
    """The controller's metrics are on when this stack installs it and monitoring scrapes."""
    return (
        cfg.monitoring.service_monitor
        and cfg.ingress.enabled
        and cfg.ingress.controller.install
    )


def controller_metrics_values(monitoring: "MonitoringConfig") -> dict[str, Any]:
    """Chart values that expose the controller's Prometheus endpoint and let the chart
    create the Service and ServiceMonitor that scrape it; {} unless monitoring.serviceMonitor.

    For the values of a controller this stack installs (merge them into its chart values
    with `merge_values`). The chart's own ServiceMonitor selects its own headless Service
    by the chart's selector labels, so no object here has to guess them.
    """
    if not monitoring.service_monitor:
        return {}
    return {
        "controller": {"enableLatencyMetrics": True},
        "prometheus": {
            "create": True,
            "port": CONTROLLER_METRICS_PORT,
            "scheme": "http",
            "service": {"create": True},
            "serviceMonitor": {
                "create": True,
                "labels": dict(monitoring.labels),
                "endpoints": [{
                    "port": "prometheus",
                    "interval": f"{monitoring.interval_seconds}s",
                }],
            },
        },
    }


# --- kube-state-metrics -------------------------------------------------------------
# Chart kube-state-metrics 8.4.0 (kube-state-metrics 2.20.0) values, read from
# prometheus-community/helm-charts@kube-state-metrics-8.4.0:charts/kube-state-metrics
# (tests/contracts/data/kube-state-metrics-2.20.0.chart.json).

KUBE_STATE_METRICS_COLLECTORS = ("deployments",)
"""What the replica alerts read (kube_deployment_*); the chart grants RBAC per collector."""


def kube_state_metrics_values(cfg: "StackConfig") -> dict[str, Any]:
    """Chart values for the kube-state-metrics this stack installs (`monitoring.kubeStateMetrics:
    install`): only Deployments, only the stack's namespace (so a Role there, not a ClusterRole),
    scraped through the chart's ServiceMonitor with the labels the Prometheus selects by."""
    monitoring = cfg.monitoring
    return {
        "collectors": list(KUBE_STATE_METRICS_COLLECTORS),
        "namespaces": cfg.namespace,
        "rbac": {"useClusterRole": False},
        # Scraped through the ServiceMonitor; the prometheus.io/scrape annotation would have an
        # annotation-based scrape job read it a second time.
        "prometheusScrape": False,
        "prometheus": {"monitor": {
            "enabled": True,
            "additionalLabels": dict(monitoring.labels),
            "http": {
                "interval": f"{monitoring.interval_seconds}s",
                # The series' own `namespace` (the Deployment's) must survive the scrape: the
                # rules select on it. The chart's default (false) would rename it
                # exported_namespace and put kube-state-metrics' namespace in its place.
                "honorLabels": True,
            },
        }},
    }


def merge_values(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of Helm values: `extra` wins on leaves, nested maps merge."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = value
    return merged
