"""Local Prometheus: config generation (checked by promtool), target labels, and how query
answers are read (as KEDA v2.19.0's Prometheus scaler reads them)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from components.policies.scaling import promql_duration
from local.procs import LocalModeError
from local.prometheus import (
    LocalPrometheus,
    find_prometheus,
    parse_instant,
    scrape_config,
    targets_json,
)
from tests.scaling.conftest import require_binaries

RULES = """groups:
  - name: llm
    rules:
      - alert: QueueBuilding
        expr: sum(llm_requests_waiting{namespace="llm-serving"}) > 4
"""


def test_config_scrapes_the_targets_file_at_the_interval_and_loads_rule_files(tmp_path):
    rules = tmp_path / "alerts.yml"
    rules.write_text(RULES)
    text = scrape_config(tmp_path / "targets.json", scrape_interval_seconds=0.75,
                         rule_files=[rules])
    config = json.loads(text)  # JSON is YAML: what prometheus reads
    assert config["global"]["scrape_interval"] == "750ms"
    assert config["global"]["evaluation_interval"] == "750ms"
    assert config["rule_files"] == [str(rules.resolve())]
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["file_sd_configs"][0]["files"] == [str(tmp_path / "targets.json")]
    with pytest.raises(ValueError, match="scrape_interval_seconds"):
        scrape_config(tmp_path / "t.json", scrape_interval_seconds=0)


def test_promtool_accepts_the_generated_config_and_rules(tmp_path):
    if shutil.which("promtool") is None:
        require_binaries()
        pytest.skip("promtool not installed (apt-get install prometheus)")
    rules = tmp_path / "alerts.yml"
    rules.write_text(RULES)
    targets = tmp_path / "targets.json"
    targets.write_text(targets_json([8001, 8000], "llm-serving"))
    conf = tmp_path / "prometheus.yml"
    conf.write_text(scrape_config(targets, scrape_interval_seconds=1, rule_files=[rules]))
    result = subprocess.run(["promtool", "check", "config", str(conf)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_targets_carry_the_stack_namespace_the_queries_select_on():
    groups = json.loads(targets_json([8001, 8000], "team-a"))
    assert [g["targets"] for g in groups] == [["127.0.0.1:8000"], ["127.0.0.1:8001"]]
    assert {g["labels"]["namespace"] for g in groups} == {"team-a"}
    assert len({g["labels"]["pod"] for g in groups}) == 2


@pytest.mark.parametrize("seconds, text", [(15, "15s"), (0.75, "750ms"), (1.5, "1500ms"),
                                           (0.001, "1ms")])
def test_durations(seconds, text):
    assert promql_duration(seconds) == text


def test_answers_are_read_like_kedas_prometheus_scaler():
    ok = {"status": "success", "data": {"resultType": "vector",
                                        "result": [{"metric": {}, "value": [1, "7"]}]}}
    assert parse_instant(ok, "q") == 7.0
    empty = {"status": "success", "data": {"resultType": "vector", "result": []}}
    assert parse_instant(empty, "q") == 0.0  # ignoreNullValues defaults to true
    two = {"status": "success", "data": {"result": [{"value": [1, "1"]}, {"value": [1, "2"]}]}}
    with pytest.raises(LocalModeError, match="2 series"):
        parse_instant(two, "q")
    with pytest.raises(LocalModeError, match="bad_data"):
        parse_instant({"status": "error", "error": "bad_data"}, "q")


def test_a_missing_binary_or_rule_file_is_a_clear_error(tmp_path):
    with pytest.raises(LocalModeError, match="apt-get install prometheus"):
        find_prometheus(str(tmp_path / "no-prometheus"))
    require_binaries()
    prom = LocalPrometheus(tmp_path, namespace="x", port=1,
                           rule_files=[tmp_path / "missing.yml"])
    with pytest.raises(LocalModeError, match="missing.yml"):
        prom.start()


def test_an_invalid_rule_file_is_rejected_before_start(tmp_path):
    require_binaries()
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed")
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: A\n        expr: sum(\n")
    from tests.local.support import free_port_range
    prom = LocalPrometheus(tmp_path, namespace="x", port=free_port_range(1), rule_files=[bad])
    with pytest.raises(LocalModeError, match="promtool check config failed"):
        prom.start()
    assert prom.pid is None
