"""The rendered rules, for both engines and both targets, under the real promtool.

`promtool check rules` parses them; `promtool test rules` runs one firing and
one resolving case per alert (tests/observability/promtool_cases.py). An alert
without a case, or one that does not fire on its case, fails here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.config.parse import parse_stack_config
from components.policies.alerting import (
    AlertPolicy,
    alert_policy,
    alerting_rules,
    rule_groups,
    rules_file,
)
from tests.observability.promtool_cases import SCENARIOS, promtool_tests

PROMTOOL = shutil.which("promtool")
# Skipped on a laptop without promtool; never in CI, where .ci/run installs it
# and a missing binary must fail rather than hide untested rules.
pytestmark = pytest.mark.skipif(
    PROMTOOL is None and not os.environ.get("CI"),
    reason="promtool not installed (Debian: apt-get install prometheus)",
)

SERVER = {"model": {"id": "Qwen/Qwen2.5-0.5B-Instruct"}, "namespace": "llm-dev",
          "autoscaling": {"enabled": True, "maxReplicas": 3}}
VLLM = {
    "engine": "vllm", "namespace": "llm-prod", "gpu": {"count": 1},
    "model": {"id": "Qwen/Qwen2.5-7B-Instruct", "servedName": "qwen2.5-7b"},
    "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 4, "targetWaitingPerReplica": 3,
                    "prometheusUrl": "http://prometheus:9090"},
    "monitoring": {"slo": {"ttftP99Seconds": 1.5, "forMinutes": 3, "windowMinutes": 2}},
}
CASES = [(e, t) for e in ("server", "vllm") for t in ("cluster", "local")]
VLLM_TWO = {k: v for k, v in VLLM.items() if k != "model"} | {
    "models": [{"id": "Qwen/Qwen2.5-7B-Instruct", "servedName": "qwen2.5-7b"},
               {"id": "Qwen/Qwen2.5-14B-Instruct", "servedName": "qwen2.5-14b",
                "autoscaling": {"maxReplicas": 3}}],
    "ingress": {"enabled": True},
}
"""Two models in one namespace: one policy per model (its view)."""


def _policy(engine: str, target: str) -> AlertPolicy:
    return alert_policy(parse_stack_config(SERVER if engine == "server" else VLLM), target)


def _model_policy(index: int) -> AlertPolicy:
    view = parse_stack_config(VLLM_TWO).for_model(index)
    return alert_policy(view, "cluster", deployment=f"llm-model-{index}-deploy-0a1b2c3d")


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def _write(tmp_path: Path, policy: AlertPolicy, groups: list[dict[str, Any]] | None = None) -> Path:
    rules = tmp_path / "rules.yml"
    if groups is None:
        rules.write_text(rules_file(policy))
    else:
        rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    tests = tmp_path / "rules_test.yml"
    tests.write_text(yaml.safe_dump(promtool_tests(policy, rules.name), sort_keys=False))
    return tests


@pytest.mark.parametrize("engine,target", CASES)
def test_promtool_check_accepts_rendered_rules(tmp_path: Path, engine: str, target: str) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(rules_file(_policy(engine, target)))
    result = _promtool("check", "rules", rules.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("engine,target", CASES)
def test_every_alert_fires_and_resolves(tmp_path: Path, engine: str, target: str) -> None:
    policy = _policy(engine, target)
    names = {r["alert"] for r in alerting_rules(policy)}
    # Every alert of the rendered rules has a case (promtool_tests raises otherwise).
    assert names <= set(SCENARIOS), names - set(SCENARIOS)
    tests = _write(tmp_path, policy)
    cases = yaml.safe_load(tests.read_text())["tests"]
    for case in cases:
        expectations = [bool(t["exp_alerts"]) for t in case["alert_rule_test"]]
        assert expectations == [True, False], case["name"]
    assert {c["name"] for c in cases} == names
    result = _promtool("test", "rules", tests.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alerts_the_issue_asks_for_exist_for_each_engine() -> None:
    server = {r["alert"] for r in alerting_rules(_policy("server", "cluster"))}
    vllm = {r["alert"] for r in alerting_rules(_policy("vllm", "cluster"))}
    core = {"LlmTtftP99AboveSlo", "LlmQueueBacklog", "LlmReplicasAtMax", "LlmNoReadyReplica"}
    assert core <= server and core <= vllm
    # The server refuses with 429 and counts it; vLLM queues instead.
    assert "LlmRefusalRatioHigh" in server and "LlmRefusalRatioHigh" not in vllm


def test_a_rule_that_never_fires_fails_promtool(tmp_path: Path) -> None:
    """The harness can fail: an unreachable threshold turns the firing case red."""
    policy = _policy("server", "cluster")
    groups = rule_groups(policy)
    for rule in groups[1]["rules"]:
        if rule["alert"] == "LlmQueueBacklog":
            rule["expr"] = rule["expr"].rsplit(">", 1)[0] + "> 1e9"
    tests = _write(tmp_path, policy, groups)
    result = _promtool("test", "rules", tests.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "LlmQueueBacklog" in result.stdout + result.stderr


def test_thresholds_come_from_the_stack_configuration() -> None:
    policy = _policy("vllm", "cluster")
    alerts = {r["alert"]: r for r in alerting_rules(policy)}
    assert alerts["LlmTtftP99AboveSlo"]["expr"].endswith("> 1.5")
    assert alerts["LlmTtftP99AboveSlo"]["for"] == "3m"
    assert alerts["LlmQueueBacklog"]["expr"].endswith("> 3")
    assert alerts["LlmReplicasAtMax"]["expr"].endswith(">= 4")
    recording = {r["record"]: r["expr"] for r in rule_groups(policy)[0]["rules"]}
    assert "[2m]" in recording["llm_serving:ttft_seconds:p99"]
    assert 'namespace="llm-prod"' in recording["llm_serving:ttft_seconds:p99"]


def test_no_autoscaling_no_pinned_at_max_alert() -> None:
    cfg = parse_stack_config({"model": {"id": "m/x"}})
    names = {r["alert"] for r in alerting_rules(alert_policy(cfg))}
    assert "LlmReplicasAtMax" not in names and "LlmNoReadyReplica" in names


def test_local_target_scopes_by_scrape_job_and_counts_up_targets() -> None:
    policy = alert_policy(parse_stack_config(SERVER), "local", job="my-job")
    text = rules_file(policy)
    assert 'job="my-job"' in text and "namespace=" not in text
    assert "kube_deployment" not in text and 'sum(up{job="my-job"})' in text


@pytest.mark.parametrize("engine", ["server", "vllm"])
def test_no_ready_replica_is_not_pending_before_the_first_scrape(tmp_path: Path,
                                                                 engine: str) -> None:
    """Local mode: Prometheus evaluates its rules before it has scraped the replicas (the first
    scrape of a target comes up to an interval after start). No `up` series yet is not "no
    replica ready": the alert stays quiet through a gap longer than its `for`, and fires only
    once the known replicas stop answering."""
    policy = _policy(engine, "local")
    rules = tmp_path / "rules.yml"
    rules.write_text(rules_file(policy))
    job = dict(policy.scope)["job"]
    for_m = policy.no_ready_for_seconds // 60
    gap = for_m + 2  # minutes without any sample
    series = [{"series": f'up{{job="{job}",instance="replica-{i}"}}',
               "values": f"_x{gap} 1x3 0x{for_m + 3}"} for i in ("a", "b")]
    [rule] = [r for r in alerting_rules(policy) if r["alert"] == "LlmNoReadyReplica"]
    firing_at = gap + 3 + for_m + 1
    tests = tmp_path / "rules_test.yml"
    tests.write_text(yaml.safe_dump({
        "rule_files": [rules.name], "evaluation_interval": "1m",
        # The alert reads the recorded replica counts: recording group first, as promtool
        # otherwise orders the groups at random and the alert may see them a minute late.
        "group_eval_order": [group["name"] for group in rule_groups(policy)],
        "tests": [{
            "interval": "1m", "input_series": series,
            "alert_rule_test": [
                {"eval_time": f"{gap - 1}m", "alertname": "LlmNoReadyReplica", "exp_alerts": []},
                {"eval_time": f"{gap + 1}m", "alertname": "LlmNoReadyReplica", "exp_alerts": []},
                {"eval_time": f"{firing_at}m", "alertname": "LlmNoReadyReplica", "exp_alerts": [{
                    "exp_labels": {**dict(policy.scope), **rule["labels"]},
                    "exp_annotations": rule["annotations"]}]},
            ],
        }],
    }, sort_keys=False))
    result = _promtool("test", "rules", tests.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_bad_target_is_refused() -> None:
    with pytest.raises(ValueError, match="'target'"):
        alert_policy(parse_stack_config(SERVER), "staging")  # type: ignore[arg-type]


# --- one model of several -------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1])
def test_each_model_s_alerts_fire_and_resolve_on_its_own_series(tmp_path: Path, index: int) -> None:
    policy = _model_policy(index)
    rules = tmp_path / "rules.yml"
    rules.write_text(rules_file(policy))
    checked = _promtool("check", "rules", rules.name, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tests = _write(tmp_path, policy)
    result = _promtool("test", "rules", tests.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_one_model_s_trouble_fires_no_alert_of_another(tmp_path: Path) -> None:
    """The other model's series (its name, its Deployment) in the firing phase: none of this
    model's alerts may fire, so a shared namespace does not mix two models' alerts."""
    mine, other = _model_policy(1), _model_policy(0)
    rules = tmp_path / "rules.yml"
    rules.write_text(rules_file(mine))
    tests = promtool_tests(other, rules.name)
    for group in tests["tests"]:
        group.pop("promql_expr_test", None)
        for case in group["alert_rule_test"]:
            case["exp_alerts"] = []
    # The alert names are the same for every model; only the scope tells them apart, so
    # promtool must see none of them at either time.
    (tmp_path / "rules_test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = _promtool("test", "rules", "rules_test.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # ... while the same series, named for this model, do fire (the harness can see them).
    tests = _write(tmp_path, mine)
    assert _promtool("test", "rules", tests.name, cwd=tmp_path).returncode == 0


def test_a_model_s_rules_select_its_name_and_its_deployment() -> None:
    recording = {r["record"]: r for r in rule_groups(_model_policy(1))[0]["rules"]}
    assert 'model_name="qwen2.5-14b"' in recording["llm_serving:waiting:sum"]["expr"]
    assert recording["llm_serving:replicas:desired"]["expr"] == (
        'sum(max by (deployment) (kube_deployment_spec_replicas{namespace="llm-prod",'
        'deployment="llm-model-1-deploy-0a1b2c3d"}))')
    alerts = {r["alert"]: r for r in alerting_rules(_model_policy(1))}
    assert alerts["LlmReplicasAtMax"]["expr"].endswith(">= 3")
    with pytest.raises(ValueError, match="'deployment'"):
        alert_policy(parse_stack_config(VLLM_TWO).for_model(1), "cluster")
