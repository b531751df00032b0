"""LlmAutoscaler: replicas that follow load. CPU engines scale on utilisation
(HPA); GPU engines on their own queue metrics read from Prometheus (KEDA).

Everything but the CPU metric comes from `components.policies.scaling.ScalingPolicy`, the object
local mode evaluates too (`local.autoscaler`), so what a local benchmark measures is what
the cluster runs."""

from __future__ import annotations

from typing import Mapping, NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.config.stack import StackConfig
from components.pins import KEDA_CHART, KEDA_REPOSITORY
from components.policies.pod_security import pod_security_labels
from components.policies.scaling import ScalingPolicy


class LlmAutoscalerArgs(TypedDict):
    config: StackConfig
    namespace: pulumi.Input[str]
    deployment_name: pulumi.Input[str]
    labels: NotRequired[Mapping[str, str]]


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
                "behavior": ScalingPolicy.for_stack(cfg).hpa_behavior(),
            },
            opts=pulumi.ResourceOptions(parent=self),
        )

    def _scaled_object(
        self, name: str, cfg: StackConfig, args: LlmAutoscalerArgs, metadata: dict
    ) -> None:
        scaling = cfg.autoscaling
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
        # The query names the namespace the pods run in (an Output, in case it differs
        # from the configured name); everything else is the policy's.
        spec = pulumi.Output.all(args["namespace"], args["deployment_name"]).apply(
            lambda a: ScalingPolicy.for_stack(cfg.model_copy(update={"namespace": a[0]}))
            .scaled_object_spec(a[1]))
        k8s.apiextensions.CustomResource(
            f"{name}-scaledobject",
            api_version="keda.sh/v1alpha1",
            kind="ScaledObject",
            metadata=metadata,
            spec=spec,
            # The ScaledObject CRD arrives with the KEDA chart.
            opts=pulumi.ResourceOptions(parent=self, depends_on=depends),
        )
