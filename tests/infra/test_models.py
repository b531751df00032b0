"""Several models behind one endpoint: the `models` list, what it refuses, and the objects each
model gets (Deployment, Service, autoscaler, PDB, ServiceMonitor, alert rules, an Ingress path).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from components.config.parse import ConfigError, parse_stack_config
from components.config.rules import stack_warnings
from components.engines import MODEL_LABEL
from components.policies.alerting import alert_policy
from components.policies.dashboard import build_dashboard
from tests.infra.conftest import GPU_CONFIG
from tests.infra.test_traffic_and_scaling import (
    DEPLOYMENT,
    HPA,
    INGRESS,
    MONITOR,
    PDB,
    SCALED_OBJECT,
    SERVICE,
    spec,
    stack,
)
from tools.offline import FAKE_LB_IP, _normalise

RULE = "kubernetes:monitoring.coreos.com/v1:PrometheusRule"

TWO_MODELS: dict[str, Any] = {
    "namespace": "llm",
    "models": [
        {"id": "Qwen/Qwen2.5-0.5B-Instruct", "servedName": "qwen-small", "maxConcurrency": 4},
        {"id": "Qwen/Qwen2.5-Coder-0.5B-Instruct", "servedName": "coder", "maxConcurrency": 8,
         "maxOutputTokens": 2048, "replicas": 3,
         "resources": {"requests": {"cpu": "2", "memory": "3Gi"}, "limits": {"memory": "6Gi"}},
         "autoscaling": {"minReplicas": 2, "maxReplicas": 7}},
    ],
    "resources": {"requests": {"cpu": "1", "memory": "2Gi"}},
    "replicas": 2,
    "ingress": {"enabled": True},
    "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3},
    "monitoring": {"serviceMonitor": True, "rules": True, "dashboard": True},
}

GPU_TWO_MODELS: dict[str, Any] = {
    **GPU_CONFIG,
    "model": None,
    "models": [
        {"id": "Qwen/Qwen2.5-7B-Instruct", "servedName": "qwen2.5-7b", "loadTimeoutSeconds": 1800},
        {"id": "Qwen/Qwen2.5-14B-Instruct", "servedName": "qwen2.5-14b", "loadTimeoutSeconds": 1800,
         "gpu": {"count": 4}, "autoscaling": {"maxReplicas": 2, "targetRunningPerReplica": 48}},
    ],
    "ingress": {"enabled": True, "modelPaths": {"qwen2.5-14b": "/large/v1"}},
    "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 4,
                    "prometheusUrl": "http://prometheus:9090"},
    "monitoring": {"serviceMonitor": True, "rules": True},
}
del GPU_TWO_MODELS["model"]


def problems_of(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_stack_config(raw)
    return caught.value.problems


def _named(result, typ: str) -> dict[str, Any]:
    return {r.name: r for r in result.mocks.of_type(typ) if not r.read}


# --- the configuration ------------------------------------------------------------------


def test_a_model_section_is_a_list_of_one():
    cfg = parse_stack_config({"model": {"id": "org/m", "maxConcurrency": 4}})
    [entry] = cfg.models
    assert entry.id == "org/m" and entry.max_concurrency == 4
    assert cfg.model.id == "org/m"
    assert cfg.for_model(0).key("model.maxOutputTokens") == "model.maxOutputTokens"


def test_models_resolve_their_own_replicas_gpus_resources_and_bounds():
    cfg = parse_stack_config(TWO_MODELS)
    first, coder = cfg.model_views()
    assert (first.replicas, coder.replicas) == (2, 3)
    assert first.resources.requests.cpu == "1" and coder.resources.requests.cpu == "2"
    assert (first.autoscaling.min_replicas, first.autoscaling.max_replicas) == (1, 3)
    assert (coder.autoscaling.min_replicas, coder.autoscaling.max_replicas) == (2, 7)
    assert coder.model.served == "coder" and coder.launch.max_output_tokens == 2048
    gpu = parse_stack_config(GPU_TWO_MODELS).model_views()
    assert [v.gpu.count for v in gpu] == [2, 4]
    assert gpu[1].gpu.node_selector == gpu[0].gpu.node_selector  # the stack's, shared
    assert gpu[1].autoscaling.target_running_per_replica == 48
    assert [cfg.ingress_path(i) for i in range(2)] == ["/v1", "/coder/v1"]


def test_model_and_models_together_are_refused_naming_both():
    raw = {"model": {"id": "a"}, "models": [{"id": "b"}]}
    assert problems_of(raw) == [
        "llm-serving:model, models: set either model (one model) or models (a list), not both"]
    assert problems_of({"replicas": 2}) == [
        "llm-serving:model: required key is missing (or set models, a list of models)"]


def test_a_duplicate_served_name_is_refused_naming_the_key():
    raw = copy.deepcopy(TWO_MODELS)
    raw["models"][1]["servedName"] = "qwen-small"
    assert problems_of(raw) == [
        "llm-serving:models[1].servedName: 'qwen-small' is already served by models[0]; "
        "served names must be unique (clients pick a model by it)"]


def test_a_served_name_that_cannot_become_a_kubernetes_name_is_refused_saying_what_is_allowed():
    raw = copy.deepcopy(TWO_MODELS)
    raw["models"][1]["servedName"] = "coder:latest"
    [problem] = problems_of(raw)
    assert problem.startswith("llm-serving:models[1].servedName: 'coder:latest' cannot become a "
                              "Kubernetes name")
    assert "lower-case letters, digits and '-'" in problem and "set models[1].name" in problem
    # Without a servedName the id is the name; a long one is refused the same way.
    raw["models"][1].pop("servedName")
    raw["models"][1]["id"] = "meta-llama/Llama-3.1-8B-Instruct"
    [problem] = problems_of(raw)
    assert problem.startswith("llm-serving:models[1].id: ") and "at most 24 characters" in problem
    # ... and accepted with a Kubernetes name of its own.
    raw["models"][1]["name"] = "llama-8b"
    cfg = parse_stack_config(raw)
    assert cfg.models[1].kube_name == "llama-8b" and cfg.ingress_path(1) == "/llama-8b/v1"


def test_dots_slashes_and_underscores_become_dashes_in_the_kubernetes_name():
    cfg = parse_stack_config(GPU_TWO_MODELS)
    assert [m.kube_name for m in cfg.models] == ["qwen2-5-7b", "qwen2-5-14b"]


def test_a_route_to_a_model_that_does_not_exist_is_refused_naming_the_key():
    raw = copy.deepcopy(TWO_MODELS)
    raw["ingress"]["modelPaths"] = {"codr": "/codr/v1"}
    assert problems_of(raw) == [
        "llm-serving:ingress.modelPaths.codr: routes to a model that does not exist; served "
        "names: qwen-small, coder"]


@pytest.mark.parametrize("path, fragment", [
    ("/v1/coder", "lies outside /v1"), ("/coder", "ends in /v1"), ("coder/v1", "ends in /v1")])
def test_a_model_path_must_be_a_base_url_outside_the_first_models(path, fragment):
    raw = copy.deepcopy(TWO_MODELS)
    raw["ingress"]["modelPaths"] = {"coder": path}
    [problem] = problems_of(raw)
    assert problem.startswith("llm-serving:ingress.modelPaths.coder: ") and fragment in problem


def test_per_model_values_are_named_by_the_key_they_came_from():
    raw = copy.deepcopy(TWO_MODELS)
    raw["models"][1]["maxOutputTokens"] = 5000
    raw["models"][1]["autoscaling"]["maxReplicas"] = 1
    raw["models"][1]["gpu"] = {"count": 1}
    problems = problems_of(raw)
    assert "llm-serving:models[1].maxOutputTokens: must be below models[1].maxContextLength " \
           "(4096) to leave room for the prompt" in problems
    assert "llm-serving:models[1].autoscaling.maxReplicas: must be at least " \
           "models[1].autoscaling.minReplicas (2)" in problems
    assert any(p.startswith("llm-serving:models[1].gpu.count: engine 'server' runs on CPU only")
               for p in problems)
    # The first model inherits the stack's values, so its problems name the stack's keys.
    raw = copy.deepcopy(TWO_MODELS)
    raw["autoscaling"]["maxReplicas"] = 0
    assert any(p.startswith("llm-serving:autoscaling.maxReplicas") for p in problems_of(raw))


def test_several_models_need_an_entry_point_that_routes():
    raw = {**TWO_MODELS, "ingress": {"enabled": False}}
    [problem] = problems_of(raw)
    assert problem.startswith("llm-serving:models: 2 models need one entry point")


def test_baked_weights_hold_one_model():
    raw = {**TWO_MODELS, "modelCache": {"type": "baked"}}
    assert any(p.startswith("llm-serving:modelCache.type: 'baked' puts one model's weights")
               for p in problems_of(raw))


def test_a_model_s_bounds_without_autoscaling_are_refused():
    raw = copy.deepcopy(TWO_MODELS)
    raw["autoscaling"] = {"enabled": False}
    assert "llm-serving:models[1].autoscaling: set, but autoscaling.enabled is false" \
        in problems_of(raw)


def test_an_unknown_key_in_a_model_suggests_the_closest():
    raw = copy.deepcopy(TWO_MODELS)
    raw["models"][1]["replcias"] = 2
    [problem] = problems_of(raw)
    assert problem.startswith("llm-serving:models[1].replcias: unknown key (did you mean "
                              "'replicas'?); allowed keys here: id, ")


def test_the_ingress_path_warns_that_it_routes_by_path_not_by_model():
    cfg = parse_stack_config(TWO_MODELS)
    [warning] = [w for w in stack_warnings(cfg) if w.startswith("llm-serving:models:")]
    assert "cannot read the request body" in warning
    assert "qwen-small at /v1, coder at /coder/v1" in warning
    assert "GET /v1/models lists only qwen-small" in warning
    assert not [w for w in stack_warnings(parse_stack_config(
        {"model": {"id": "m"}, "ingress": {"enabled": True}})) if w.startswith("llm-serving:models")]


# --- the objects of each model ----------------------------------------------------------


def test_two_models_get_their_own_deployments_services_and_autoscalers(run):
    result = stack(run, TWO_MODELS)
    deployments = _named(result, DEPLOYMENT)
    # The first model keeps a single-model stack's names; the second's carry its name.
    assert set(deployments) == {"llm-model-deploy", "llm-model-coder-deploy"}
    first, coder = (spec(deployments[n]) for n in ("llm-model-deploy", "llm-model-coder-deploy"))
    assert (first["replicas"], coder["replicas"]) == (1, 2)  # autoscaling's minReplicas each
    env = {e["name"]: e.get("value") for e in coder["template"]["spec"]["containers"][0]["env"]}
    assert env["LLM_SERVED_MODEL_NAME"] == "coder" and env["LLM_MAX_TOKENS"] == "2048"
    assert coder["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "2"
    assert first["selector"] != coder["selector"]

    services = _named(result, SERVICE)
    assert set(services) == {"llm-api-svc", "llm-api-coder-svc"}
    assert spec(services["llm-api-coder-svc"])["selector"] == coder["selector"]["matchLabels"]

    hpas = _named(result, HPA)
    assert set(hpas) == {"llm-autoscaler-hpa", "llm-autoscaler-coder-hpa"}
    bounds = {n: (spec(h)["minReplicas"], spec(h)["maxReplicas"]) for n, h in hpas.items()}
    assert bounds == {"llm-autoscaler-hpa": (1, 3), "llm-autoscaler-coder-hpa": (2, 7)}
    assert spec(hpas["llm-autoscaler-coder-hpa"])["scaleTargetRef"]["name"] == \
        deployments["llm-model-coder-deploy"].outputs["metadata"]["name"]

    pdbs = _named(result, PDB)
    assert set(pdbs) == {"llm-policies-pdb", "llm-policies-coder-pdb"}
    assert spec(pdbs["llm-policies-coder-pdb"])["selector"] == coder["selector"]


def test_the_ingress_routes_each_model_by_its_path(run):
    result = stack(run, TWO_MODELS)
    [ingress] = _named(result, INGRESS).values()
    services = _named(result, SERVICE)
    paths = {p["path"]: p["backend"]["service"]["name"]
             for p in spec(ingress)["rules"][0]["http"]["paths"]}
    first_svc = services["llm-api-svc"].outputs["metadata"]["name"]
    coder_svc = services["llm-api-coder-svc"].outputs["metadata"]["name"]
    assert paths == {"/v1": first_svc, "/coder/v1": coder_svc}
    annotations = ingress.inputs["metadata"]["annotations"]
    # Only the second model's prefix is rewritten to the /v1 its pods serve.
    assert annotations["nginx.org/rewrites"] == f"serviceName={coder_svc} rewrite=/v1"
    # One set of annotations: the longest generation budget of the two (2048 x 0.1 s).
    assert annotations["nginx.org/proxy-read-timeout"] == "205s"
    assert result.values["endpoint"] == f"http://{FAKE_LB_IP}/v1"


def test_the_stack_exports_every_model_s_base_url(run):
    from components.config.pulumi_source import Secrets
    from components.resources.stack import LlmStack

    cfg = parse_stack_config({**TWO_MODELS, "ingress": {"enabled": True,
                                                        "host": "llm.example.com"}})

    def build():
        s = LlmStack("llm", {"config": cfg, "secrets": Secrets()})
        return dict(s.endpoints)

    assert run(build).values == {"qwen-small": "http://llm.example.com/v1",
                                 "coder": "http://llm.example.com/coder/v1"}


def test_each_model_is_monitored_and_alerted_on_its_own_series(run):
    result = stack(run, TWO_MODELS)
    monitors = _named(result, MONITOR)
    assert set(monitors) == {"llm-monitor-servicemonitor", "llm-monitor-coder-servicemonitor"}
    # The server engine does not label its series with the model; each monitor does.
    relabel = {n: _normalise(m.inputs)["spec"]["endpoints"][0].get("relabelings")
               for n, m in monitors.items()}
    assert relabel["llm-monitor-coder-servicemonitor"] == [
        {"action": "replace", "targetLabel": MODEL_LABEL, "replacement": "coder"}]
    assert relabel["llm-monitor-servicemonitor"][0]["replacement"] == "qwen-small"

    rules = _named(result, RULE)
    assert set(rules) == {"llm-alerts-rules", "llm-alerts-coder-rules"}
    coder_rules = _normalise(rules["llm-alerts-coder-rules"].inputs)["spec"]["groups"]
    records = {r["record"]: r for r in coder_rules[0]["rules"]}
    deployment = _named(result, DEPLOYMENT)["llm-model-coder-deploy"].outputs["metadata"]["name"]
    assert f'{MODEL_LABEL}="coder"' in records["llm_serving:ttft_seconds:p99"]["expr"]
    assert f'deployment="{deployment}"' in records["llm_serving:replicas:available"]["expr"]
    assert records["llm_serving:requests:rate"]["labels"]["model"] == "coder"
    alerts = {r["alert"]: r for r in coder_rules[1]["rules"]}
    assert alerts["LlmReplicasAtMax"]["expr"].endswith(">= 7")
    assert alerts["LlmNoReadyReplica"]["labels"]["model"] == "coder"


def test_a_single_model_stack_s_rules_and_monitor_are_unscoped(run):
    result = stack(run, {"model": {"id": "m"}, "monitoring": {"serviceMonitor": True,
                                                              "rules": True}})
    [monitor] = _named(result, MONITOR).values()
    assert "relabelings" not in _normalise(monitor.inputs)["spec"]["endpoints"][0]
    [rule] = _named(result, RULE).values()
    assert MODEL_LABEL not in str(rule.inputs)
    # Its replica counts still read its own Deployment's kube-state-metrics series only.
    records = {r["record"]: r for r in _normalise(rule.inputs)["spec"]["groups"][0]["rules"]}
    deployment = _named(result, DEPLOYMENT)["llm-model-deploy"].outputs["metadata"]["name"]
    assert records["llm_serving:replicas:available"]["expr"] == (
        "sum(max by (deployment) (kube_deployment_status_replicas_available"
        f'{{namespace="llm-serving",deployment="{deployment}"}}))')


def test_one_model_behind_the_gateway_does_not_count_the_router_s_replicas(run):
    """The router (and the endpoint pickers) share the model's namespace: a namespace-wide count
    would read the router's ready pods as the model's, and LlmNoReadyReplica would never fire."""
    from tests.infra.test_gateway import GATEWAY_STACK

    raw = {**GATEWAY_STACK, "models": GATEWAY_STACK["models"][:1],
           "monitoring": {"serviceMonitor": True, "rules": True}}
    result = stack(run, raw)
    [rule] = _named(result, RULE).values()
    records = {r["record"]: r for r in _normalise(rule.inputs)["spec"]["groups"][0]["rules"]}
    deployments = {n: d.outputs["metadata"]["name"] for n, d in _named(result, DEPLOYMENT).items()}
    assert set(deployments) == {"llm-model-deploy", "llm-gateway-router"}
    for record in ("llm_serving:replicas:available", "llm_serving:replicas:desired"):
        assert f'deployment="{deployments["llm-model-deploy"]}"' in records[record]["expr"]
    with pytest.raises(ValueError, match="'deployment'"):
        alert_policy(parse_stack_config(raw), "cluster")


def test_gpu_models_scale_on_their_own_queue(run):
    result = stack(run, GPU_TWO_MODELS)
    scaled = {n: _normalise(r.inputs)["spec"] for n, r in _named(result, SCALED_OBJECT).items()}
    assert set(scaled) == {"llm-autoscaler-scaledobject", "llm-autoscaler-qwen2-5-14b-scaledobject"}
    large = scaled["llm-autoscaler-qwen2-5-14b-scaledobject"]
    assert (large["minReplicaCount"], large["maxReplicaCount"]) == (2, 2)
    queries = [t["metadata"]["query"] for t in large["triggers"]]
    assert queries[0] == ('sum(vllm:num_requests_waiting{namespace="llm-serving",'
                          f'{MODEL_LABEL}="qwen2.5-14b"}})')
    assert large["triggers"][1]["metadata"]["threshold"] == "48"
    # vLLM names the model on its series itself: no relabeling.
    for monitor in _named(result, MONITOR).values():
        assert "relabelings" not in _normalise(monitor.inputs)["spec"]["endpoints"][0]
    gpus = {n: spec(d)["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
            for n, d in _named(result, DEPLOYMENT).items()}
    assert gpus == {"llm-model-deploy": "2", "llm-model-qwen2-5-14b-deploy": "4"}
    [ingress] = _named(result, INGRESS).values()
    assert {p["path"] for p in spec(ingress)["rules"][0]["http"]["paths"]} == {"/v1", "/large/v1"}


def test_one_dashboard_with_a_series_per_model():
    board = build_dashboard(parse_stack_config(TWO_MODELS))
    assert board["title"] == "LLM serving: qwen-small, coder (llm)"
    ttft = next(p for p in board["panels"] if p.get("title") == "Time to first token")
    assert all(f"by (le, {MODEL_LABEL})" in t["expr"] for t in ttft["targets"])
    assert all(t["legendFormat"].startswith("{{" + MODEL_LABEL + "}}") for t in ttft["targets"])
    single = build_dashboard(parse_stack_config({"model": {"id": "m"}}))
    assert MODEL_LABEL not in str(single)
