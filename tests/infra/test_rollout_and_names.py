"""Rollouts never take the last ready replica down unless the stack says so, and names stay
within the limits Helm and the nginx-ingress chart impose."""

from __future__ import annotations

from typing import Any

import pytest

from components.config.parse import ConfigError, parse_stack_config
from components.config.rules import stack_warnings
from tests.infra.conftest import BASE_CONFIG, GPU_CONFIG
from tests.infra.test_components import deploy
from tools import offline


def ready_floor(manifest: dict[str, Any]) -> int:
    """Fewest ready pods during a rollout: replicas - maxUnavailable (surge pods add, never remove)."""
    spec = manifest["spec"]
    return spec["replicas"] - spec["strategy"]["rollingUpdate"]["maxUnavailable"]


def problems_of(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_stack_config(raw)
    return caught.value.problems


def test_a_single_gpu_replica_without_surge_is_refused_naming_the_ways_out():
    [problem] = problems_of({**GPU_CONFIG, "replicas": 1})
    assert problem.startswith("llm-serving:rollout.maxSurge:")
    for way_out in ("replicas to 2", "rollout.maxSurge to 1", "rollout.acceptDowntime"):
        assert way_out in problem


def test_autoscaled_gpu_stack_is_judged_by_its_minimum():
    raw = {**GPU_CONFIG, "autoscaling": {"enabled": True, "minReplicas": 1,
                                         "prometheusUrl": "http://prom:9090"}}
    [problem] = problems_of(raw)
    assert "autoscaling.minReplicas 1" in problem


@pytest.mark.parametrize("overrides", [
    {"replicas": 2},
    {"replicas": 1, "rollout": {"maxSurge": 1}},
], ids=["two-replicas", "spare-gpu"])
def test_gpu_rollouts_keep_a_ready_replica(run, overrides):
    _, manifest = deploy(run, {**GPU_CONFIG, **overrides})
    assert ready_floor(manifest) >= 1


def test_spare_gpu_surges_instead_of_taking_a_pod_down(run):
    _, manifest = deploy(run, {**GPU_CONFIG, "replicas": 1, "rollout": {"maxSurge": 1}})
    assert manifest["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_accepted_downtime_deploys_and_is_warned_about(run):
    raw = {**GPU_CONFIG, "replicas": 1, "rollout": {"acceptDowntime": True}}
    cfg = parse_stack_config(raw)
    [warning] = stack_warnings(cfg)
    assert "rollout.acceptDowntime" in warning and "1800 s" in warning
    _, manifest = deploy(run, raw)
    assert ready_floor(manifest) == 0


def test_default_cpu_stack_surges_and_has_nothing_to_warn_about():
    cfg = parse_stack_config(BASE_CONFIG)
    assert (cfg.rollout_max_surge, cfg.rollout_max_unavailable) == (1, 0)
    assert stack_warnings(cfg) == []


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_stack_files_keep_a_ready_replica_through_a_rollout(stack):
    config, secret_keys = offline.read_stack_file(offline.PROJECT_DIR / f"Pulumi.{stack}.yaml")
    run = offline.run_program(config, secret_keys, stack=stack)
    [deployment] = [r for r in run.resources if r.type == "kubernetes:apps/v1:Deployment"]
    assert ready_floor(offline.to_manifest(deployment)) >= 1


def test_render_prints_the_downtime_warning(tmp_path, capsys):
    from tools import render

    stack_file = tmp_path / "Pulumi.one.yaml"
    stack_file.write_text(
        (offline.PROJECT_DIR / "Pulumi.prod.yaml").read_text().replace(
            "    minReplicas: 2", "    minReplicas: 1"
        ).replace("    preStopSeconds: 10", "    preStopSeconds: 10\n    acceptDowntime: true")
    )
    assert render.render("one", None, stack_file) == 0
    assert "warning: llm-serving:rollout.acceptDowntime" in capsys.readouterr().err


# --- names ------------------------------------------------------------------------------


def test_ingress_class_fits_helm_release_and_controller_service_names():
    ok = "a" * 52
    cfg = parse_stack_config({**BASE_CONFIG, "ingress": {"enabled": True, "className": ok}})
    assert len(f"{cfg.ingress.class_name}-controller") == 63
    [problem] = problems_of({**BASE_CONFIG, "ingress": {"enabled": True, "className": "a" * 53}})
    assert problem.startswith("llm-serving:ingress.className: must be at most 52 characters")
    assert "Helm release" in problem and "Service name" in problem
