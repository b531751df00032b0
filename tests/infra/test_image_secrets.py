"""A gated model's weights are baked with the Hugging Face token as a BuildKit secret: passed to
the build as a Pulumi secret, never a build argument, never in any plain output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pulumi
import pytest

from components.config.parse import parse_stack_config
from components.config.pulumi_source import Secrets
from components.resources.image import HF_TOKEN_BUILD_SECRET, LlmImage
from tests.infra.conftest import GPU_CONFIG
from tests.infra.test_components import stack
from tools import offline

BUILDKIT = "docker-build:index:Image"
LEGACY = "docker:index/image:Image"
TOKEN = "hf_gated_0123456789abcdef"
GATED_BAKED = {**GPU_CONFIG, "modelCache": {"type": "baked"},
               "image": {"registry": "ghcr.io/acme", "push": True}}


def test_gated_baked_build_passes_the_token_as_a_buildkit_secret(run):
    result = stack(run, GATED_BAKED, Secrets(hf_token=pulumi.Output.secret(TOKEN)))
    assert not result.mocks.of_type(LEGACY)
    built = result.one(BUILDKIT)
    assert built.inputs["secrets"] == {HF_TOKEN_BUILD_SECRET: TOKEN}
    # It reached the provider as a Pulumi secret, so state keeps it encrypted.
    assert "secrets" in built.secret_paths
    assert TOKEN not in json.dumps(built.inputs["buildArgs"])
    assert built.inputs["dockerfile"] == {"location": "server/Dockerfile.vllm"}
    assert result.values["image"].startswith("ghcr.io/acme/llm-server:latest@sha256:")


def test_the_token_appears_in_no_plain_input_or_output(run):
    result = stack(run, GATED_BAKED, Secrets(hf_token=pulumi.Output.secret(TOKEN)))
    for resource in result.mocks.resources:
        plain = {k: v for k, v in resource.inputs.items() if k not in _secret_roots(resource)}
        assert TOKEN not in json.dumps(plain, default=str), resource.name
    assert all(TOKEN not in json.dumps(v, default=str) for v in result.values.values())


def _secret_roots(resource: offline.Recorded) -> set[str]:
    return {re.split(r"[.\[]", path)[0] for path in resource.secret_paths}


def test_without_a_token_the_plain_builder_is_used(run):
    result = stack(run, GATED_BAKED)
    assert not result.mocks.of_type(BUILDKIT)
    assert result.one(LEGACY).inputs["build"]["args"]["MODEL_ID"] == "Qwen/Qwen2.5-7B-Instruct"


def test_a_token_without_baked_weights_is_not_sent_to_the_build(run):
    raw = {**GPU_CONFIG, "image": {"registry": "ghcr.io/acme", "push": True}}
    result = stack(run, raw, Secrets(hf_token=pulumi.Output.secret(TOKEN)))
    assert not result.mocks.of_type(BUILDKIT)  # the pods download with the token instead


def test_unpushed_secret_build_loads_into_the_local_daemon(run):
    def build():
        img = LlmImage("img", {"build": True, "image_name": "llm:dev", "context": "server",
                               "build_secrets": {"hf_token": pulumi.Output.secret(TOKEN)}})
        return {"ref": img.ref, "content": img.content_id}

    result = run(build)
    built = result.one(BUILDKIT)
    assert built.inputs["push"] is False and built.inputs["load"] is True
    assert result.values["ref"] == "llm:dev"
    assert result.values["content"] == built.outputs["contextHash"]


def test_secrets_without_a_build_are_refused(mocks):
    with pytest.raises(ValueError, match="build_secrets"):
        LlmImage("img", {"build": False, "reference": "x:1", "build_secrets": {"hf_token": "t"}})


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.vllm"])
def test_dockerfiles_mount_the_secret_id_the_build_passes(dockerfile):
    text = (Path(offline.PROJECT_DIR) / "server" / dockerfile).read_text()
    assert f"--mount=type=secret,id={HF_TOKEN_BUILD_SECRET}" in text
    assert "ARG HF_TOKEN" not in text  # never a build argument


def test_parser_accepts_gated_baked_stacks():
    assert parse_stack_config(GATED_BAKED).model_cache.type == "baked"
