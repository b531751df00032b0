"""The ServiceMonitor that scrapes the engine when `monitoring.serviceMonitor` is on.

The ingress controller's metrics are chart values (components/policies/monitoring.py); alert
rules are components/resources/alert_rules.py, the dashboard components/resources/dashboard.py."""

from __future__ import annotations

from typing import Any, Mapping, NotRequired, TypedDict

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
    target_labels: NotRequired[Mapping[str, str]]
    """Labels added to every series scraped (target relabelings), e.g. the model's name for an
    engine whose series do not carry it."""


class LlmServiceMonitor(pulumi.ComponentResource):
    def __init__(
        self, name: str, args: LlmServiceMonitorArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("llm-serving:index:LlmServiceMonitor", name, None, opts)
        if args["interval_seconds"] < 1:
            raise ValueError("LlmServiceMonitor: 'interval_seconds' must be at least 1")
        namespace = pulumi.Output.from_input(args["namespace"])
        endpoint: dict[str, Any] = {
            "port": "http",
            "path": args["metrics_path"],
            "interval": f"{args['interval_seconds']}s",
        }
        if args.get("target_labels"):
            # No source labels: the default regex (.*) matches the empty value, so each label
            # is set to its replacement on every target of this monitor.
            endpoint["relabelings"] = [
                {"action": "replace", "targetLabel": label, "replacement": value}
                for label, value in sorted(args["target_labels"].items())
            ]
        k8s.apiextensions.CustomResource(
            f"{name}-servicemonitor",
            api_version="monitoring.coreos.com/v1",
            kind="ServiceMonitor",
            metadata={"namespace": namespace, "labels": dict(args.get("labels", {}))},
            spec={
                "selector": {"matchLabels": dict(args["service_labels"])},
                "namespaceSelector": {"matchNames": [namespace]},
                "endpoints": [endpoint],
            },
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.register_outputs({})
