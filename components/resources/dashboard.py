"""The stack's Grafana dashboard (components/policies/dashboard.py) in a ConfigMap that the
kube-prometheus-stack Grafana sidecar loads."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Mapping, NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.policies.dashboard import SIDECAR_LABEL, build_dashboard, dashboard_uid

if TYPE_CHECKING:
    from components.config.stack import StackConfig


class LlmDashboardArgs(TypedDict):
    config: "StackConfig"
    namespace: pulumi.Input[str]
    """Where the Grafana sidecar looks for dashboards."""
    labels: NotRequired[Mapping[str, str]]


class LlmDashboard(pulumi.ComponentResource):
    """The stack's Grafana dashboard in a ConfigMap for the Grafana sidecar."""

    def __init__(
        self, name: str, args: LlmDashboardArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("llm-serving:index:LlmDashboard", name, None, opts)
        cfg = args["config"]
        board = build_dashboard(cfg)
        k8s.core.v1.ConfigMap(
            f"{name}-dashboard",
            metadata={
                "namespace": args["namespace"],
                "labels": {**dict(args.get("labels", {})), **SIDECAR_LABEL},
            },
            data={f"{dashboard_uid(cfg)}.json": json.dumps(board, indent=1, sort_keys=True)},
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.register_outputs({})
