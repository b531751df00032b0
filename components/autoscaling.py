"""LlmAutoscaler: replicas that follow load. CPU engines scale on utilisation
(HPA); GPU engines on their own queue metrics read from Prometheus (KEDA)."""

from __future__ import annotations

from typing import Any, Mapping, NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.pod_security import pod_security_labels
from components.config import KEDA_CHART, KEDA_REPOSITORY, StackConfig


class LlmAutoscalerArgs(TypedDict):
    config: StackConfig
    namespace: pulumi.Input[str]
    deployment_name: pulumi.Input[str]
    labels: NotRequired[Mapping[str, str]]


def _scale_down_behavior(window: int) -> dict[str, Any]:
    """HPA `behavior`, for the HPA itself and inside KEDA's ScaledObject (a raw custom
    resource, hence camelCase keys; the typed HPA args accept them as they are)."""
    # Remove one pod at a time, and only after load stayed low for the whole
    # window: a replacement would need the full model load time to come back.
    return {
        "scaleDown": {
            "stabilizationWindowSeconds": window,
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
        },
        "scaleUp": {"stabilizationWindowSeconds": 0},
    }


def queue_queries(metric: str, namespace: str) -> str:
    """PromQL summing an engine gauge over the stack's namespace (one stack per namespace)."""
    return f'sum({metric}{{namespace="{namespace}"}})'


class LlmAutoscaler(pulumi.ComponentResource):
    kind: str
    """"HorizontalPodAutoscaler" or "ScaledObject"."""

    def __init__(
        self, name: str, args: LlmAutoscalerArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("llm-serving:index:LlmAutoscaler", name, None, opts)
        cfg = args["config"]
        if not cfg.autoscaling.enabled:
            raise ValueError("LlmAutoscaler: autoscaling.enabled is false; do not create one")
        metadata = {"namespace": args["namespace"], "labels": dict(args.get("labels", {}))}
        if cfg.profile.scale_signal == "cpu":
            self.kind = "HorizontalPodAutoscaler"
            self._hpa(name, cfg, args, metadata)
        else:
            self.kind = "ScaledObject"
            self._scaled_object(name, cfg, args, metadata)
        self.register_outputs({})

    def _hpa(self, name: str, cfg: StackConfig, args: LlmAutoscalerArgs, metadata: dict) -> None:
        scaling = cfg.autoscaling
        k8s.autoscaling.v2.HorizontalPodAutoscaler(
            f"{name}-hpa",
            metadata=metadata,
            spec={
                "scale_target_ref": {
                    "api_version": "apps/v1", "kind": "Deployment", "name": args["deployment_name"],
                },
                "min_replicas": scaling.min_replicas,
                "max_replicas": scaling.max_replicas,
                "metrics": [{
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {
                            "type": "Utilization",
                            "average_utilization": scaling.target_cpu_utilization,
                        },
                    },
                }],
                "behavior": _scale_down_behavior(cfg.scale_down_window_seconds),
            },
            opts=pulumi.ResourceOptions(parent=self),
        )

    def _scaled_object(
        self, name: str, cfg: StackConfig, args: LlmAutoscalerArgs, metadata: dict
    ) -> None:
        scaling, profile = cfg.autoscaling, cfg.profile
        depends: list[pulumi.Resource] = []
        if scaling.install_keda:
            keda_ns = k8s.core.v1.Namespace(
                f"{name}-keda-ns",
                # KEDA's chart defaults meet `restricted`
                # (tests/contracts/data/keda-2.19.0.podsecurity.json).
                metadata={"name": scaling.keda_namespace,
                          "labels": pod_security_labels("restricted")},
                opts=pulumi.ResourceOptions(parent=self),
            )
            depends.append(k8s.helm.v3.Release(
                f"{name}-keda",
                name="keda",
                chart=KEDA_CHART,
                version=scaling.keda_chart_version,
                repository_opts={"repo": KEDA_REPOSITORY},
                namespace=keda_ns.metadata.name,
                opts=pulumi.ResourceOptions(parent=self),
            ))
        window = cfg.scale_down_window_seconds
        namespace = pulumi.Output.from_input(args["namespace"])

        def trigger(metric: str, threshold: int) -> dict[str, Any]:
            return {
                "type": "prometheus",
                "metadata": {
                    "serverAddress": scaling.prometheus_url,
                    "query": namespace.apply(lambda ns: queue_queries(metric, ns)),
                    # AverageValue: KEDA divides the sum by the replica count.
                    "threshold": str(threshold),
                },
            }

        k8s.apiextensions.CustomResource(
            f"{name}-scaledobject",
            api_version="keda.sh/v1alpha1",
            kind="ScaledObject",
            metadata=metadata,
            spec={
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                   "name": args["deployment_name"]},
                "minReplicaCount": scaling.min_replicas,
                "maxReplicaCount": scaling.max_replicas,
                "pollingInterval": scaling.polling_interval_seconds,
                # Only used when scaling to zero; kept as long as the HPA window.
                "cooldownPeriod": window,
                "advanced": {
                    "horizontalPodAutoscalerConfig": {"behavior": _scale_down_behavior(window)},
                },
                # KEDA scales to the largest replica count any trigger asks for.
                "triggers": [
                    trigger(profile.waiting_metric, scaling.target_waiting_per_replica),
                    trigger(profile.running_metric, scaling.target_running_per_replica),
                ],
            },
            # The ScaledObject CRD arrives with the KEDA chart.
            opts=pulumi.ResourceOptions(parent=self, depends_on=depends),
        )
