"""LlmStack: the whole serving stack for one Pulumi stack's configuration."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.config.pulumi_source import Secrets
from components.config.rules import stack_warnings
from components.config.stack import StackConfig
from components.policies.balancing import ingress_annotations
from components.policies.monitoring import controller_metrics_values
from components.policies.pod_security import pod_security_labels
from components.policies.tls import tls_secret_name
from components.resources.alert_rules import LlmAlertRules
from components.resources.api_key import ApiKey
from components.resources.autoscaling import LlmAutoscaler
from components.resources.dashboard import LlmDashboard
from components.resources.deployment import HF_TOKEN_SECRET_KEY, LlmDeployment
from components.resources.image import HF_TOKEN_BUILD_SECRET, LlmImage, LlmImageArgs
from components.resources.kube_state_metrics import KubeStateMetrics
from components.resources.ingress import NginxIngress, controller_pod_labels
from components.resources.monitoring import LlmServiceMonitor
from components.resources.pod_policies import PodPolicies
from components.resources.service import LlmService
from components.resources.tls import CertManager


class LlmStackArgs(TypedDict):
    config: StackConfig
    secrets: Secrets


class LlmStack(pulumi.ComponentResource):
    endpoint: pulumi.Output[str]
    api_key: pulumi.Output[str]
    image: pulumi.Output[str]
    namespace: pulumi.Output[str]

    def __init__(
        self, name: str, args: LlmStackArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("llm-serving:index:LlmStack", name, None, opts)
        cfg, secrets = args["config"], args["secrets"]
        for warning in stack_warnings(cfg):
            pulumi.log.warn(warning, resource=self)
        child = pulumi.ResourceOptions(parent=self)
        labels = {
            **cfg.labels,
            "app.kubernetes.io/part-of": "llm-serving",
            "app.kubernetes.io/managed-by": "pulumi",
        }

        namespace = k8s.core.v1.Namespace(
            f"{name}-ns",
            metadata={
                "name": cfg.namespace,
                # The pods already meet the restricted profile; enforce it so a
                # later change that weakens them is refused by the cluster.
                "labels": {**labels, **pod_security_labels("restricted")},
            },
            opts=child,
        )
        ns_name = namespace.metadata.name

        api_key = ApiKey(
            f"{name}-api-key",
            {"namespace": ns_name, "value": secrets.api_key, "labels": labels},
            opts=child,
        )
        hf_secret_name = None
        if secrets.hf_token is not None:
            hf_secret = k8s.core.v1.Secret(
                f"{name}-hf-token",
                metadata={"namespace": ns_name, "labels": labels},
                type="Opaque",
                string_data={HF_TOKEN_SECRET_KEY: secrets.hf_token},
                opts=child,
            )
            hf_secret_name = hf_secret.metadata.name

        image = LlmImage(f"{name}-image", _image_args(cfg, secrets), opts=child)

        deployment = LlmDeployment(
            f"{name}-model",
            {
                "config": cfg,
                "namespace": ns_name,
                "image": image.ref,
                "image_content_id": image.content_id,
                "api_key_secret": api_key.secret_name,
                "hf_token_secret": hf_secret_name,
                "labels": labels,
            },
            opts=child,
        )
        service = LlmService(
            f"{name}-api",
            {
                "namespace": ns_name,
                "selector": deployment.selector,
                "port": cfg.service.port,
                "type": cfg.service_type,
                "annotations": cfg.service.annotations,
                "source_ranges": cfg.service.source_ranges,
                # Selector labels too, so a ServiceMonitor can find this Service.
                "labels": {**labels, **deployment.selector},
            },
            opts=child,
        )

        self.endpoint = service.endpoint
        ingress = None
        if cfg.ingress.enabled:
            tls_secret, issuer_ready = cfg.ingress.tls_secret, []
            cert_manager_on = cfg.ingress.cert_manager.enabled
            if cert_manager_on:
                assert cfg.ingress.host is not None  # config cross-check guarantees it
                cert_manager = CertManager(
                    f"{name}-cert-manager",
                    {"config": cfg.ingress.cert_manager, "class_name": cfg.ingress.class_name,
                     "namespace": ns_name, "host": cfg.ingress.host, "labels": labels},
                    opts=child,
                )
                tls_secret = tls_secret_name(cfg.ingress.class_name)
                issuer_ready = cert_manager.ready
            ingress = NginxIngress(
                f"{name}-ingress",
                {
                    "namespace": ns_name,
                    "service_name": service.service_name,
                    "service_port": cfg.service.port,
                    "class_name": cfg.ingress.class_name,
                    "controller": cfg.ingress.controller,
                    "annotations": ingress_annotations(
                        cfg.load_balancing, cfg.model.max_output_tokens,
                        replica_slots=cfg.model.max_concurrency,
                        controller_replicas=cfg.ingress.controller.replicas,
                    ),
                    "host": cfg.ingress.host,
                    "path": cfg.ingress.path,
                    "tls_secret": tls_secret,
                    # The HTTP-01 solver's Ingress joins the host as a minion.
                    "mergeable": cert_manager_on,
                    "depends_on": issuer_ready,
                    "labels": labels,
                    "extra_values": controller_metrics_values(cfg.monitoring),
                },
                opts=child,
            )
            self.endpoint = ingress.endpoint

        if cfg.autoscaling.enabled:
            LlmAutoscaler(
                f"{name}-autoscaler",
                {
                    "config": cfg,
                    "namespace": ns_name,
                    "deployment_name": deployment.deployment_name,
                    "labels": labels,
                },
                opts=child,
            )

        if cfg.disruption_budget.enabled or cfg.network_policy_on:
            PodPolicies(
                f"{name}-policies",
                {
                    "config": cfg,
                    "namespace": ns_name,
                    "selector": deployment.selector,
                    "port": deployment.port,
                    "ingress_namespace": ingress.controller_namespace if ingress else None,
                    "ingress_pod_labels": (
                        controller_pod_labels(ingress.release_name)
                        if ingress and cfg.ingress.controller.install
                        else None
                    ),
                    "labels": labels,
                },
                opts=child,
            )

        if cfg.monitoring.service_monitor:
            LlmServiceMonitor(
                f"{name}-monitor",
                {
                    "namespace": ns_name,
                    "service_labels": deployment.selector,
                    "metrics_path": cfg.profile.metrics_path,
                    "interval_seconds": cfg.monitoring.interval_seconds,
                    "labels": {**labels, **cfg.monitoring.labels},
                },
                opts=child,
            )

        monitoring = cfg.monitoring
        if monitoring.kube_state_metrics == "install":
            # After the model namespace: the chart puts its Role there.
            KubeStateMetrics(
                f"{name}-kube-state-metrics", {"config": cfg, "labels": labels},
                opts=pulumi.ResourceOptions(parent=self, depends_on=[namespace]),
            )
        if monitoring.rules:
            LlmAlertRules(
                f"{name}-alerts",
                {"config": cfg, "namespace": ns_name, "labels": {**labels, **monitoring.labels}},
                opts=child,
            )
        if monitoring.dashboard:
            dashboard_ns = (
                monitoring.dashboard_namespace
                if monitoring.dashboard_namespace is not None
                else ns_name
            )
            LlmDashboard(
                f"{name}-dashboard",
                {"config": cfg, "namespace": dashboard_ns, "labels": labels},
                opts=child,
            )

        self.api_key = api_key.value
        self.image = image.ref
        self.namespace = ns_name
        self.register_outputs({
            "endpoint": self.endpoint,
            "api_key": self.api_key,
            "image": self.image,
            "namespace": self.namespace,
        })


def _image_args(cfg: StackConfig, secrets: Secrets) -> LlmImageArgs:
    image, profile = cfg.image, cfg.profile
    if not image.build:
        reference = image.reference if image.reference is not None else profile.prebuilt_image
        assert reference is not None  # config cross-check guarantees it
        return {"build": False, "reference": reference}
    # Relative to the project directory (Pulumi's working directory), so the
    # state does not depend on where each operator keeps their checkout.
    context = PurePosixPath(image.context)
    dockerfile = image.dockerfile if image.dockerfile is not None else profile.dockerfile
    build_args: dict[str, str] = {}
    # The engine profile pins the vLLM base; its Dockerfile's default is for manual builds.
    base_image = image.base_image if image.base_image is not None else profile.prebuilt_image
    if base_image is not None:
        build_args["BASE_IMAGE"] = base_image
    build_secrets: dict[str, pulumi.Input[str]] = {}
    if cfg.model_cache.type == "baked":
        build_args["MODEL_ID"] = cfg.model.id
        build_args["MODEL_REVISION"] = cfg.model.revision
        if secrets.hf_token is not None:
            # A gated model: the download step reads the token from a BuildKit secret.
            build_secrets[HF_TOKEN_BUILD_SECRET] = secrets.hf_token
    return {
        "build": True,
        "image_name": image.name,
        "context": str(context),
        "dockerfile": str(context / dockerfile),
        "platform": image.platform,
        "push": image.push,
        "build_args": build_args,
        "build_secrets": build_secrets,
    }
