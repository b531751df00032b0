"""What the pinned vLLM image, KEDA and pulumi-docker-build accept, held against what the stack
renders: vLLM flags, environment and metric names; KEDA trigger metadata and ScaledObject fields;
the BuildKit secret the image build relies on."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest

from components.config.parse import parse_stack_config
from components.engines import PROFILES
from components.pins import PINNED
from components.resources.deployment import HOME_DIR, RUN_AS_USER
from tests.contracts import facts
from tests.infra.conftest import GPU_CONFIG
from tests.infra.test_traffic_and_scaling import GPU_SCALING, SCALED_OBJECT, stack
from tools import offline

VLLM = facts.pinned("vllm")
KEDA = facts.pinned("keda")
BUILD = facts.pinned("pulumi-docker-build")


# --- vLLM -----------------------------------------------------------------------------------


def _vllm_flags() -> set[str]:
    flags = VLLM["cliFlags"]
    return set(flags["ourFlagsExist"]) | set(flags["otherFlagsExist"])


@pytest.mark.parametrize("extra", [{}, {"maxConcurrency": 64}])
def test_vllm_is_started_only_with_flags_the_pinned_version_has(extra):
    cfg = parse_stack_config({**GPU_CONFIG, "model": {**GPU_CONFIG["model"], **extra}})
    args = PROFILES["vllm"].args(cfg.launch)
    assert args[0] == cfg.model.id  # the positional model_tag
    used = {a for a in args[1:] if a.startswith("--")}
    assert used and used <= _vllm_flags(), used - _vllm_flags()


def test_a_removed_vllm_flag_would_be_caught():
    assert "--disable-log-requests" not in _vllm_flags()


def test_vllm_environment_names_are_ones_the_pinned_version_reads():
    cfg = parse_stack_config(GPU_CONFIG)
    env = PROFILES["vllm"].env(cfg.launch) | {PROFILES["vllm"].api_key_env: "x"}
    known = VLLM["envVars"]
    assert set(env) <= set(known), set(env) - set(known)
    # The proxy keeps idle upstream connections 60 s; vLLM's own default (5 s) is shorter.
    assert known["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"]["default"] < int(env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"])


def _vllm_metric_names() -> dict[str, str]:
    return {m["name"]: m["type"] for m in VLLM["metrics"]["always"]}


def test_autoscaling_reads_gauges_the_pinned_vllm_exports():
    metrics = _vllm_metric_names()
    profile = PROFILES["vllm"]
    assert metrics[profile.waiting_metric] == "gauge"
    assert metrics[profile.running_metric] == "gauge"


def test_the_model_label_is_the_one_the_pinned_vllm_puts_on_every_series():
    """Several models share a namespace: rules, dashboards and KEDA queries tell them apart by
    this label, which vLLM sets to the served name (the server engine gets it from the
    ServiceMonitor)."""
    from components.engines import MODEL_LABEL

    assert MODEL_LABEL in VLLM["metrics"]["labelsDefault"]
    assert "served model name" in VLLM["metrics"]["labelValues"]
    profile = PROFILES["vllm"]
    read = {profile.waiting_metric, profile.running_metric, profile.ttft_histogram,
            profile.e2e_histogram, profile.itl_histogram, profile.kv_cache_metric}
    labelled = {m["name"] for m in VLLM["metrics"]["always"] if MODEL_LABEL in m.get("labels", ())}
    assert read <= labelled
    assert profile.labels_model and not PROFILES["server"].labels_model


def test_vllm_pods_run_as_a_user_without_a_passwd_entry_safely(run):
    """vLLM issue #44548: torch before 2.13 crashes on getpwuid() for such a uid. The pinned
    image's torch has the fix; the pod still sets HOME (writable caches) and USER."""
    image = VLLM["image"]
    torch = tuple(int(x) for x in image["torchVersion"].split(".")[:2])
    assert image["getpwuidIssueAffected"] is (torch < (2, 13))
    result = stack(run, GPU_CONFIG)
    manifest = offline.to_manifest(result.one("kubernetes:apps/v1:Deployment"))
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HOME"] == HOME_DIR and env["USER"]
    assert HOME_DIR in {m["mountPath"] for m in container["volumeMounts"]}
    assert pod["securityContext"]["runAsUser"] == RUN_AS_USER


def test_vllm_readiness_goes_through_the_key_because_v1_is_guarded():
    routes = VLLM["routes"]
    profile = PROFILES["vllm"]
    guarded = any(profile.ready_path.startswith(p) for p in routes["authGuardedPrefixes"])
    assert guarded is profile.ready_path_needs_auth


# --- KEDA -----------------------------------------------------------------------------------


def test_scaled_object_triggers_use_only_keys_keda_reads(run):
    result = stack(run, GPU_SCALING)
    spec = offline._normalise(result.one(SCALED_OBJECT).inputs)["spec"]
    keys = KEDA["prometheusTriggerMetadata"]["keys"]
    required = {k for k, v in keys.items() if v["required"]}
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus"
        assert set(trigger["metadata"]) <= set(keys), set(trigger["metadata"]) - set(keys)
        assert required <= set(trigger["metadata"])
        # Trigger metadata is map[string]string: numbers must be written as strings.
        assert all(isinstance(v, str) for v in trigger["metadata"].values())
        # Not a PromQL filter (it only goes into the query URL): the query names the namespace.
        assert 'namespace="' in trigger["metadata"]["query"]
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert set(spec) <= set(KEDA["scaledObjectSpec"]) | {"scaleTargetRef", "triggers"}


def test_keda_release_is_the_pinned_chart(run):
    result = stack(run, GPU_SCALING)
    [release] = [r for r in result.mocks.of_type("kubernetes:helm.sh/v3:Release")
                 if r.inputs["chart"] == "keda"]
    assert release.inputs["version"] == KEDA["chart"]["version"] == PINNED["keda"]


# --- pulumi-docker-build --------------------------------------------------------------------


def test_installed_docker_build_sdk_is_the_one_whose_facts_we_hold():
    assert metadata.version("pulumi-docker-build") == BUILD["version"]
    requirements = (Path(offline.PROJECT_DIR) / "requirements.txt").read_text()
    assert re.search(rf"^pulumi-docker-build=={re.escape(BUILD['version'])}$", requirements, re.M)


def test_build_secrets_are_secret_in_the_provider_schema():
    assert "secrets" in BUILD["imageArgs"]
    assert "secret" in BUILD["sources"]["secretProps"]
