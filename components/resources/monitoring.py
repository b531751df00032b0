"""The ServiceMonitor that scrapes the engine when `monitoring.serviceMonitor` is on.

The ingress controller's metrics are chart values (components/policies/monitoring.py); alert
rules are components/resources/alert_rules.py, the dashboard components/resources/dashboard.py."""

from __future__ import annotations

from typing import Mapping, NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s


class LlmServiceMonitorArgs(TypedDict):
    namespace: pulumi.Input[str]
    service_labels: Mapping[str, str]
    """Labels that select the model Service."""
    metrics_path: str
    interval_seconds: int
    labels: NotRequired[Mapping[str, str]]
    """Labels the Prometheus selects ServiceMonitors by."""


class LlmServiceMonitor(pulumi.ComponentResource):
    def __init__(
        self, name: str, args: LlmServiceMonitorArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("llm-serving:index:LlmServiceMonitor", name, None, opts)
        if args["interval_seconds"] < 1:
            raise ValueError("LlmServiceMonitor: 'interval_seconds' must be at least 1")
        namespace = pulumi.Output.from_input(args["namespace"])
        k8s.apiextensions.CustomResource(
            f"{name}-servicemonitor",
            api_version="monitoring.coreos.com/v1",
            kind="ServiceMonitor",
            metadata={"namespace": namespace, "labels": dict(args.get("labels", {}))},
            spec={
                "selector": {"matchLabels": dict(args["service_labels"])},
                "namespaceSelector": {"matchNames": [namespace]},
                "endpoints": [{
                    "port": "http",
                    "path": args["metrics_path"],
                    "interval": f"{args['interval_seconds']}s",
                }],
            },
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.register_outputs({})
