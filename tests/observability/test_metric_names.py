"""Every metric the rules and the dashboard read is one the engine (or the
controller) exports: the server's from server/metrics.py itself, vLLM's and the
controller's from the upstream facts under tests/contracts/data/."""

from __future__ import annotations

import json

import pytest

from components.config.parse import parse_stack_config
from components.engines import PROFILES
from components.policies.alerting import alert_policy, rule_groups
from components.policies.dashboard import build_dashboard
from tests.observability.support import (
    CONTROLLER_FACTS,
    VLLM_FACTS,
    controller_samples,
    engine_samples,
    kube_state_metrics_samples,
    metric_names,
    server_samples,
    vllm_samples,
)

CONFIGS = {
    "server": {"model": {"id": "m/x"}, "autoscaling": {"enabled": True}},
    "vllm": {"engine": "vllm", "gpu": {"count": 1}, "model": {"id": "m/x"},
             "autoscaling": {"enabled": True, "minReplicas": 2, "prometheusUrl": "http://p:9090"}},
}
MONITORING = {"serviceMonitor": True, "rules": True, "dashboard": True}
# Not the engine's: scrape health, the pinned kube-state-metrics (cluster replica counts; its
# labels are checked in tests/contracts/test_kube_state_metrics.py) and this project's own
# recorded series.
OTHERS = {"up"} | kube_state_metrics_samples()


def _cfg(engine: str, **extra):
    return parse_stack_config({**CONFIGS[engine], "monitoring": MONITORING, **extra})


def _rule_exprs(engine: str) -> list[str]:
    exprs = []
    for target in ("cluster", "local"):
        for group in rule_groups(alert_policy(_cfg(engine), target)):
            exprs += [rule["expr"] for rule in group["rules"]]
    return exprs


def _panel_exprs(engine: str) -> list[str]:
    board = build_dashboard(_cfg(engine, ingress={"enabled": True}))
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


@pytest.mark.parametrize("engine", ["server", "vllm"])
def test_rules_read_only_exported_metrics(engine: str) -> None:
    known = engine_samples(engine) | OTHERS
    used = {n for e in _rule_exprs(engine) for n in metric_names(e)}
    unknown = {n for n in used - known if not n.startswith("llm_serving:")}
    assert not unknown, f"{engine} rules read metrics the engine does not export: {unknown}"
    # And they do read the engine: TTFT, E2E, the queue.
    profile = PROFILES[engine]
    assert {f"{profile.ttft_histogram}_bucket", profile.waiting_metric} <= used


@pytest.mark.parametrize("engine", ["server", "vllm"])
def test_dashboard_panels_read_only_exported_metrics(engine: str) -> None:
    known = engine_samples(engine) | controller_samples()
    exprs = _panel_exprs(engine)
    assert exprs
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"panel query names no metric: {expr}"
        assert names <= known, f"{engine} panel reads unknown metrics {names - known}: {expr}"


def test_profile_metric_names_exist_upstream() -> None:
    for engine, samples in (("server", server_samples()), ("vllm", vllm_samples())):
        p = PROFILES[engine]
        wanted = {
            p.running_metric, p.waiting_metric,
            f"{p.ttft_histogram}_bucket", f"{p.e2e_histogram}_bucket", f"{p.e2e_histogram}_count",
        }
        wanted |= {f"{p.itl_histogram}_bucket"} if p.itl_histogram else set()
        wanted |= {p.kv_cache_metric} if p.kv_cache_metric else set()
        wanted |= {ref.name for ref in (p.refused, p.unavailable) if ref is not None}
        assert wanted <= samples, f"{engine}: {wanted - samples}"


def test_server_refusal_reasons_are_ones_the_server_counts() -> None:
    from server.metrics import REJECT_REASONS

    for ref in (PROFILES["server"].refused, PROFILES["server"].unavailable):
        assert ref is not None and dict(ref.match)["reason"] in REJECT_REASONS


def test_facts_files_name_their_source_and_version() -> None:
    from components.engines import VLLM_IMAGE

    vllm = json.loads(VLLM_FACTS.read_text())
    # The facts move with the image pin.
    assert VLLM_IMAGE.endswith(":v" + vllm["version"])
    assert vllm["component"] == "vllm" and vllm["sources"]["metrics"].startswith("vllm-project/vllm@")
    assert set(vllm["metrics"].values()) <= {"gauge", "counter", "histogram"}
    controller = json.loads(CONTROLLER_FACTS.read_text())
    assert all(s.startswith("nginx/kubernetes-ingress@v" + controller["version"]) for s in controller["sources"].values())
