"""LlmStack: the whole serving stack for one Pulumi stack's configuration."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import TypedDict

import pulumi
import pulumi_kubernetes as k8s

from components.config.pulumi_source import Secrets
from components.config.rules import stack_warnings
from components.config.stack import StackConfig
from components.engines import MODEL_LABEL
from components.policies.balancing import ingress_annotations
from components.policies.monitoring import controller_metrics_values
from components.policies.pod_security import pod_security_labels
from components.policies.tls import tls_secret_name
from components.resources.alert_rules import LlmAlertRules
from components.resources.api_key import ApiKey
from components.resources.autoscaling import LlmAutoscaler
from components.resources.dashboard import LlmDashboard
from components.resources.deployment import HF_TOKEN_SECRET_KEY, LlmDeployment
from components.resources.gateway import InferenceGateway, InferencePoolRoute
from components.resources.image import HF_TOKEN_BUILD_SECRET, LlmImage, LlmImageArgs
from components.resources.ingress import IngressRoute, NginxIngress, controller_pod_labels
from components.resources.kube_state_metrics import KubeStateMetrics
from components.resources.monitoring import LlmServiceMonitor
from components.resources.pod_policies import PodPolicies
from components.resources.service import LlmService
from components.resources.tls import CertManager


class LlmStackArgs(TypedDict):
    config: StackConfig
    secrets: Secrets


class LlmStack(pulumi.ComponentResource):
    endpoint: pulumi.Output[str]
    """Base URL of the API (the first model's, on the Ingress path)."""
    endpoints: dict[str, pulumi.Output[str]]
    """Base URL of each model, by served name."""
    api_key: pulumi.Output[str]
    image: pulumi.Output[str]
    namespace: pulumi.Output[str]
    _first_autoscaler: LlmAutoscaler
    """The first model's autoscaler: it installs KEDA (once) when asked to."""

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
                # later change that weakens them is refused by the cluster. The endpoint
                # pickers' chart sets no security context (they meet baseline only), so a
                # Gateway stack enforces baseline and still warns and audits restricted.
                "labels": {**labels, **pod_security_labels(
                    "restricted", enforce="baseline" if cfg.gateway.enabled else None)},
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

        # One Deployment and Service per model. The first model's objects keep the names a
        # single-model stack has always had, so adding a model replaces nothing.
        models = []
        for view in cfg.model_views():
            deployment = LlmDeployment(
                _per_model(f"{name}-model", view),
                {
                    "config": view,
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
                _per_model(f"{name}-api", view),
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
            models.append((view, deployment, service))

        self.endpoint = models[0][2].endpoint
        self.endpoints = {view.model.served: service.endpoint for view, _, service in models}
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
            routes: list[IngressRoute] = [
                {
                    "path": cfg.ingress_path(view.model_index),
                    "service_name": service.service_name,
                    "service_port": cfg.service.port,
                    # Other models' prefixes (/coder/v1) reach their pods as /v1.
                    "rewrite": None if view.model_index == 0 else "/v1",
                }
                for view, _, service in models
            ]
            ingress = NginxIngress(
                f"{name}-ingress",
                {
                    "namespace": ns_name,
                    "routes": routes,
                    "class_name": cfg.ingress.class_name,
                    "controller": cfg.ingress.controller,
                    "annotations": ingress_annotations(
                        cfg.load_balancing,
                        # One Ingress, one set of annotations: the longest budget of any model
                        # (stack_warnings names what else is shared).
                        max(m.max_output_tokens for m in cfg.models),
                        replica_slots=_largest_slots(cfg),
                        controller_replicas=cfg.ingress.controller.replicas,
                    ),
                    "host": cfg.ingress.host,
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
            self.endpoints = {
                view.model.served: pulumi.Output.concat(
                    ingress.base_url,
                    "/v1" if view.model_index == 0 else cfg.ingress_path(view.model_index))
                for view, _, _ in models
            }

        if cfg.gateway.enabled:
            gateway = InferenceGateway(
                f"{name}-gateway", {"config": cfg, "namespace": ns_name, "labels": labels},
                opts=child)
            for view, deployment, _ in models:
                InferencePoolRoute(
                    _per_model(f"{name}-pool", view),
                    {"config": view, "namespace": ns_name, "selector": deployment.selector,
                     "depends_on": gateway.ready, "pool_crds": gateway.pool_crds,
                     "labels": labels},
                    opts=child,
                )
            # One base URL: the router reads each request's model.
            self.endpoint = gateway.endpoint
            self.endpoints = {view.model.served: gateway.endpoint for view, _, _ in models}

        for view, deployment, _ in models:
            self._per_model_policies(name, view, deployment, ns_name, ingress, labels, child)

        monitoring = cfg.monitoring
        if monitoring.kube_state_metrics == "install":
            # After the model namespace: the chart puts its Role there.
            KubeStateMetrics(
                f"{name}-kube-state-metrics", {"config": cfg, "labels": labels},
                opts=pulumi.ResourceOptions(parent=self, depends_on=[namespace]),
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
            "endpoints": self.endpoints,
            "api_key": self.api_key,
            "image": self.image,
            "namespace": self.namespace,
        })

    def _per_model_policies(
        self, name: str, view: StackConfig, deployment: LlmDeployment,
        ns_name: pulumi.Output[str], ingress: NginxIngress | None, labels: dict[str, str],
        child: pulumi.ResourceOptions,
    ) -> None:
        """One model's autoscaler, disruption budget and network policy, ServiceMonitor and
        alert rules."""
        if view.autoscaling.enabled:
            scaling_opts = child
            if view.model_index > 0 and view.autoscaling.install_keda:
                # KEDA is installed once, with the first model's autoscaler; the others wait
                # for it (their ScaledObjects need its CRD).
                view = view.model_copy(update={
                    "autoscaling": view.autoscaling.model_copy(update={"install_keda": False})})
                scaling_opts = pulumi.ResourceOptions(parent=self,
                                                      depends_on=[self._first_autoscaler])
            autoscaler = LlmAutoscaler(
                _per_model(f"{name}-autoscaler", view),
                {
                    "config": view,
                    "namespace": ns_name,
                    "deployment_name": deployment.deployment_name,
                    "labels": labels,
                },
                opts=scaling_opts,
            )
            if view.model_index == 0:
                self._first_autoscaler = autoscaler

        if view.disruption_budget.enabled or view.network_policy_on:
            PodPolicies(
                _per_model(f"{name}-policies", view),
                {
                    "config": view,
                    "namespace": ns_name,
                    "selector": deployment.selector,
                    "port": deployment.port,
                    # Gateway path: the data plane and the endpoint pickers run beside the pods.
                    "ingress_namespace": (ingress.controller_namespace if ingress else
                                          view.namespace if view.gateway.enabled else None),
                    "ingress_pod_labels": (
                        controller_pod_labels(ingress.release_name)
                        if ingress and view.ingress.controller.install
                        else None
                    ),
                    "labels": labels,
                },
                opts=child,
            )

        monitoring = view.monitoring
        if monitoring.service_monitor:
            target_labels = {}
            if view.scoped_by_model and not view.profile.labels_model:
                # The engine does not name the model on its series; the monitor does.
                target_labels[MODEL_LABEL] = view.model.served
            LlmServiceMonitor(
                _per_model(f"{name}-monitor", view),
                {
                    "namespace": ns_name,
                    "service_labels": deployment.selector,
                    "metrics_path": view.profile.metrics_path,
                    "interval_seconds": monitoring.interval_seconds,
                    "labels": {**labels, **monitoring.labels},
                    "target_labels": target_labels,
                },
                opts=child,
            )

        if monitoring.rules:
            LlmAlertRules(
                _per_model(f"{name}-alerts", view),
                {"config": view, "namespace": ns_name,
                 "deployment_name": deployment.deployment_name,
                 "labels": {**labels, **monitoring.labels}},
                opts=child,
            )


def _per_model(base: str, view: StackConfig) -> str:
    """The name of one model's component: the first model's is the stack's own (as before there
    were several), the others' end in their Kubernetes name."""
    return base if view.model_index == 0 else f"{base}-{view.kube_name}"


def _largest_slots(cfg: StackConfig) -> int | None:
    """maxConcurrency for the Ingress's max-conns: the largest of the models' (all are set when
    the method needs it, config rules)."""
    slots = [m.max_concurrency for m in cfg.models if m.max_concurrency is not None]
    return max(slots) if slots else None


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
