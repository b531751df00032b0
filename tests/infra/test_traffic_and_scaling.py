"""Ingress, autoscaling, disruption budget, network policy and ServiceMonitor under mocks."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from components.config.parse import ConfigError, parse_stack_config
from components.config.pulumi_source import Secrets
from components.engines import PROFILES
from components.pins import NIC_CHART_VERSION
from components.policies.balancing import ingress_annotations
from components.policies.scaling import ScalingPolicy
from components.resources.ingress import NginxIngress
from components.resources.stack import LlmStack
from tests.contracts import facts
from tests.infra.conftest import BASE_CONFIG, GPU_CONFIG, Run
from tools import offline
from tools.offline import FAKE_LB_IP, _normalise

RELEASE = "kubernetes:helm.sh/v3:Release"
INGRESS = "kubernetes:networking.k8s.io/v1:Ingress"
HPA = "kubernetes:autoscaling/v2:HorizontalPodAutoscaler"
SCALED_OBJECT = "kubernetes:keda.sh/v1alpha1:ScaledObject"
PDB = "kubernetes:policy/v1:PodDisruptionBudget"
NETPOL = "kubernetes:networking.k8s.io/v1:NetworkPolicy"
MONITOR = "kubernetes:monitoring.coreos.com/v1:ServiceMonitor"
DEPLOYMENT = "kubernetes:apps/v1:Deployment"
SERVICE = "kubernetes:core/v1:Service"

PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"
GPU_SCALING = {
    **GPU_CONFIG,
    "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6,
                    "prometheusUrl": PROMETHEUS, "installKeda": True},
}


def stack(run, raw: dict[str, Any]) -> Run:
    cfg = parse_stack_config(raw)

    def build():
        s = LlmStack("llm", {"config": cfg, "secrets": Secrets()})
        return {"endpoint": s.endpoint, "namespace": s.namespace}

    return run(build)


def spec(resource) -> dict[str, Any]:
    return _normalise(resource.inputs)["spec"]


# --- ingress ------------------------------------------------------------------------


def test_ingress_installs_its_own_controller_and_routes_to_the_model_service(run):
    raw = {**BASE_CONFIG, "namespace": "llm", "ingress": {"enabled": True}}
    result = stack(run, raw)
    release = result.one(RELEASE)
    assert release.inputs["chart"] == "oci://ghcr.io/nginx/charts/nginx-ingress"
    assert release.inputs["version"] == NIC_CHART_VERSION
    controller = release.inputs["values"]["controller"]
    assert controller["ingressClass"]["name"] == "llm-nginx"
    # The model's namespace, and the controller's own, where its LoadBalancer Service lives:
    # without it the controller never learns its address and never publishes Ingress status.
    assert controller["watchNamespace"].split(",") == ["llm", "nginx-ingress"]
    assert controller["reportIngressStatus"] == {"enable": True}
    # No host configured: the controller must be told to accept a host-less rule.
    assert controller["allowEmptyIngressHost"] is True
    assert "host" not in spec(result.one(INGRESS))["rules"][0]
    assert controller["enableSnippets"] is False
    assert controller["service"]["type"] == "LoadBalancer"

    ingress = result.one(INGRESS)
    assert spec(ingress)["ingressClassName"] == "llm-nginx"
    backend = spec(ingress)["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == result.one(SERVICE).outputs["metadata"]["name"]
    assert backend["port"] == {"number": 80}
    cfg = parse_stack_config(raw)
    assert ingress.inputs["metadata"]["annotations"] == ingress_annotations(
        cfg.load_balancing, cfg.model.max_output_tokens
    )
    # The controller's LoadBalancer is the entry point; the model Service stays internal.
    assert result.one(SERVICE).inputs["spec"]["type"] == "ClusterIP"
    assert result.values["endpoint"] == f"http://{FAKE_LB_IP}/v1"


def test_ingress_annotations_are_streaming_safe_and_documented(run):
    raw = {**BASE_CONFIG, "model": {"id": "m", "maxOutputTokens": 4000, "maxContextLength": 8192},
           "ingress": {"enabled": True}, "loadBalancing": {"perTokenSeconds": 0.1}}
    result = stack(run, raw)
    annotations = result.one(INGRESS).inputs["metadata"]["annotations"]
    assert facts.annotation_problems(annotations, facts.pinned("nginx-ingress-controller")) == []
    assert annotations["nginx.org/proxy-buffering"].lower() == "false"
    assert annotations["nginx.org/proxy-read-timeout"] == "400s"  # 4000 tokens x 0.1 s
    assert annotations["nginx.org/lb-method"] == "least_conn"


def test_ingress_with_host_and_tls_serves_https_on_that_name(run):
    raw = {**BASE_CONFIG, "ingress": {"enabled": True, "host": "llm.example.com",
                                      "tlsSecret": "llm-tls"}}
    result = stack(run, raw)
    ingress_spec = spec(result.one(INGRESS))
    assert ingress_spec["rules"][0]["host"] == "llm.example.com"
    assert ingress_spec["tls"] == [{"hosts": ["llm.example.com"], "secretName": "llm-tls"}]
    assert result.values["endpoint"] == "https://llm.example.com/v1"


def test_existing_controller_is_used_not_installed(run):
    raw = {**BASE_CONFIG, "ingress": {"enabled": True, "className": "shared-nginx",
                                      "controller": {"install": False}}}
    result = stack(run, raw)
    assert not result.mocks.of_type(RELEASE)
    assert spec(result.one(INGRESS))["ingressClassName"] == "shared-nginx"
    namespaces = [r.inputs["metadata"]["name"] for r in result.mocks.of_type("kubernetes:core/v1:Namespace")]
    assert "nginx-ingress" not in namespaces


def test_service_type_stays_configurable_with_the_ingress_on(run):
    raw = {**BASE_CONFIG, "ingress": {"enabled": True}, "service": {"type": "NodePort"}}
    result = stack(run, raw)
    assert result.one(SERVICE).inputs["spec"]["type"] == "NodePort"


@pytest.mark.parametrize(
    "args, message",
    [({"tls_secret": "t"}, "'tls_secret' needs 'host'"),
     ({"annotations": {"nginx.ingress.kubernetes.io/proxy-buffering": "off"}}, "nginx.org"),
     ({"routes": []}, "one or more distinct paths"),
     ({"routes": [{"path": "/v1", "service_name": "a", "service_port": 80},
                  {"path": "/v1", "service_name": "b", "service_port": 80}]},
      "one or more distinct paths")],
)
def test_ingress_refuses_inputs_the_controller_would_mishandle(mocks, args, message):
    cfg = parse_stack_config(BASE_CONFIG)
    base = {"namespace": "ns", "routes": [{"path": "/v1", "service_name": "svc", "service_port": 80}],
            "class_name": "c", "controller": cfg.ingress.controller, "annotations": {}}
    with pytest.raises(ValueError, match=message):
        NginxIngress("ing", {**base, **args})


# --- autoscaling --------------------------------------------------------------------


def test_cpu_engine_scales_on_cpu_and_never_scales_a_loading_pod_away(run):
    raw = {**BASE_CONFIG, "model": {"id": "m", "loadTimeoutSeconds": 700},
           "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 5}}
    result = stack(run, raw)
    hpa = spec(result.one(HPA))
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 5)
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 700
    assert hpa["scaleTargetRef"]["name"] == result.one(DEPLOYMENT).outputs["metadata"]["name"]
    assert not result.mocks.of_type(SCALED_OBJECT)
    assert spec(result.one(DEPLOYMENT))["replicas"] == 2


def test_gpu_engine_scales_on_waiting_and_running_requests_with_keda(run):
    result = stack(run, {**GPU_SCALING, "namespace": "gpu"})
    scaled = _normalise(result.one(SCALED_OBJECT).inputs)
    queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"]]
    assert queries == [
        'sum(vllm:num_requests_waiting{namespace="gpu"})',
        'sum(avg_over_time(vllm:num_requests_running{namespace="gpu"}[60s]))']
    assert all(t["metadata"]["serverAddress"] == PROMETHEUS for t in scaled["spec"]["triggers"])
    window = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
        "stabilizationWindowSeconds"]
    assert window >= 1800 and scaled["spec"]["cooldownPeriod"] >= 1800
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (2, 6)
    keda = result.one(RELEASE)
    assert keda.inputs["chart"] == "keda"
    assert keda.inputs["repositoryOpts"]["repo"] == "https://kedacore.github.io/charts"
    assert not result.mocks.of_type(HPA)
    assert offline.schema_problems(offline.to_manifest(result.one(SCALED_OBJECT))) == []


def test_one_setting_changes_both_the_scaled_object_and_the_local_rule(run, mocks):
    """The ScaledObject and the rule local mode runs come from one ScalingPolicy: a changed
    setting shows up in both renderings."""
    changed = copy.deepcopy(GPU_SCALING)
    changed["autoscaling"]["targetWaitingPerReplica"] = 4  # default 1
    changed["autoscaling"]["scaleDownStabilizationSeconds"] = 2400
    changed["autoscaling"]["runningAverageSeconds"] = 120  # default 60
    local = []
    for raw in (GPU_SCALING, changed):
        stack(run, raw)
        local.append(ScalingPolicy.for_stack(parse_stack_config(raw), PROFILES["server"]))
    objects = [spec(r) for r in mocks.of_type(SCALED_OBJECT)]
    assert len(objects) == 2
    thresholds = [o["triggers"][0]["metadata"]["threshold"] for o in objects]
    windows = [o["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
        "stabilizationWindowSeconds"] for o in objects]
    assert thresholds == ["1", "4"] and windows == [1800, 2400]
    assert [o["triggers"][1]["metadata"]["query"].endswith(f"[{w}s]))") for o, w
            in zip(objects, (60, 120))] == [True, True]
    assert [p.triggers[1].query.endswith(f"[{w}s]))") for p, w
            in zip(local, (60, 120))] == [True, True]
    # 8 waiting over 2 replicas: target 1 asks for 8 replicas (max 6), target 4 keeps 2.
    assert [p.rule().evaluate(0.0, 2, (8.0, 0.0)).desired for p in local] == [6, 2]
    assert [p.scale_down.stabilization_window_seconds for p in local] == [1800, 2400]
    # Same thresholds and windows, the same namespace in the query; only the metric name is
    # the local server's.
    assert [t.threshold for t in local[1].triggers] == [4, 24]
    assert local[1].triggers[0].query == 'sum(llm_requests_waiting{namespace="llm-serving"})'


def test_keda_is_not_installed_unless_asked(run):
    raw = copy.deepcopy(GPU_SCALING)
    raw["autoscaling"]["installKeda"] = False
    result = stack(run, raw)
    assert not result.mocks.of_type(RELEASE)
    assert result.mocks.of_type(SCALED_OBJECT)


# --- disruption budget and network policy --------------------------------------------


def test_disruption_budget_selects_the_model_pods_and_lets_loading_pods_go(run):
    result = stack(run, BASE_CONFIG)
    pdb = spec(result.one(PDB))
    assert pdb["maxUnavailable"] == 1
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["selector"]["matchLabels"] == spec(result.one(DEPLOYMENT))["selector"]["matchLabels"]


def test_network_policy_admits_only_the_controller_and_monitoring(run):
    raw = {**BASE_CONFIG, "ingress": {"enabled": True},
           "networkPolicy": {"enabled": True, "monitoringNamespace": "monitoring"}}
    result = stack(run, raw)
    policy = spec(result.one(NETPOL))
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    [from_controller, from_monitoring] = policy["ingress"]
    peer = from_controller["from"][0]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "nginx-ingress"}
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "llm-nginx"
    assert from_controller["ports"] == [{"port": 8000, "protocol": "TCP"}]
    assert from_monitoring["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"}


def test_network_policy_without_ingress_opens_only_the_api_port(run):
    raw = {**BASE_CONFIG, "networkPolicy": {"enabled": True}}
    result = stack(run, raw)
    assert spec(result.one(NETPOL))["ingress"] == [{"ports": [{"port": 8000, "protocol": "TCP"}]}]


def test_policies_can_be_switched_off(run):
    result = stack(run, {**BASE_CONFIG, "disruptionBudget": {"enabled": False},
                         "networkPolicy": {"enabled": False}})
    assert not result.mocks.of_type(PDB) and not result.mocks.of_type(NETPOL)


SCRAPED = {**BASE_CONFIG, "monitoring": {"serviceMonitor": True}}


@pytest.mark.parametrize("raw, expected", [
    (BASE_CONFIG, True),
    # A Prometheus must scrape the pods, but from where is unknown: a policy would block it.
    (SCRAPED, False),
    ({**SCRAPED, "networkPolicy": {"monitoringNamespace": "monitoring"}}, True),
    ({**SCRAPED, "networkPolicy": {"enabled": True}}, True),  # the operator's explicit choice
])
def test_network_policy_is_on_by_default_where_it_cannot_cut_the_stack_off(run, raw, expected):
    assert bool(stack(run, raw).mocks.of_type(NETPOL)) is expected


def _egress_peers(rule: dict[str, Any]) -> list[dict[str, Any]]:
    return [peer["ipBlock"] for peer in rule["to"] if "ipBlock" in peer]


def test_downloading_pods_reach_only_dns_and_https_never_metadata(run):
    policy = spec(stack(run, BASE_CONFIG).one(NETPOL))
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    dns, https = policy["egress"]
    assert sorted((p["port"], p["protocol"]) for p in dns["ports"]) == [(53, "TCP"), (53, "UDP")]
    assert https["ports"] == [{"port": 443, "protocol": "TCP"}]
    cluster_dns = dns["to"][0]
    assert cluster_dns["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "kube-system"}
    assert cluster_dns["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    for rule in (dns, https):
        blocks = {b["cidr"]: set(b["except"]) for b in _egress_peers(rule)}
        assert blocks == {"0.0.0.0/0": {"169.254.0.0/16"},
                          "::/0": {"fd00:ec2::254/128", "fe80::/10"}}
    ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert ports == {53, 443}


def test_baked_weights_get_no_egress_at_all(run):
    baked = {**GPU_CONFIG, "modelCache": {"type": "baked"},
             "image": {"build": True, "repository": "r"}}
    policy = spec(stack(run, baked).one(NETPOL))
    assert policy["policyTypes"] == ["Ingress", "Egress"] and policy["egress"] == []


def test_egress_restriction_can_be_left_to_the_cluster(run):
    raw = {**BASE_CONFIG, "networkPolicy": {"restrictEgress": False}}
    policy = spec(stack(run, raw).one(NETPOL))
    assert policy["policyTypes"] == ["Ingress"] and "egress" not in policy


# --- monitoring -----------------------------------------------------------------------


def test_service_monitor_selects_the_model_service_and_scrapes_metrics(run):
    raw = {**GPU_CONFIG, "monitoring": {"serviceMonitor": True, "labels": {"release": "kps"}}}
    result = stack(run, raw)
    monitor = _normalise(result.one(MONITOR).inputs)
    service_labels = result.one(SERVICE).inputs["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert offline.schema_problems(offline.to_manifest(result.one(MONITOR))) == []


def test_custom_resource_checks_catch_missing_and_misspelt_fields(run):
    result = stack(run, GPU_SCALING)
    manifest = offline.to_manifest(result.one(SCALED_OBJECT))
    broken = copy.deepcopy(manifest)
    del broken["spec"]["triggers"]
    broken["spec"]["maxReplicas"] = 3
    problems = offline.schema_problems(broken)
    assert any("'triggers' is a required property" in p for p in problems)
    assert any("maxReplicas" in p for p in problems)


# --- configuration rules --------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, key",
    [
        ({**BASE_CONFIG, "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 2}},
         "autoscaling.maxReplicas"),
        ({**BASE_CONFIG, "autoscaling": {"enabled": True, "scaleDownStabilizationSeconds": 60}},
         "autoscaling.scaleDownStabilizationSeconds"),
        ({**GPU_CONFIG, "autoscaling": {"enabled": True}}, "autoscaling.prometheusUrl"),
        ({**BASE_CONFIG, "resources": {"requests": {"memory": "1Gi"}},
          "autoscaling": {"enabled": True}}, "resources.requests.cpu"),
        ({**BASE_CONFIG, "ingress": {"enabled": True, "tlsSecret": "t"}}, "ingress.tlsSecret"),
        ({**BASE_CONFIG, "ingress": {"enabled": True}, "service": {"sourceRanges": ["198.51.100.0/24"]}},
         "service.sourceRanges"),
        ({**BASE_CONFIG, "ingress": {"enabled": True, "className": "Bad_Class"}}, "ingress.className"),
    ],
)
def test_scaling_and_ingress_mistakes_name_the_key(raw, key):
    with pytest.raises(ConfigError) as caught:
        parse_stack_config(raw)
    assert any(p.startswith(f"llm-serving:{key}:") for p in caught.value.problems), caught.value.problems


# --- the prod bar -----------------------------------------------------------------------


def test_prod_has_controller_ingress_keda_pdb_and_network_policy_all_valid():
    run = offline.run_program(*offline.read_stack_file(offline.PROJECT_DIR / "Pulumi.prod.yaml"))
    types = {r.type for r in run.resources}
    assert {RELEASE, INGRESS, SCALED_OBJECT, PDB, NETPOL} <= types
    charts = {r.inputs["chart"] for r in run.mocks.of_type(RELEASE)}
    assert charts == {"oci://ghcr.io/nginx/charts/nginx-ingress", "keda", "cert-manager"}
    # The Ingress that routes the API (a master Ingress holds the host and its TLS beside it).
    [ingress] = [r for r in run.mocks.of_type(INGRESS) if r.name == "llm-ingress-ingress"]
    annotations = ingress.inputs["metadata"]["annotations"]
    assert annotations["nginx.org/lb-method"] == "least_conn"
    assert annotations["nginx.org/proxy-buffering"].lower() == "false"
    assert int(annotations["nginx.org/proxy-read-timeout"].rstrip("s")) >= 120
    manifests = [offline.to_manifest(r) for r in run.resources if offline.is_kubernetes_object(r)]
    assert [p for m in manifests for p in offline.schema_problems(m)] == []


@pytest.mark.parametrize(
    "raw",
    [
        {**BASE_CONFIG, "ingress": {"enabled": True, "host": "llm.example.com", "tlsSecret": "tls"},
         "autoscaling": {"enabled": True}, "networkPolicy": {"enabled": True, "monitoringNamespace": "mon"},
         "monitoring": {"serviceMonitor": True},
         "loadBalancing": {"method": "session_hash", "rateLimit": {"requestsPerSecond": 5, "burst": 10}}},
        {**GPU_SCALING, "ingress": {"enabled": True, "controller": {"install": False}},
         "networkPolicy": {"enabled": True}, "modelCache": {"type": "pvc"}},
    ],
    ids=["cpu-everything", "gpu-everything"],
)
def test_every_object_of_a_full_stack_is_schema_valid(run, raw):
    result = stack(run, raw)
    manifests = [offline.to_manifest(r) for r in result.mocks.resources if offline.is_kubernetes_object(r)]
    kinds = {m["kind"] for m in manifests}
    assert {"Ingress", "NetworkPolicy", "PodDisruptionBudget"} <= kinds
    assert kinds & {"HorizontalPodAutoscaler", "ScaledObject"}
    assert [p for m in manifests for p in offline.schema_problems(m)] == []
