"""The rendered Gateway stack (Pulumi.prod-gateway.yaml) held to the pinned upstreams: every chart
value NGINX Gateway Fabric and the inferencepool chart read, every Gateway API, Inference
Extension and NGINX Gateway Fabric object valid against its CRD and what the controller does
with it, the model router's image and headers as the facts say; and wrong keys and values are
caught."""

from __future__ import annotations

import copy

import pytest

from components.config.exposure import GATEWAY_NAME
from components.config.parse import parse_stack_config
from components.pins import (
    EPP_CHART,
    MODEL_ROUTER_IMAGE,
    MODEL_ROUTER_NGINX_VERSION,
    NGF_CHART,
    PINNED,
)
from components.policies.model_routing import MODEL_HEADER, PATH_HEADER, ROUTER_PORT
from components.resources.gateway import ROUTER_UID, data_plane_service, pool_name
from tests.contracts import facts
from tests.contracts import gateway_facts as gw
from tools import offline

ROUTER = facts.pinned("nginx-unprivileged")
GATEWAY_KINDS = {"Gateway", "HTTPRoute", "ProxySettingsPolicy", "ClientSettingsPolicy"}


@pytest.fixture(scope="module")
def stack() -> offline.ProgramRun:
    config, secret_keys = offline.read_stack_file(offline.PROJECT_DIR / "Pulumi.prod-gateway.yaml")
    return offline.run_program(config, secret_keys, stack="prod-gateway")


def _releases(run: offline.ProgramRun, chart: str) -> list[dict]:
    return [offline.to_helm_release(r) for r in run.resources
            if offline.is_helm_release(r) and r.inputs["chart"] == chart]


def _manifests(run: offline.ProgramRun) -> list[dict]:
    return [offline.to_manifest(r) for r in run.resources if offline.is_kubernetes_object(r)]


# --- chart values ---------------------------------------------------------------------------


def test_the_controller_values_are_ones_the_pinned_chart_reads(stack):
    [release] = _releases(stack, NGF_CHART)
    assert release["version"] == PINNED["nginx-gateway-fabric"]
    assert gw.values_problems(gw.NGF_CHART, release["values"]) == []
    for key, fact in gw.NGF["valuesOfInterest"].items():
        if "set" in fact:  # the values the facts say to set, set as they say
            node = release["values"]
            for part in key.split("."):
                node = node[part]
            assert node == fact["set"], key


def test_each_endpoint_picker_s_values_are_ones_the_pinned_chart_reads(stack):
    releases = _releases(stack, EPP_CHART)
    assert len(releases) == 2
    for release in releases:
        assert release["version"] == gw.GIE["eppChart"]["version"]
        assert gw.values_problems(gw.EPP_CHART, release["values"]) == []
        # Two releases in one namespace must not share the metrics token's Secret.
        secret = release["values"]["inferenceExtension"]["monitoring"]["prometheus"]["auth"]
        assert secret["secretName"].startswith(release["name"])
        assert len(release["name"]) <= 40, gw.GIE["eppChart"]["nameLimit"]


@pytest.mark.parametrize("chart, path, value, fragment", [
    (gw.NGF_CHART, ("nginxGateway", "gwAPIInferenceExtension", "enabled"), True, "not a value"),
    (gw.NGF_CHART, ("nginx", "service", "type"), "Ingress", "is not one of"),
    (gw.EPP_CHART, ("inferencePool", "modelServerType"), "sglang", "refuses to start"),
    (gw.EPP_CHART, ("inferenceExtension", "replica"), 2, "not a value"),
    (gw.EPP_CHART, ("inferenceExtension", "flags", "enable-pprof"), "false", "bool flag"),
])
def test_a_wrong_chart_key_or_value_is_caught(stack, chart, path, value, fragment):
    [release, *_] = _releases(stack, NGF_CHART if chart == gw.NGF_CHART else EPP_CHART)
    values = copy.deepcopy(release["values"])
    node = values
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    problems = gw.values_problems(chart, values)
    assert any(fragment in p for p in problems), problems


# --- objects --------------------------------------------------------------------------------


def test_every_gateway_object_is_valid_against_its_pinned_crd_and_the_controller(stack):
    objects = [m for m in _manifests(stack) if m["kind"] in GATEWAY_KINDS]
    assert {m["kind"] for m in objects} == GATEWAY_KINDS
    assert len([m for m in objects if m["kind"] == "HTTPRoute"]) == 3  # two models + fallback
    for obj in objects:
        assert gw.manifest_problems(obj) == [], obj["metadata"]["name"]


@pytest.mark.parametrize("change, fragment", [
    (lambda r: r["spec"]["rules"][0].update(timeouts={"request": "300s"}), "ignores it"),
    (lambda r: r["spec"]["rules"][0]["matches"][0]["headers"][0].update(value=" "), "blank"),
    (lambda r: r["spec"]["rules"][0]["backendRefs"][0].pop("group"), "goes with group"),
    (lambda r: r["spec"]["rules"][0]["matches"][0].update(method="POSTT"), "method"),
])
def test_a_wrong_route_field_or_value_is_caught(stack, change, fragment):
    [route] = [m for m in _manifests(stack) if m["kind"] == "HTTPRoute"
               and m["spec"]["rules"][0]["matches"][0].get("headers")][:1]
    broken = copy.deepcopy(route)
    change(broken)
    problems = gw.manifest_problems(broken)
    assert any(fragment in p for p in problems), problems


def test_render_validates_the_new_kinds_against_the_pinned_crds(stack):
    """`make render` checks the same schemas (tools/crd_schemas.py), typos included."""
    [policy] = [m for m in _manifests(stack) if m["kind"] == "ProxySettingsPolicy"][:1]
    assert offline.schema_problems(policy) == []
    broken = copy.deepcopy(policy)
    broken["spec"]["buffering"]["disabled"] = True
    broken["spec"]["timeout"]["read"] = "ten minutes"
    problems = offline.schema_problems(broken)
    assert any("disabled" in p for p in problems) and any("ten minutes" in p for p in problems)


def test_the_routes_point_at_pools_the_pickers_create(stack):
    pools = {r["name"] for r in _releases(stack, EPP_CHART)}  # InferencePool name = release name
    routed = {ref["name"] for m in _manifests(stack) if m["kind"] == "HTTPRoute"
              for rule in m["spec"]["rules"] for ref in rule["backendRefs"]
              if ref.get("kind") == "InferencePool"}
    assert routed == pools
    cfg = parse_stack_config(offline.namespace_values(
        offline.read_stack_file(offline.PROJECT_DIR / "Pulumi.prod-gateway.yaml")[0]))
    assert pools == {pool_name(cfg, i) for i in range(cfg.model_count)}


def test_the_router_sends_to_the_service_the_controller_creates(stack):
    cfg = parse_stack_config(offline.namespace_values(
        offline.read_stack_file(offline.PROJECT_DIR / "Pulumi.prod-gateway.yaml")[0]))
    rule = gw.NGF["dataPlane"]["serviceName"]["rule"]
    assert rule.startswith("<Gateway name>-<GatewayClass name>")
    name = data_plane_service(cfg)
    assert name == f"{GATEWAY_NAME}-{cfg.gateway.class_name}" and len(name) <= 63
    [config] = [m for m in _manifests(stack) if m["kind"] == "ConfigMap"
                and "nginx.conf" in m.get("data", {})]
    assert f"server {name}.{cfg.namespace}.svc.cluster.local:80;" in config["data"]["nginx.conf"]


# --- the router and the headers -------------------------------------------------------------


def test_the_router_sets_the_headers_the_inference_extension_reads():
    bbr = {p["name"]: p for p in gw.GIE["bbr"]["defaultPlugins"]}
    assert bbr["model-extractor"]["json"]["headerName"] == MODEL_HEADER
    assert bbr["model-extractor"]["json"]["fieldName"] == "model"
    assert PATH_HEADER.lower() in gw.GIE["requestHandling"]["pathDetection"]


def test_the_router_image_is_the_pinned_one_and_runs_as_its_facts_say(stack):
    assert MODEL_ROUTER_IMAGE == ROUTER["image"]["reference"]
    assert MODEL_ROUTER_NGINX_VERSION == ROUTER["nginxVersion"]["value"]
    assert (ROUTER_UID, ROUTER_PORT) == (ROUTER["user"]["uid"], ROUTER["listenPort"]["value"])
    [router] = [m for m in _manifests(stack) if m["kind"] == "Deployment"
                and m["spec"]["template"]["spec"]["containers"][0]["image"] == MODEL_ROUTER_IMAGE]
    pod = router["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == ROUTER["user"]["uid"]
    # nginx itself, so the entrypoint's scripts (which edit /etc/nginx) do not run.
    assert pod["containers"][0]["command"][0] == "nginx"
    assert "/docker-entrypoint.sh" in ROUTER["entrypoint"]["value"]
    assert {v["emptyDir"] is not None for v in pod["volumes"] if "emptyDir" in v} == {True}


def test_the_pickers_namespace_enforces_what_their_chart_meets(stack):
    """The inferencepool chart sets no securityContext: its pods meet baseline, not restricted."""
    assert "meets baseline" in gw.GIE["eppChart"]["podSecurity"]
    [namespace] = [m for m in _manifests(stack) if m["kind"] == "Namespace"
                   and m["metadata"]["name"] == "llm-gateway"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "baseline"
