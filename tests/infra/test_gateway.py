"""The Gateway path under mocks: NGINX Gateway Fabric, the Gateway, the model router, and per
model a Deployment, Service, autoscaler, endpoint picker (InferencePool) and HTTPRoute."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from components.config.exposure import GATEWAY_NAME
from components.config.parse import ConfigError, parse_stack_config
from components.config.rules import stack_warnings
from components.pins import EPP_CHART, MODEL_ROUTER_IMAGE, NGF_CHART
from components.policies.model_routing import MODEL_HEADER, ROUTER_NOT_FOUND_PORT
from components.resources.gateway import data_plane_service, nginx_size
from tests.infra.conftest import GPU_CONFIG
from tests.infra.test_traffic_and_scaling import (
    DEPLOYMENT,
    NETPOL,
    RELEASE,
    SCALED_OBJECT,
    SERVICE,
    spec,
    stack,
)
from tools.offline import FAKE_LB_IP, _normalise

GATEWAY = "kubernetes:gateway.networking.k8s.io/v1:Gateway"
ROUTE = "kubernetes:gateway.networking.k8s.io/v1:HTTPRoute"
PROXY_SETTINGS = "kubernetes:gateway.nginx.org/v1alpha1:ProxySettingsPolicy"
CONFIG_FILE = "kubernetes:yaml/v2:ConfigFile"
NAMESPACE = "kubernetes:core/v1:Namespace"

GATEWAY_STACK: dict[str, Any] = {
    **{k: v for k, v in GPU_CONFIG.items() if k != "model"},
    "namespace": "llm-gw",
    "models": [
        {"id": "Qwen/Qwen2.5-7B-Instruct", "servedName": "qwen2.5-7b", "loadTimeoutSeconds": 1800},
        {"id": "Qwen/Qwen2.5-Coder-14B-Instruct", "servedName": "qwen2.5-coder-14b",
         "loadTimeoutSeconds": 1800, "maxOutputTokens": 2048, "gpu": {"count": 4},
         "autoscaling": {"maxReplicas": 3}},
    ],
    "gateway": {"enabled": True},
    "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 5, "installKeda": True,
                    "prometheusUrl": "http://prometheus:9090"},
}


def _named(result, typ: str) -> dict[str, Any]:
    return {r.name: r for r in result.mocks.of_type(typ) if not r.read}


def test_two_models_get_their_own_pods_services_autoscalers_and_pools(run):
    result = stack(run, GATEWAY_STACK)
    deployments = _named(result, DEPLOYMENT)
    assert set(deployments) == {"llm-model-deploy", "llm-model-qwen2-5-coder-14b-deploy",
                                "llm-gateway-router"}
    services = _named(result, SERVICE)
    assert {"llm-api-svc", "llm-api-qwen2-5-coder-14b-svc"} <= set(services)
    # The router is the entry point; the model Services stay inside the cluster.
    assert spec(services["llm-api-svc"])["type"] == "ClusterIP"
    assert spec(services["llm-gateway-router-svc"])["type"] == "LoadBalancer"
    scaled = {n: _normalise(r.inputs)["spec"] for n, r in _named(result, SCALED_OBJECT).items()}
    assert {n: s["maxReplicaCount"] for n, s in scaled.items()} == {
        "llm-autoscaler-scaledobject": 5, "llm-autoscaler-qwen2-5-coder-14b-scaledobject": 3}
    # KEDA is installed once, not once per model.
    releases = _named(result, RELEASE)
    assert [n for n in releases if n.endswith("-keda")] == ["llm-autoscaler-keda"]
    pickers = {r.inputs["name"]: _normalise(r.inputs) for r in releases.values()
               if r.inputs["chart"] == EPP_CHART}
    assert set(pickers) == {"llm-qwen2-5-7b", "llm-qwen2-5-coder-14b"}
    # Each pool selects its own model's pods.
    for deployment, pool in (("llm-model-deploy", "llm-qwen2-5-7b"),
                             ("llm-model-qwen2-5-coder-14b-deploy", "llm-qwen2-5-coder-14b")):
        labels = spec(deployments[deployment])["selector"]["matchLabels"]
        assert pickers[pool]["values"]["inferencePool"]["modelServers"]["matchLabels"] == labels
        assert pickers[pool]["values"]["inferencePool"]["targetPorts"] == [{"number": 8000}]


def test_each_model_has_a_route_on_its_name_to_its_pool(run):
    result = stack(run, GATEWAY_STACK)
    routes = {n: spec(r) for n, r in _named(result, ROUTE).items()}
    by_model = {}
    for route in routes.values():
        [rule] = route["rules"]
        assert route["parentRefs"] == [{"name": GATEWAY_NAME}]
        headers = rule["matches"][0].get("headers")
        if headers:
            [header] = headers
            assert header["name"] == MODEL_HEADER and header["type"] == "Exact"
            by_model[header["value"]] = rule["backendRefs"]
    assert by_model == {
        "qwen2.5-7b": [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                        "name": "llm-qwen2-5-7b"}],
        "qwen2.5-coder-14b": [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                               "name": "llm-qwen2-5-coder-14b"}],
    }
    # Everything else goes to the router's OpenAI-style 404.
    fallback = routes["llm-gateway-fallback-route"]["rules"][0]
    assert fallback["backendRefs"][0]["port"] == ROUTER_NOT_FOUND_PORT
    assert "headers" not in fallback["matches"][0]
    # Each route is unbuffered, with its own model's read timeout (2048 tokens x 0.1 s).
    policies = {n: spec(p) for n, p in _named(result, PROXY_SETTINGS).items()}
    assert {p["buffering"]["disable"] for p in policies.values()} == {True}
    coder = policies["llm-pool-qwen2-5-coder-14b-proxy-settings"]
    assert coder["timeout"]["read"] == "205s"
    route_name = _named(result, ROUTE)["llm-pool-qwen2-5-coder-14b-route"].outputs["metadata"]["name"]
    assert coder["targetRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                                    "name": route_name}]


def test_the_controller_crds_gateway_and_router_are_installed(run):
    result = stack(run, GATEWAY_STACK)
    [controller] = [r for r in _named(result, RELEASE).values() if r.inputs["chart"] == NGF_CHART]
    values = controller.inputs["values"]
    assert values["nginxGateway"]["gwAPIInferenceExtension"]["enable"] is True
    assert values["nginxGateway"]["gatewayClassName"] == "llm-nginx"
    assert values["nginx"]["service"]["type"] == "ClusterIP"
    assert {r.name for r in result.mocks.of_type(CONFIG_FILE)} == {
        "llm-gateway-gateway-api-crds", "llm-gateway-inference-crds"}
    [gateway] = _named(result, GATEWAY).values()
    assert gateway.inputs["metadata"]["name"] == GATEWAY_NAME
    assert spec(gateway)["gatewayClassName"] == "llm-nginx"
    router = spec(_named(result, DEPLOYMENT)["llm-gateway-router"])
    [container] = router["template"]["spec"]["containers"]
    assert container["image"] == MODEL_ROUTER_IMAGE
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    config = next(iter(_named(result, "kubernetes:core/v1:ConfigMap").values()))
    conf = config.inputs["data"]["nginx.conf"]
    assert f"server {data_plane_service(parse_stack_config(GATEWAY_STACK))}.llm-gw.svc" in conf
    assert '"id":"qwen2.5-coder-14b"' in conf  # GET /v1/models lists both models
    assert result.values["endpoint"] == f"http://{FAKE_LB_IP}/v1"


def test_every_model_is_reached_at_the_one_endpoint(run):
    from components.config.pulumi_source import Secrets
    from components.resources.stack import LlmStack

    cfg = parse_stack_config({**GATEWAY_STACK, "gateway": {
        "enabled": True, "host": "llm.example.com", "tlsSecret": "llm-tls"}})

    def build():
        return dict(LlmStack("llm", {"config": cfg, "secrets": Secrets()}).endpoints)

    assert run(build).values == {"qwen2.5-7b": "https://llm.example.com/v1",
                                 "qwen2.5-coder-14b": "https://llm.example.com/v1"}


def test_the_namespace_admits_the_endpoint_pickers_and_warns_on_them(run):
    result = stack(run, GATEWAY_STACK)
    [namespace] = [r for r in _named(result, NAMESPACE).values()
                   if r.inputs["metadata"]["name"] == "llm-gw"]
    labels = namespace.inputs["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "baseline"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"
    # The data plane and the pickers run beside the model pods: the policy admits the namespace.
    for netpol in _named(result, NETPOL).values():
        sources = [peer for rule in spec(netpol)["ingress"] for peer in rule.get("from", [])]
        assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "llm-gw"}}} \
            in sources


def test_gateway_and_ingress_together_are_refused():
    with pytest.raises(ConfigError) as caught:
        parse_stack_config({**GATEWAY_STACK, "ingress": {"enabled": True}})
    assert caught.value.problems == [
        "llm-serving:gateway.enabled: set either gateway.enabled or ingress.enabled, not both "
        "(each is the stack's entry point)"]


def test_the_gateway_needs_vllm():
    raw = copy.deepcopy(GATEWAY_STACK)
    raw["engine"] = "server"
    raw["gpu"] = {"count": 0}
    raw["models"][1].pop("gpu")
    with pytest.raises(ConfigError) as caught:
        parse_stack_config(raw)
    assert any(p.startswith("llm-serving:gateway.enabled: the endpoint picker reads vLLM's")
               for p in caught.value.problems)


def test_a_served_name_the_router_cannot_carry_is_refused():
    raw = copy.deepcopy(GATEWAY_STACK)
    raw["models"][1]["servedName"] = "coder 14b"
    raw["models"][1]["name"] = "coder"
    with pytest.raises(ConfigError) as caught:
        parse_stack_config(raw)
    [problem] = caught.value.problems
    assert problem.startswith("llm-serving:models[1].servedName: 'coder 14b' cannot be routed")


def test_a_long_gateway_class_is_refused_naming_the_service_limit():
    with pytest.raises(ConfigError) as caught:
        parse_stack_config({**GATEWAY_STACK, "gateway": {"enabled": True, "className": "a" * 60}})
    [problem] = caught.value.problems
    assert problem.startswith("llm-serving:gateway.className: must be at most 53 characters")


def test_the_gateway_warns_about_what_does_not_apply_and_missing_tls():
    cfg = parse_stack_config({**GATEWAY_STACK, "loadBalancing": {"method": "session_hash"}})
    warnings = stack_warnings(cfg)
    assert any(w.startswith("llm-serving:loadBalancing.method: does not apply") for w in warnings)
    assert any(w.startswith("llm-serving:gateway: no TLS") for w in warnings)
    # No body-routing warning here: the Gateway path routes by the model field.
    assert not any("cannot read the request body" in w for w in warnings)


@pytest.mark.parametrize("size, spelt", [("1m", "1m"), ("8M", "8m"), ("512k", "512k"),
                                          ("1048576", "1m"), ("1000", "1k"), ("4096m", "4g")])
def test_body_sizes_are_spelt_as_the_controller_s_policies_accept(size, spelt):
    assert nginx_size(size) == spelt


def test_prod_gateway_stack_file_is_a_two_model_gateway_stack():
    from tools import offline

    doc = yaml.safe_load((offline.PROJECT_DIR / "Pulumi.prod-gateway.yaml").read_text())
    cfg = parse_stack_config(offline.namespace_values(
        {k: v if isinstance(v, str) else __import__("json").dumps(v)
         for k, v in doc["config"].items()}))
    assert cfg.gateway.enabled and cfg.engine == "vllm" and cfg.model_count == 2
    assert [v.gpu.count for v in cfg.model_views()] == [1, 2]
