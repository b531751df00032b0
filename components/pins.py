"""Every upstream version the stacks deploy, in one place.

Each pin has a facts file beside the tests (`tests/contracts/data/<component>-<version>.json`):
what that exact version accepts (annotations, chart values, flags, metrics), read from its
source at the tag. The contract tests fail when a pin moves without its facts, or when the code
emits something the pinned version does not accept. Bump a pin and its facts together.
"""

from __future__ import annotations

NIC_CHART = "oci://ghcr.io/nginx/charts/nginx-ingress"
"""F5 NGINX Ingress Controller Helm chart (nginx/kubernetes-ingress, charts/nginx-ingress)."""
NIC_CHART_VERSION = "2.6.4"
"""Chart version; its appVersion is NIC_CONTROLLER_VERSION."""
NIC_CONTROLLER_VERSION = "5.5.4"
"""The controller the chart installs. 5.5 is the first that accepts hostless Ingresses
(controller.allowEmptyIngressHost) and 5.4 the first that reads nginx.org/proxy-next-upstream*."""

KEDA_CHART = "keda"
KEDA_REPOSITORY = "https://kedacore.github.io/charts"
KEDA_CHART_VERSION = "2.19.0"
"""kedacore/keda chart; installs KEDA of the same version."""
KEDA_VERSION = "2.19.0"

VLLM_VERSION = "0.33.0"
VLLM_IMAGE = f"vllm/vllm-openai:v{VLLM_VERSION}"
"""Official vLLM image; a new tag changes the engine's flags, metrics and routes."""

PULUMI_DOCKER_BUILD_VERSION = "0.0.22"
"""pulumi-docker-build (requirements.txt pins the same): builds that need BuildKit secrets."""

PINNED: dict[str, str] = {
    "nginx-ingress-controller": NIC_CONTROLLER_VERSION,
    "keda": KEDA_VERSION,
    "vllm": VLLM_VERSION,
    "pulumi-docker-build": PULUMI_DOCKER_BUILD_VERSION,
}
"""component -> version: each must have a facts file under tests/contracts/data/."""

CERT_MANAGER_CHART = "cert-manager"
CERT_MANAGER_REPOSITORY = "https://charts.jetstack.io"
CERT_MANAGER_VERSION = "v1.21.1"
"""cert-manager/cert-manager: its chart is published with the release tag as version."""

PINNED["cert-manager"] = CERT_MANAGER_VERSION

POD_SECURITY_ADMISSION_VERSION = "0.33.0"
"""k8s.io/pod-security-admission of Kubernetes 1.33: the Pod Security Standards version the
namespace labels pin (components/pod_security.py)."""

PINNED["pod-security-admission"] = POD_SECURITY_ADMISSION_VERSION

NGF_CHART = "oci://ghcr.io/nginx/charts/nginx-gateway-fabric"
"""NGINX Gateway Fabric Helm chart (nginx/nginx-gateway-fabric, charts/nginx-gateway-fabric)."""
NGF_VERSION = "2.6.7"
"""Chart version and the controller it installs (appVersion); built against GATEWAY_API_VERSION and
INFERENCE_EXTENSION_VERSION. Its inference extension: nginxGateway.gwAPIInferenceExtension.enable."""
GATEWAY_API_VERSION = "1.5.1"
GATEWAY_API_CRDS = ("https://github.com/kubernetes-sigs/gateway-api/releases/download/"
                    f"v{GATEWAY_API_VERSION}/standard-install.yaml")
"""Standard-channel Gateway API CRDs; NGF's chart does not install them."""
INFERENCE_EXTENSION_VERSION = "1.5.0"
INFERENCE_EXTENSION_CRDS = ("https://github.com/kubernetes-sigs/gateway-api-inference-extension/releases/download/"
                            f"v{INFERENCE_EXTENSION_VERSION}/manifests.yaml")
"""Gateway API Inference Extension CRDs (InferencePool inference.networking.k8s.io/v1 and the x-k8s.io kinds)."""
EPP_CHART = "oci://registry.k8s.io/gateway-api-inference-extension/charts/inferencepool"
EPP_CHART_VERSION = f"v{INFERENCE_EXTENSION_VERSION}"
"""One release per model: an InferencePool and its endpoint picker; published with the release tag as version."""

PINNED["nginx-gateway-fabric"] = NGF_VERSION
PINNED["gateway-api"] = GATEWAY_API_VERSION
PINNED["gateway-api-inference-extension"] = INFERENCE_EXTENSION_VERSION

MODEL_ROUTER_NGINX_VERSION = "1.29.8"
MODEL_ROUTER_IMAGE = f"docker.io/nginxinc/nginx-unprivileged:{MODEL_ROUTER_NGINX_VERSION}-alpine-slim"
"""The Gateway path's model router (components/policies/model_routing.py, router_conf): nginx.org's nginx built
to run unprivileged (uid 101, port 8080), from nginx/docker-nginx-unprivileged at the same tag;
the tag moves with weekly rebuilds, so pin the digest in production."""

PINNED["nginx-unprivileged"] = MODEL_ROUTER_NGINX_VERSION

KUBE_STATE_METRICS_VERSION = "2.20.0"
"""kube-state-metrics: the cluster replica alerts read its kube_deployment_* series
(components/policies/alerting.py). Installed by the stack with `monitoring.kubeStateMetrics:
install`; otherwise expected from the cluster (kube-prometheus-stack 88.5.3 ships this one)."""
KUBE_STATE_METRICS_CHART = "kube-state-metrics"
KUBE_STATE_METRICS_REPOSITORY = "https://prometheus-community.github.io/helm-charts"
KUBE_STATE_METRICS_CHART_VERSION = "8.4.0"
"""prometheus-community/kube-state-metrics chart; its appVersion is KUBE_STATE_METRICS_VERSION."""

PINNED["kube-state-metrics"] = KUBE_STATE_METRICS_VERSION
