"""kube-state-metrics, installed with Helm when `monitoring.kubeStateMetrics` is `install`: the
source of the kube_deployment_* series the cluster replica alerts read. Its values (only
Deployments, only the stack's namespace, a ServiceMonitor with honorLabels) are the monitoring
policy's: components/policies/monitoring.py."""

from __future__ import annotations

from typing import Mapping, NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.config.stack import StackConfig
from components.pins import (
    KUBE_STATE_METRICS_CHART,
    KUBE_STATE_METRICS_CHART_VERSION,
    KUBE_STATE_METRICS_REPOSITORY,
)
from components.policies.monitoring import kube_state_metrics_values
from components.policies.pod_security import pod_security_labels


class KubeStateMetricsArgs(TypedDict):
    config: StackConfig
    labels: NotRequired[Mapping[str, str]]


class KubeStateMetrics(pulumi.ComponentResource):
    """Its own namespace (restricted: the chart's pods meet it by default) and the release."""

    def __init__(self, name: str, args: KubeStateMetricsArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-serving:index:KubeStateMetrics", name, None, opts)
        cfg = args["config"]
        namespace = k8s.core.v1.Namespace(
            f"{name}-ns",
            metadata={"name": cfg.monitoring.kube_state_metrics_namespace,
                      "labels": {**args.get("labels", {}), **pod_security_labels("restricted")}},
            opts=pulumi.ResourceOptions(parent=self),
        )
        k8s.helm.v3.Release(
            f"{name}-release",
            name="kube-state-metrics",
            chart=KUBE_STATE_METRICS_CHART,
            version=KUBE_STATE_METRICS_CHART_VERSION,
            repository_opts={"repo": KUBE_STATE_METRICS_REPOSITORY},
            namespace=namespace.metadata.name,
            values=kube_state_metrics_values(cfg),
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.register_outputs({})
