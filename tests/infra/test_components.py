"""Each component's behaviour under Pulumi mocks."""

from __future__ import annotations

import json
from typing import Any

import pulumi
import pytest

from components.config.parse import parse_stack_config
from components.config.pulumi_source import Secrets
from components.engines import VLLM_IMAGE
from components.resources.api_key import ApiKey
from components.resources.deployment import (
    RUN_AS_USER,
    LlmDeployment,
    selector_labels,
    startup_failure_threshold,
)
from components.resources.image import LlmImage
from components.resources.service import LlmService, external_address
from components.resources.stack import LlmStack
from tests.infra.conftest import BASE_CONFIG, GPU_CONFIG, Run
from tools import offline
from tools.offline import FAKE_LB_IP, _normalise

DEPLOYMENT = "kubernetes:apps/v1:Deployment"
SERVICE = "kubernetes:core/v1:Service"
SECRET = "kubernetes:core/v1:Secret"


def deploy(run, raw: dict[str, Any], **extra: Any) -> tuple[Run, dict[str, Any]]:
    cfg = parse_stack_config(raw)

    def build():
        component = LlmDeployment(
            "llm",
            {
                "config": cfg,
                "namespace": "ns",
                "image": "registry.example/llm@sha256:abc",
                "api_key_secret": "api-secret",
                **extra,
            },
        )
        return {"name": component.deployment_name}

    result = run(build)
    manifest = _normalise(result.one(DEPLOYMENT).inputs)
    return result, manifest


def container_of(manifest: dict[str, Any]) -> dict[str, Any]:
    [container] = manifest["spec"]["template"]["spec"]["containers"]
    return container


# --- LlmDeployment ----------------------------------------------------------------


def test_gpu_requests_equal_limits_and_pods_land_on_gpu_nodes(run):
    _, manifest = deploy(run, GPU_CONFIG)
    resources = container_of(manifest)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "2"
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    pod = manifest["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["runtimeClassName"] == "nvidia"


def test_amd_gpus_use_their_own_resource_key(run):
    raw = {**GPU_CONFIG, "gpu": {"count": 1, "resource": "amd.com/gpu"}}
    _, manifest = deploy(run, raw)
    limits = container_of(manifest)["resources"]["limits"]
    assert limits["amd.com/gpu"] == "1" and "nvidia.com/gpu" not in limits


def test_cpu_pods_request_no_gpu_and_get_no_shared_memory_volume(run):
    _, manifest = deploy(run, BASE_CONFIG)
    resources = container_of(manifest)["resources"]
    assert not any("gpu" in k for k in {**resources["requests"], **resources["limits"]})
    volumes = {v["name"] for v in manifest["spec"]["template"]["spec"]["volumes"]}
    assert "dshm" not in volumes


def test_rollout_never_waits_for_a_gpu_that_does_not_exist(run):
    _, gpu = deploy(run, GPU_CONFIG)
    assert gpu["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_cpu_rollout_surges_and_keeps_every_replica_serving(run):
    _, cpu = deploy(run, BASE_CONFIG)
    assert cpu["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


@pytest.mark.parametrize("raw", [BASE_CONFIG, GPU_CONFIG], ids=["server", "vllm"])
def test_startup_budget_covers_the_model_load_budget(run, raw):
    cfg = parse_stack_config(raw)
    _, manifest = deploy(run, raw)
    probe = container_of(manifest)["startupProbe"]
    budget = probe["periodSeconds"] * probe["failureThreshold"] + probe.get("initialDelaySeconds", 0)
    assert budget >= cfg.model.load_timeout_seconds
    assert manifest["spec"]["progressDeadlineSeconds"] > cfg.model.load_timeout_seconds


def test_startup_threshold_rounds_up():
    assert startup_failure_threshold(901) == 91


def test_server_readiness_means_the_model_serves_and_liveness_only_asks_if_alive(run):
    _, manifest = deploy(run, BASE_CONFIG)
    container = container_of(manifest)
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"


def test_vllm_readiness_asks_v1_models_with_the_key_from_the_environment(run):
    _, manifest = deploy(run, GPU_CONFIG)
    container = container_of(manifest)
    command = container["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["python3", "-c"]
    assert "/v1/models" in command[2] and "os.environ['VLLM_API_KEY']" in command[2]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # The probe script must at least be valid Python.
    compile(command[2], "<probe>", "exec")


def test_pods_run_restricted(run):
    _, manifest = deploy(run, GPU_CONFIG)
    pod = manifest["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = container_of(manifest)["securityContext"]
    assert container == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }
    mounts = {m["mountPath"] for m in container_of(manifest)["volumeMounts"]}
    assert {"/tmp", "/home/llm", "/dev/shm"} <= mounts


def test_api_key_and_hf_token_come_from_secrets_never_literal(run):
    _, manifest = deploy(run, GPU_CONFIG, hf_token_secret="hf-secret")
    env = {e["name"]: e for e in container_of(manifest)["env"]}
    assert env["VLLM_API_KEY"] == {
        "name": "VLLM_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "api-secret", "key": "api-key"}},
    }
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-secret", "key": "token"}
    assert all("value" not in e for e in env.values() if "valueFrom" in e)


def test_no_hf_token_env_without_a_token(run):
    _, manifest = deploy(run, BASE_CONFIG)
    assert "HF_TOKEN" not in {e["name"] for e in container_of(manifest)["env"]}


def test_server_engine_gets_its_settings_contract(run):
    raw = {**BASE_CONFIG, "model": {"id": "m", "maxOutputTokens": 100, "servedName": "chat"}}
    _, manifest = deploy(run, raw)
    env = {e["name"]: e.get("value") for e in container_of(manifest)["env"]}
    assert env["LLM_MODEL"] == "m"
    assert env["LLM_SERVED_MODEL_NAME"] == "chat"
    assert env["LLM_MAX_TOKENS"] == "100"
    assert env["LLM_DRAIN_SECONDS"] == "60"
    assert "command" not in container_of(manifest)  # the image's uvicorn command


def test_vllm_gets_model_and_tensor_parallelism_as_arguments(run):
    _, manifest = deploy(run, GPU_CONFIG)
    container = container_of(manifest)
    assert container["command"] == ["vllm", "serve"]
    args = container["args"]
    assert args[0] == "Qwen/Qwen2.5-7B-Instruct"
    assert args[args.index("--tensor-parallel-size") + 1] == "2"


def test_grace_period_covers_the_drain(run):
    cfg = parse_stack_config(BASE_CONFIG)
    _, manifest = deploy(run, BASE_CONFIG)
    pod = manifest["spec"]["template"]["spec"]
    pause = container_of(manifest)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pause == cfg.rollout.pre_stop_seconds
    assert pod["terminationGracePeriodSeconds"] >= pause + cfg.rollout.drain_seconds


def test_an_engine_that_does_not_drain_keeps_serving_through_the_pre_stop_pause(run):
    _, manifest = deploy(run, GPU_CONFIG)
    pause = container_of(manifest)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pause == 7 + 90
    assert manifest["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > pause


def test_pvc_cache_is_mounted_and_not_awaited(run):
    raw = {**BASE_CONFIG, "modelCache": {"type": "pvc", "size": "30Gi", "storageClass": "fast"}}
    result, manifest = deploy(run, raw)
    claim = _normalise(result.one("kubernetes:core/v1:PersistentVolumeClaim").inputs)
    assert claim["spec"]["resources"]["requests"]["storage"] == "30Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    assert claim["metadata"]["annotations"]["pulumi.com/skipAwait"] == "true"
    volumes = {v["name"]: v for v in manifest["spec"]["template"]["spec"]["volumes"]}
    claim_name = result.one("kubernetes:core/v1:PersistentVolumeClaim").outputs["metadata"]["name"]
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == claim_name


def test_baked_weights_run_offline_without_a_cache_volume(run):
    raw = {**BASE_CONFIG, "modelCache": {"type": "baked"}}
    result, manifest = deploy(run, raw)
    assert not result.mocks.of_type("kubernetes:core/v1:PersistentVolumeClaim")
    env = {e["name"]: e.get("value") for e in container_of(manifest)["env"]}
    assert env["HF_HUB_OFFLINE"] == "1"
    assert "model-cache" not in {v["name"] for v in manifest["spec"]["template"]["spec"]["volumes"]}


def test_selector_uses_only_stable_labels(run):
    raw = {**BASE_CONFIG, "labels": {"team": "ml"}}
    _, manifest = deploy(run, raw, labels={"team": "ml"})
    assert manifest["spec"]["selector"]["matchLabels"] == selector_labels("llm")
    assert manifest["spec"]["template"]["metadata"]["labels"]["team"] == "ml"


def test_image_content_id_rolls_pods_on_rebuild(run):
    _, manifest = deploy(run, BASE_CONFIG, image_content_id="sha256:1234")
    annotations = manifest["spec"]["template"]["metadata"]["annotations"]
    assert annotations["llm-serving/image-content-id"] == "sha256:1234"


# --- LlmService -------------------------------------------------------------------


def service(run, **args: Any) -> Run:
    def build():
        svc = LlmService("api", {"namespace": "ns", "selector": {"a": "b"}, "port": 80, **args})
        return {"endpoint": svc.endpoint, "address": svc.address}

    return run(build)


def test_load_balancer_service_exposes_the_external_address(run):
    result = service(run)
    spec = _normalise(result.one(SERVICE).inputs)["spec"]
    assert spec["type"] == "LoadBalancer"
    assert spec["selector"] == {"a": "b"}
    assert spec["ports"][0]["targetPort"] == "http"
    assert result.values["address"] == FAKE_LB_IP
    assert result.values["endpoint"] == f"http://{FAKE_LB_IP}/v1"


def test_cluster_ip_service_is_addressed_by_cluster_dns(run):
    result = service(run, type="ClusterIP", port=8080)
    name = result.one(SERVICE).outputs["metadata"]["name"]
    assert result.values["endpoint"] == f"http://{name}.ns.svc.cluster.local:8080/v1"


def test_source_ranges_restrict_a_load_balancer(run):
    result = service(run, source_ranges=["203.0.113.0/24"])
    spec = _normalise(result.one(SERVICE).inputs)["spec"]
    assert spec["loadBalancerSourceRanges"] == ["203.0.113.0/24"]


@pytest.mark.parametrize(
    "args, message",
    [({"type": "ExternalName"}, "'type'"), ({"port": 0}, "'port'"),
     ({"type": "ClusterIP", "source_ranges": ["0.0.0.0/0"]}, "'source_ranges'")],
)
def test_service_rejects_bad_inputs(mocks, args, message):
    with pytest.raises(ValueError, match=message):
        LlmService("api", {"namespace": "ns", "selector": {}, "port": 80, **args})


def test_external_address_prefers_ip_then_hostname():
    assert external_address({"loadBalancer": {"ingress": [{"hostname": "lb.example"}]}}) == "lb.example"
    assert external_address({"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}) == "198.51.100.1"
    assert external_address({"loadBalancer": {}}) is None


# --- ApiKey -------------------------------------------------------------------------


def test_generated_api_key_is_random_secret_and_stored_in_a_kubernetes_secret(run):
    def build():
        key = ApiKey("key", {"namespace": "ns"})
        return {"value": key.value, "secret": key.secret_name}

    result = run(build)
    password = result.one("random:index/randomPassword:RandomPassword")
    assert password.inputs["length"] == 48 and password.inputs["special"] is False
    assert "value" in result.secrets
    assert result.values["value"] == password.outputs["result"]
    stored = result.one(SECRET)
    assert stored.inputs["stringData"]["api-key"] == result.values["value"]
    assert result.values["secret"] == stored.outputs["metadata"]["name"]


def test_given_api_key_is_used_and_nothing_is_generated(run):
    def build():
        key = ApiKey("key", {"namespace": "ns", "value": pulumi.Output.secret("given-key-" + "x" * 30)})
        return {"value": key.value}

    result = run(build)
    assert not result.mocks.of_type("random:index/randomPassword:RandomPassword")
    assert result.values["value"].startswith("given-key-")
    assert "value" in result.secrets


def test_short_generated_keys_are_refused(mocks):
    with pytest.raises(ValueError, match="'length'"):
        ApiKey("key", {"namespace": "ns", "length": 8})


# --- LlmImage ---------------------------------------------------------------------


def image(run, **args: Any) -> Run:
    def build():
        img = LlmImage("img", {"build": True, "image_name": "ghcr.io/acme/llm:v1",
                               "context": "server", **args})
        return {"ref": img.ref, "content": img.content_id}

    return run(build)


def test_pushed_image_is_referenced_by_digest(run):
    result = image(run, push=True, build_args={"MODEL_ID": "m"}, platform="linux/amd64")
    built = result.one("docker:index/image:Image")
    assert built.inputs["skipPush"] is False
    assert built.inputs["build"]["args"] == {"MODEL_ID": "m"}
    assert built.inputs["build"]["platform"] == "linux/amd64"
    assert result.values["ref"] == built.outputs["repoDigest"]
    assert result.values["ref"].startswith("ghcr.io/acme/llm@sha256:")


def test_unpushed_image_runs_its_tag_and_carries_its_content_id(run):
    result = image(run, push=False)
    built = result.one("docker:index/image:Image")
    assert built.inputs["skipPush"] is True
    assert result.values["ref"] == "ghcr.io/acme/llm:v1"
    assert result.values["content"] == built.outputs["repoDigest"]


def test_prebuilt_image_passes_through_untouched(run):
    def build():
        img = LlmImage("img", {"build": False, "reference": "vllm/vllm-openai:v0.33.0"})
        return {"ref": img.ref}

    result = run(build)
    assert not result.mocks.of_type("docker:index/image:Image")
    assert result.values["ref"] == "vllm/vllm-openai:v0.33.0"


@pytest.mark.parametrize("args", [{"build": False}, {"build": True, "context": "server"}])
def test_image_rejects_missing_inputs(mocks, args):
    with pytest.raises(ValueError, match="required"):
        LlmImage("img", args)


# --- LlmStack ---------------------------------------------------------------------


def stack(run, raw: dict[str, Any], secrets: Secrets | None = None) -> Run:
    cfg = parse_stack_config(raw)

    def build():
        s = LlmStack("llm", {"config": cfg, "secrets": secrets or Secrets()})
        return {"endpoint": s.endpoint, "api_key": s.api_key, "image": s.image, "ns": s.namespace}

    return run(build)


def test_stack_wires_namespace_secret_deployment_and_service(run):
    result = stack(run, {**BASE_CONFIG, "namespace": "team-a", "labels": {"team": "a"}})
    namespace = result.one("kubernetes:core/v1:Namespace")
    assert namespace.inputs["metadata"]["name"] == "team-a"
    assert namespace.inputs["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    deployment = _normalise(result.one(DEPLOYMENT).inputs)
    assert deployment["metadata"]["namespace"] == "team-a"
    assert deployment["metadata"]["labels"]["team"] == "a"
    secret_name = result.one(SECRET).outputs["metadata"]["name"]
    env = {e["name"]: e for e in container_of(deployment)["env"]}
    assert env["LLM_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == secret_name
    # The Service selects exactly the Deployment's pods.
    service_spec = result.one(SERVICE).inputs["spec"]
    assert service_spec["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert result.values["endpoint"] == f"http://{FAKE_LB_IP}/v1"
    assert result.values["ns"] == "team-a"
    assert "api_key" in result.secrets


def test_stack_never_puts_a_secret_value_in_a_pod_spec(run):
    secrets = Secrets(api_key=pulumi.Output.secret("k" * 40), hf_token=pulumi.Output.secret("hf_abc"))
    result = stack(run, BASE_CONFIG, secrets)
    text = json.dumps(result.one(DEPLOYMENT).inputs)
    assert "k" * 40 not in text and "hf_abc" not in text
    hf = [r for r in result.mocks.of_type(SECRET) if "token" in r.inputs.get("stringData", {})]
    assert len(hf) == 1 and hf[0].inputs["stringData"]["token"] == "hf_abc"


def test_stack_builds_the_engines_dockerfile_and_bakes_weights_when_asked(run):
    raw = {**GPU_CONFIG, "modelCache": {"type": "baked"},
           "image": {"registry": "ghcr.io/acme", "push": True, "baseImage": "vllm/vllm-openai:v0.33.0"}}
    result = stack(run, raw)
    built = result.one("docker:index/image:Image")
    assert built.inputs["build"]["dockerfile"] == "server/Dockerfile.vllm"
    assert built.inputs["build"]["args"] == {
        "BASE_IMAGE": "vllm/vllm-openai:v0.33.0",
        "MODEL_ID": "Qwen/Qwen2.5-7B-Instruct",
        "MODEL_REVISION": "main",
    }
    assert result.values["image"].startswith("ghcr.io/acme/llm-server@sha256:")


def test_stack_runs_the_official_vllm_image_when_not_building(run):
    result = stack(run, {**GPU_CONFIG, "image": {"build": False}})
    assert not result.mocks.of_type("docker:index/image:Image")
    assert container_of(_normalise(result.one(DEPLOYMENT).inputs))["image"] == "vllm/vllm-openai:v0.33.0"


def test_children_are_parented_under_the_stack_component(run):
    result = stack(run, BASE_CONFIG)
    names = {r.name for r in result.mocks.resources}
    assert {"llm", "llm-model", "llm-api", "llm-image", "llm-api-key"} <= names
    assert all(r.name.startswith("llm") for r in result.mocks.resources)


def test_vllm_builds_on_the_pinned_base_unless_told_otherwise(run):
    result = stack(run, {**GPU_CONFIG, "image": {"registry": "ghcr.io/acme", "push": True}})
    built = result.one("docker:index/image:Image")
    assert built.inputs["build"]["args"]["BASE_IMAGE"] == VLLM_IMAGE


def test_vllm_dockerfile_default_base_matches_the_engine_profile():
    dockerfile = (offline.PROJECT_DIR / "server" / "Dockerfile.vllm").read_text()
    assert f"ARG BASE_IMAGE={VLLM_IMAGE}" in dockerfile


def test_server_dockerfile_runs_as_the_user_the_pod_expects():
    dockerfile = (offline.PROJECT_DIR / "server" / "Dockerfile").read_text()
    assert f"--uid {RUN_AS_USER}" in dockerfile
    assert f"USER {RUN_AS_USER}" in dockerfile
    assert 'CMD ["uvicorn", "server:app"' in dockerfile


def test_concurrency_limit_reaches_each_engine_in_its_own_words(run):
    _, server = deploy(run, {**BASE_CONFIG, "model": {"id": "m", "maxConcurrency": 4}})
    env = {e["name"]: e.get("value") for e in container_of(server)["env"]}
    assert env["LLM_MAX_CONCURRENCY"] == "4"


def test_vllm_concurrency_limit_is_max_num_seqs(run):
    raw = {**GPU_CONFIG, "model": {"id": "m", "maxConcurrency": 64, "extraArgs": ["--enforce-eager"]}}
    _, manifest = deploy(run, raw)
    args = container_of(manifest)["args"]
    assert args[args.index("--max-num-seqs") + 1] == "64"
    assert args[-1] == "--enforce-eager"


@pytest.mark.parametrize(
    "raw, variable",
    [(BASE_CONFIG, "UVICORN_TIMEOUT_KEEP_ALIVE"), (GPU_CONFIG, "VLLM_HTTP_TIMEOUT_KEEP_ALIVE")],
    ids=["server", "vllm"],
)
def test_engines_keep_idle_connections_longer_than_the_proxy(run, raw, variable):
    # nginx keeps idle upstream connections 60 s; the server must not close first.
    _, manifest = deploy(run, raw)
    env = {e["name"]: e.get("value") for e in container_of(manifest)["env"]}
    assert int(env[variable]) > 60
