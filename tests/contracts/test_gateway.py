"""The Gateway path's pins and their facts: NGINX Gateway Fabric, the Gateway API CRDs and the
Gateway API Inference Extension (InferencePool CRD, endpoint-picker chart and flags), read at their
tags. The facts agree with each other and with the pinned vLLM, and the checks the components will
call (tests/contracts/gateway_facts.py) catch wrong keys, values and fields."""

from __future__ import annotations

import copy
import json
import re

import pytest

from components.engines import PROFILES
from components.pins import (
    EPP_CHART,
    EPP_CHART_VERSION,
    GATEWAY_API_CRDS,
    GATEWAY_API_VERSION,
    INFERENCE_EXTENSION_CRDS,
    INFERENCE_EXTENSION_VERSION,
    NGF_CHART,
    NGF_VERSION,
    PINNED,
)
from tests.contracts import facts
from tests.contracts import gateway_facts as gw

NGF, GIE, GWAPI = gw.NGF, gw.GIE, gw.GWAPI
COMPONENTS = {"nginx-gateway-fabric": ("crds", "values_schema"),
              "gateway-api": ("crds",),
              "gateway-api-inference-extension": ("crds",)}
POOL_API = "inference.networking.k8s.io/v1"


# --- pins and facts move together -----------------------------------------------------------


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_every_gateway_pin_has_its_facts_and_topic_files(component):
    data = facts.pinned(component)
    assert (data["component"], data["version"]) == (component, PINNED[component])
    for topic in COMPONENTS[component]:
        extra = gw.supplement(component, topic)
        assert (extra["component"], extra["version"], extra["tag"]) == (component, data["version"], data["tag"])


def test_pins_agree_with_the_facts():
    assert (NGF["chart"]["reference"], NGF["chart"]["version"]) == (NGF_CHART, NGF_VERSION)
    assert NGF["chart"]["appVersion"] == NGF_VERSION
    assert (GIE["eppChart"]["reference"], GIE["eppChart"]["version"]) == (EPP_CHART, EPP_CHART_VERSION)
    assert GWAPI["installManifest"]["url"] == GATEWAY_API_CRDS
    assert GIE["installManifest"]["url"] == INFERENCE_EXTENSION_CRDS


def test_ngf_is_pinned_with_the_gateway_api_and_inference_extension_it_was_built_against():
    compatibility = NGF["compatibility"]
    assert compatibility["gatewayApi"] == GATEWAY_API_VERSION
    assert compatibility["gatewayApiInferenceExtension"] == INFERENCE_EXTENSION_VERSION


# --- the facts agree with each other --------------------------------------------------------


def test_the_inference_pool_api_is_the_one_ngf_watches_and_the_routes_point_at():
    crd = GIE["crds"]["InferencePool"]
    [storage] = [v["name"] for v in crd["versions"] if v["storage"]]
    assert f"{crd['group']}/{storage}" == GIE["inferencePool"]["apiVersion"] == POOL_API
    assert NGF["compatibility"]["inferencePoolApiVersion"] == POOL_API
    ref = GWAPI["httpRoute"]["backendRefToInferencePool"]
    assert (ref["group"], ref["kind"]) == (crd["group"], "InferencePool")
    assert NGF["httpRoute"]["inferencePoolBackendRef"]["group"] == crd["group"]
    assert crd["bundleVersion"] == f"v{INFERENCE_EXTENSION_VERSION}"


def _node(schema: dict, field: str) -> dict:
    """The schema of a field path such as spec.targetPorts[].number."""
    node = schema
    for part in field.split("."):
        node = node["properties"][part.removesuffix("[]")]
        if part.endswith("[]"):
            node = node["items"]
    return node


def test_the_inference_pool_facts_are_its_schema():
    schema = gw.supplement("gateway-api-inference-extension", "crds")["schemas"]["InferencePool"]
    spec = schema["openAPIV3Schema"]["properties"]["spec"]
    assert sorted(spec["required"]) == sorted(GIE["inferencePool"]["specRequired"])
    for field, fact in GIE["inferencePool"]["fields"].items():
        node = _node(schema["openAPIV3Schema"], field)
        for key in ("enum", "default"):
            if key in fact:
                assert node[key] == fact[key], field
    for field in GIE["inferencePool"]["notInV1"]:
        assert field.split(".")[-1] not in spec["properties"]


def test_gateway_api_crd_versions_are_the_bundle_ngf_installs():
    for kind in ("GatewayClass", "Gateway", "HTTPRoute"):
        crd = GWAPI["crds"][kind]
        assert crd["bundleVersion"] == f"v{GATEWAY_API_VERSION}" and crd["channel"] == "standard"
        assert {"name": "v1", "served": True, "storage": True} in crd["versions"]
        saved = gw.supplement("gateway-api", "crds")["schemas"][kind]
        assert saved["apiVersion"] == f"{crd['group']}/v1"


def test_the_epp_default_profile_names_registered_plugins_with_the_documented_weights():
    config = GIE["eppConfig"]["chartDefaultPluginsYaml"]
    types = {p["type"] for p in config["plugins"]}
    assert types <= set(GIE["registeredPluginTypes"])
    [profile] = config["schedulingProfiles"]
    weights = {p["pluginRef"]: p["weight"] for p in profile["plugins"]}
    assert set(weights) <= types
    assert weights == {name: s["weight"] for name, s in GIE["scheduling"]["scorers"].items()}
    assert all(w > 0 for w in weights.values())
    defaults = GIE["eppConfig"]["systemDefaultsAdded"]
    for plugin in ("max-score-picker", "single-profile-handler", "approx-prefix-cache-producer",
                   "utilization-detector", "openai-parser"):
        assert plugin in GIE["registeredPluginTypes"]
        assert plugin in json.dumps(defaults)


def test_flow_control_and_saturation_facts_name_registered_plugins():
    fc = GIE["flowControl"]
    for plugin in ("fcfs-ordering-policy", "global-strict-fairness-policy"):
        assert plugin in fc["ordering"] + fc["fairness"]
        assert plugin in GIE["registeredPluginTypes"]
    for detector in (GIE["admission"]["saturationDetector"], GIE["admission"]["alternativeDetector"]):
        assert detector["type"] in GIE["registeredPluginTypes"]
    assert "flowControl" in GIE["eppConfig"]["featureGates"]


def test_the_flags_the_epp_chart_renders_are_flags_of_the_epp():
    rendered = {m for arg in GIE["eppChart"]["argsRendered"] for m in re.findall(r"--([a-z][\w-]*)", arg)}
    assert rendered <= set(GIE["eppFlags"])
    assert rendered == gw._CHART_RENDERED_FLAGS
    rejected = {n for n, f in GIE["eppFlags"].items() if f.get("rejectedIfSet")}
    assert rejected and all(GIE["eppFlags"][n]["deprecated"] for n in rejected)


def test_ngf_values_of_interest_exist_and_the_ones_we_set_are_valid():
    values = NGF["chartValues"]["values"]
    assert set(NGF["valuesOfInterest"]) <= set(values)
    chosen: dict = {}
    for path, entry in NGF["valuesOfInterest"].items():
        if "set" in entry:
            node = chosen
            *parents, leaf = path.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = entry["set"]
    assert chosen["nginxGateway"]["gwAPIInferenceExtension"]["enable"] is True
    assert gw.values_problems(gw.NGF_CHART, chosen) == []
    assert NGF["gatewayClass"]["defaultName"] == values["nginxGateway.gatewayClassName"]["schemaDefault"]


def test_epp_values_for_the_gateway_path_are_values_the_chart_reads():
    table = GIE["eppChart"]["values"]
    for path in GIE["eppChart"]["valuesForGatewayPath"]:
        assert path in table or any(k.startswith(f"{path}.") for k in table), path
    assert table["inferenceExtension.image.tag"]["default"] == GIE["eppChart"]["version"]
    assert GIE["eppChart"]["requiredValues"] == ["inferencePool.modelServers.matchLabels"]


@pytest.mark.parametrize("kind", sorted(gw.CEL_EVALUATED))
def test_the_cel_rules_evaluated_offline_are_upstreams(kind):
    component = "gateway-api-inference-extension" if kind == "InferencePool" else "gateway-api"
    messages = {r["message"] for r in gw.supplement(component, "crds")["celRules"][kind]}
    assert set(gw.CEL_EVALUATED[kind]) <= messages


@pytest.mark.parametrize("kind, fields", [(k, v) for k, v in gw.FIELDS_USED.items() if v])
def test_the_fields_we_use_exist_in_the_crd_schemas(kind, fields):
    [(api_version, _)] = [key for key in gw._schemas() if key[1] == kind]
    schema = gw.crd_schema(api_version, kind)
    for field in fields:
        assert _node(schema, field), field


# --- the EPP reads what our vLLM exports ----------------------------------------------------


VLLM = facts.pinned("vllm")
VLLM_EXPORTED = json.loads((facts.DATA / f"vllm-{PINNED['vllm']}.metrics.json").read_text())["metrics"]


def test_the_epp_reads_vllm_metrics_our_pinned_vllm_exports():
    read = {spec["metric"] for spec in GIE["modelServerMetrics"]["vllm"].values()}
    conditional = {m["name"]: m["when"] for m in VLLM["metrics"]["conditional"]}
    assert read <= set(VLLM_EXPORTED) | set(conditional), read - set(VLLM_EXPORTED) - set(conditional)
    for name in GIE["vllmCrossCheck"]["alwaysExported"]:
        assert VLLM_EXPORTED[name] == "gauge", name


def test_the_one_metric_our_vllm_does_not_export_is_recorded_as_a_finding():
    """vllm:lora_requests_info exists only with LoRA enabled; the facts say so and what it costs."""
    read = {spec["metric"] for spec in GIE["modelServerMetrics"]["vllm"].values()}
    missing = read - set(VLLM_EXPORTED)
    assert missing == set(GIE["vllmCrossCheck"]["conditional"]) == {"vllm:lora_requests_info"}
    conditional = {m["name"]: m["when"] for m in VLLM["metrics"]["conditional"]}
    assert "LoRA" in conditional["vllm:lora_requests_info"]
    profile = GIE["eppConfig"]["chartDefaultPluginsYaml"]["schedulingProfiles"][0]
    assert "lora-affinity-scorer" not in {p["pluginRef"] for p in profile["plugins"]}


def test_the_epp_and_our_autoscaler_read_the_same_queue_gauges():
    profile = PROFILES["vllm"]
    vllm = GIE["modelServerMetrics"]["vllm"]
    assert vllm["queue"]["metric"] == profile.waiting_metric
    assert vllm["running"]["metric"] == profile.running_metric


def test_the_label_names_the_epp_parses_are_vllms():
    vllm = GIE["modelServerMetrics"]["vllm"]
    labels = GIE["vllmCrossCheck"]["labelsInVllm"]
    assert set(vllm["lora"]["labels"]) == set(labels["vllm:lora_requests_info"])
    assert all(label in labels["vllm:cache_config_info"] for label in vllm["cacheInfo"]["labels"])


# --- the checks the components will call ----------------------------------------------------


NGF_VALUES = {
    "nginxGateway": {"gwAPIInferenceExtension": {"enable": True, "endpointPicker": {"skipVerify": True}},
                     "gatewayClassName": "nginx", "productTelemetry": {"enable": False},
                     "resources": {"requests": {"cpu": "100m"}}},
    "nginx": {"service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8"]},
              "replicas": 2.0},
}
EPP_VALUES = {
    "inferencePool": {"modelServers": {"matchLabels": {"app.kubernetes.io/name": "llm-server",
                                                       "app.kubernetes.io/instance": "llm-a"}},
                      "targetPorts": [{"number": 8000}], "modelServerType": "vllm"},
    "provider": {"name": "none"},
    "experimentalHttpRoute": {"enabled": False},
    "inferenceExtension": {"replicas": 1, "flags": {"v": 2, "refresh-metrics-interval": "50ms"},
                           "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}},
                           "monitoring": {"prometheus": {"enabled": True,
                                                         "auth": {"secretName": "llm-a-epp-metrics"}}}},
}


def test_the_values_we_mean_to_set_pass():
    assert gw.values_problems(gw.NGF_CHART, NGF_VALUES) == []
    assert gw.values_problems(gw.EPP_CHART, EPP_VALUES) == []
    gw.check_values(gw.NGF_CHART, NGF_VALUES)


def _with(values: dict, path: str, value) -> dict:
    out = copy.deepcopy(values)
    node = out
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


@pytest.mark.parametrize("path, value, expected", [
    ("nginxGateway.gwAPIInferenceExtension.enabled", True, "not a value chart nginx-gateway-fabric 2.6.7 reads"),
    ("nginxGateway.gwAPIInferenceExtension.enable", "true", "is not of type 'boolean'"),
    ("nginx.service.type", "LoadBalancr", "is not one of"),
    ("nginx.config.workerConnection", 1024, "not a value chart"),
])
def test_a_wrong_ngf_key_or_value_is_caught(path, value, expected):
    bad = _with(NGF_VALUES, path, value)
    problems = gw.values_problems(gw.NGF_CHART, bad)
    assert any(p.startswith(path) and expected in p for p in problems), problems
    with pytest.raises(ValueError, match=re.escape(path.split(".")[-1])):
        gw.check_values(gw.NGF_CHART, bad)


@pytest.mark.parametrize("path, value, expected", [
    ("inferencePool.modelServer.matchLabels", {"app": "x"}, "not a value chart inferencepool v1.5.0 reads"),
    ("provider.name", "nginx", "is not one of ['gke', 'istio', 'none']"),
    ("inferenceExtension.replicas", "2", "is not of type integer"),
    ("inferenceExtension.flags.secure-serving", False, "a bool flag"),
    ("inferenceExtension.flags.refresh-metrics-intervl", "50ms", "not a flag of the EPP 1.5.0"),
    ("inferenceExtension.flags.total-queued-requests-metric", "x", "refuses to start"),
    ("inferenceObjectives", [{"name": "hi", "priority": 1}], "fails to render"),
    ("inferencePool.targetPorts", [{"number": 8000}, {"number": 8000}], "must be unique"),
    ("inferencePool.modelServers.matchLabels", {}, "required"),
])
def test_a_wrong_epp_key_or_value_is_caught(path, value, expected):
    problems = gw.values_problems(gw.EPP_CHART, _with(EPP_VALUES, path, value))
    # A problem names the first key on the path that is wrong.
    assert any(path.startswith(p.split(":")[0]) and expected in p for p in problems), problems


def test_an_unknown_chart_is_refused():
    assert gw.values_problems("ingress-nginx", {}) == ["chart 'ingress-nginx': no facts; known charts: "
                                                       "['inferencepool', 'nginx-gateway-fabric']"]


POOL = {
    "apiVersion": POOL_API, "kind": "InferencePool",
    "metadata": {"name": "llm-a", "namespace": "llm-prod"},
    "spec": {"selector": {"matchLabels": {"app.kubernetes.io/instance": "llm-a"}},
             "targetPorts": [{"number": 8000.0}],
             "endpointPickerRef": {"name": "llm-a-epp", "port": {"number": 9002}, "failureMode": "FailOpen"}},
}
ROUTE = {
    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
    "metadata": {"name": "llm-a", "namespace": "llm-prod"},
    "spec": {"parentRefs": [{"name": "llm-gateway"}],
             "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/v1"},
                                     "headers": [{"type": "Exact", "name": "X-Gateway-Model-Name", "value": "llm-a"}]}],
                        "backendRefs": [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                         "name": "llm-a"}]}]},
}
GATEWAY = {
    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
    "metadata": {"name": "llm-gateway", "namespace": "llm-prod"},
    "spec": {"gatewayClassName": "nginx", "listeners": [
        {"name": "http", "port": 80, "protocol": "HTTP"},
        {"name": "https", "port": 443, "protocol": "HTTPS", "hostname": "llm.example.com",
         "tls": {"mode": "Terminate", "certificateRefs": [{"kind": "Secret", "name": "llm-tls"}]}},
    ]},
}
OBJECTIVE = {
    "apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceObjective",
    "metadata": {"name": "interactive", "namespace": "llm-prod"},
    "spec": {"poolRef": {"name": "llm-a"}, "priority": 1},
}
PROXY_SETTINGS = {
    "apiVersion": "gateway.nginx.org/v1alpha1", "kind": "ProxySettingsPolicy",
    "metadata": {"name": "llm-a-streaming", "namespace": "llm-prod"},
    "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "llm-a"}],
             "buffering": {"disable": True}, "timeout": {"read": "600s"}},
}


@pytest.mark.parametrize("obj", [POOL, ROUTE, GATEWAY, OBJECTIVE, PROXY_SETTINGS], ids=lambda o: o["kind"])
def test_the_manifests_we_mean_to_render_pass(obj):
    assert gw.manifest_problems(obj) == []


def _edit(obj: dict, edit) -> dict:
    out = copy.deepcopy(obj)
    edit(out)
    return out


@pytest.mark.parametrize("obj, expected", [
    (_edit(POOL, lambda o: o["spec"].pop("targetPorts")), "'targetPorts' is a required property"),
    (_edit(POOL, lambda o: o["spec"].update(targetPortNumber=8000)), "'targetPortNumber' was unexpected"),
    (_edit(POOL, lambda o: o["spec"]["targetPorts"].append({"number": 8000})), "port number must be unique"),
    (_edit(POOL, lambda o: o["spec"]["endpointPickerRef"].pop("port")), "port is required when kind is 'Service'"),
    (_edit(POOL, lambda o: o["spec"]["endpointPickerRef"].update(failureMode="FailSafe")), "is not one of"),
    (_edit(POOL, lambda o: o.update(apiVersion="inference.networking.x-k8s.io/v1alpha2")),
     "apiVersion inference.networking.x-k8s.io/v1alpha2 is not served"),
    (_edit(POOL, lambda o: o["metadata"].pop("namespace")), "'namespace' is a required property"),
    (_edit(ROUTE, lambda o: o["spec"]["rules"][0].update(timeouts={"request": "300s"})), "NGF 2.6.7 ignores it"),
    (_edit(ROUTE, lambda o: o["spec"]["rules"][0]["backendRefs"][0].pop("group")),
     "kind InferencePool goes with group inference.networking.k8s.io"),
    (_edit(ROUTE, lambda o: o["spec"]["rules"][0]["matches"][0]["path"].update(value="v1")),
     "value must be an absolute path"),
    (_edit(ROUTE, lambda o: o["spec"]["rules"][0]["matches"][0]["headers"][0].update(type="Prefix")),
     "is not one of ['Exact', 'RegularExpression']"),
    (_edit(ROUTE, lambda o: o["spec"]["rules"][0].update(filters=[{"type": "RequestHeaderModifier",
                                                                    "requestHeaderModifier": {}}])),
     "not among the HTTPRoute fields"),
    (_edit(GATEWAY, lambda o: o["spec"]["listeners"].append({"name": "http", "port": 8080, "protocol": "HTTP"})),
     "Listener name must be unique"),
    (_edit(PROXY_SETTINGS, lambda o: o["spec"].update(buffering={"off": True})), "'off' was unexpected"),
    ({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "UDPRoute", "metadata": {"name": "x"}},
     "not a kind of the pinned"),
])
def test_a_wrong_field_or_value_is_caught(obj, expected):
    problems = gw.manifest_problems(obj)
    assert any(expected in p for p in problems), problems
    with pytest.raises(ValueError, match=re.escape(obj["kind"])):
        gw.check_manifest(obj)
