"""The stack configuration parser: defaults, coercion, and errors that name the key."""

from __future__ import annotations

import json
from typing import Any

import pulumi
import pytest

from components.config.parse import ConfigError, parse_stack_config
from components.config.pulumi_source import load_stack_config
from tests.infra.conftest import BASE_CONFIG, GPU_CONFIG


def merged(**overrides: Any) -> dict[str, Any]:
    return {**BASE_CONFIG, **overrides}


def problems_of(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_stack_config(raw)
    return caught.value.problems


def test_defaults_come_from_one_place():
    cfg = parse_stack_config(BASE_CONFIG)
    assert cfg.engine == "server"
    assert cfg.replicas == 1
    assert cfg.service_type == "LoadBalancer"
    assert cfg.model.served == "Qwen/Qwen2.5-0.5B-Instruct"
    assert cfg.gpu.count == 0


def test_values_arrive_as_json_text_like_pulumi_passes_them():
    cfg = parse_stack_config(
        {"model": json.dumps({"id": "m", "maxOutputTokens": 64}), "replicas": "3"}
    )
    assert cfg.model.max_output_tokens == 64
    assert cfg.replicas == 3


def test_config_is_frozen():
    cfg = parse_stack_config(BASE_CONFIG)
    with pytest.raises(Exception):
        cfg.replicas = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    "raw, key, allowed",
    [
        (merged(replcas=2), "llm-serving:replcas", "replicas"),
        (merged(model={"id": "m", "maxTokens": 5}), "llm-serving:model.maxTokens", "maxOutputTokens"),
        (merged(gpu={"count": 0, "tolerations": [{"key": "a", "efect": "NoSchedule"}]}),
         "llm-serving:gpu.tolerations[0].efect", "effect"),
    ],
)
def test_unknown_keys_are_rejected_with_the_allowed_ones(raw, key, allowed):
    [problem] = problems_of(raw)
    assert problem.startswith(f"{key}: unknown key")
    assert allowed in problem.split("allowed keys here:")[1]
    # The nearest allowed key is suggested first.
    assert problem.startswith(f"{key}: unknown key (did you mean '{allowed}'?); ")


@pytest.mark.parametrize(
    "raw, suggested",
    [
        (merged(autoscaling={"minreplicas": 1}), "minReplicas"),  # case only
        (merged(ingress={"controler": {}}), "controller"),
        (merged(hftoken="x"), "hfToken"),  # a secret key is a key too
    ],
)
def test_an_unknown_key_names_the_nearest_allowed_one(raw, suggested):
    [problem] = problems_of(raw)
    assert f"(did you mean '{suggested}'?)" in problem


def test_an_unknown_key_like_no_allowed_one_gets_no_suggestion():
    [problem] = problems_of(merged(zzqqxx=1))
    assert problem.startswith("llm-serving:zzqqxx: unknown key; allowed keys here: ")


@pytest.mark.parametrize(
    "raw, key, hint",
    [
        (merged(replicas="two"), "llm-serving:replicas", "integer"),
        (merged(replicas=-1), "llm-serving:replicas", "greater than or equal to 0"),
        (merged(engine="tgi"), "llm-serving:engine", "'server' or 'vllm'"),
        ({"replicas": 1}, "llm-serving:model", "required"),
        ({"model": {"revision": "main"}}, "llm-serving:model.id", "required"),
        ({"model": {"id": ""}}, "llm-serving:model.id", "at least 1 character"),
        (merged(resources={"requests": {"cpu": "lots"}}), "llm-serving:resources.requests.cpu", "500m"),
        (merged(resources={"limits": {"memory": "4GB"}}), "llm-serving:resources.limits.memory", "16Gi"),
        (merged(namespace="LLM_Prod"), "llm-serving:namespace", "DNS-1123"),
        (merged(service={"port": 70000}), "llm-serving:service.port", "less than or equal to 65535"),
        (merged(service={"sourceRanges": ["10.0.0.0/33"]}), "llm-serving:service.sourceRanges[0]", "CIDR"),
        (merged(labels={"team": "a b"}), "llm-serving:labels", "label value"),
        (merged(gpu={"tolerations": [{"key": "k", "effect": "Sometimes"}]}),
         "llm-serving:gpu.tolerations[0].effect", "NoSchedule"),
        (merged(gpu={"tolerations": "nvidia.com/gpu"}), "llm-serving:gpu.tolerations", "tuple"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(raw, key, hint):
    problems = problems_of(raw)
    assert any(p.startswith(f"{key}:") and hint in p for p in problems), problems


@pytest.mark.parametrize(
    "raw, key, hint",
    [
        (merged(gpu={"count": 1}), "llm-serving:gpu.count", "CPU only"),
        ({**GPU_CONFIG, "gpu": {"count": 0}}, "llm-serving:gpu.count", "at least 1 GPU"),
        (merged(modelCache={"type": "baked"}, image={"build": False, "reference": "x:1"}),
         "llm-serving:modelCache.type", "image.build"),
        (merged(image={"build": False}), "llm-serving:image.reference", "no published image"),
        (merged(image={"build": False, "reference": "x:1", "push": True}), "llm-serving:image.push", "built"),
        (merged(model={"id": "m", "maxContextLength": 512, "maxOutputTokens": 512}),
         "llm-serving:model.maxOutputTokens", "below model.maxContextLength"),
        (merged(resources={"requests": {"memory": "8Gi"}, "limits": {"memory": "4Gi"}}),
         "llm-serving:resources.requests.memory", "exceeds"),
        (merged(resources={"requests": {"cpu": "2500m"}, "limits": {"cpu": "2"}}),
         "llm-serving:resources.requests.cpu", "exceeds"),
        (merged(gpu={"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}),
         "llm-serving:gpu.tolerations[0].value", "Exists"),
        (merged(gpu={"tolerations": [{"operator": "Equal", "value": "v"}]}),
         "llm-serving:gpu.tolerations[0].key", "required"),
        (merged(gpu={"tolerations": [{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 5}]}),
         "llm-serving:gpu.tolerations[0].tolerationSeconds", "NoExecute"),
        (merged(autoscaling={"enabled": True, "runningAverageSeconds": 20},
                monitoring={"intervalSeconds": 15}),
         "llm-serving:autoscaling.runningAverageSeconds", "at least 30"),
    ],
)
def test_rules_across_sections_name_the_key_to_change(raw, key, hint):
    problems = problems_of(raw)
    assert any(p.startswith(f"{key}:") and hint in p for p in problems), problems


def test_every_problem_is_reported_at_once():
    problems = problems_of(merged(replicas=-1, engine="tgi", bogus=1))
    assert {p.split(":")[1] for p in problems} == {"replicas", "engine", "bogus"}


def test_a_gpu_stack_parses():
    cfg = parse_stack_config(GPU_CONFIG)
    assert cfg.profile.uses_gpus and cfg.gpu.count == 2
    assert cfg.gpu.tolerations[0].operator == "Exists"


def test_secrets_must_be_set_as_pulumi_secrets(mocks):
    pulumi.runtime.set_all_config(
        {"llm-serving:model": json.dumps({"id": "m"}), "llm-serving:apiKey": "plain-text-key-" * 3}, []
    )
    with pytest.raises(ConfigError) as caught:
        load_stack_config()
    assert caught.value.problems == [
        "llm-serving:apiKey: holds a secret; set it with `pulumi config set --secret apiKey ...`"
    ]


@pytest.mark.parametrize("key", ["zq", "s3cr3t", "k" * 31, " " * 40 + "short"])
def test_short_api_key_is_refused_without_showing_it(mocks, key):
    pulumi.runtime.set_all_config(
        {"llm-serving:model": json.dumps({"id": "m"}), "llm-serving:apiKey": key},
        ["llm-serving:apiKey"],
    )
    with pytest.raises(ConfigError) as caught:
        load_stack_config()
    (problem,) = caught.value.problems
    assert problem.startswith("llm-serving:apiKey: must be at least 32 characters")
    assert f"(got {len(key.strip())})" in problem
    assert key.strip() not in problem


def test_api_key_of_the_minimum_length_is_accepted(mocks):
    pulumi.runtime.set_all_config(
        {"llm-serving:model": json.dumps({"id": "m"}), "llm-serving:apiKey": "k" * 32},
        ["llm-serving:apiKey"],
    )
    _, secrets = load_stack_config()
    assert isinstance(secrets.api_key, pulumi.Output)


def test_secret_values_stay_outputs_and_never_enter_the_model(mocks):
    pulumi.runtime.set_all_config(
        {"llm-serving:model": json.dumps({"id": "m"}), "llm-serving:hfToken": "hf_x"},
        ["llm-serving:hfToken"],
    )
    cfg, secrets = load_stack_config()
    assert "hf_x" not in cfg.model_dump_json()
    assert isinstance(secrets.hf_token, pulumi.Output)
    assert secrets.api_key is None


def test_config_errors_print_without_a_traceback(mocks):
    # Pulumi prints a RunError's message alone; anything else gets a stack trace. The parser
    # itself stays free of the Pulumi SDK: only the program's loader raises a RunError.
    assert not issubclass(ConfigError, pulumi.RunError)
    pulumi.runtime.set_all_config({"llm-serving:model": json.dumps({"id": "m", "typo": 1})}, [])
    with pytest.raises(ConfigError) as caught:
        load_stack_config()
    assert isinstance(caught.value, pulumi.RunError)
    assert "llm-serving:model.typo: unknown key" in str(caught.value)


def test_secret_keys_reported_through_the_environment_count_as_secrets(mocks, monkeypatch):
    monkeypatch.setenv("PULUMI_CONFIG_SECRET_KEYS", json.dumps(["llm-serving:apiKey"]))
    pulumi.runtime.set_all_config(
        {"llm-serving:model": json.dumps({"id": "m"}), "llm-serving:apiKey": "k" * 40}, []
    )
    _, secrets = load_stack_config()
    assert isinstance(secrets.api_key, pulumi.Output)
