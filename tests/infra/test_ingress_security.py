"""Ingress security under mocks: only /v1 routed for both engines, TLS with a redirect and an
https endpoint, source ranges on the controller, and config errors naming the key."""

from __future__ import annotations

from typing import Any

import pytest

from components.config.parse import ConfigError, parse_stack_config
from components.config.rules import stack_warnings
from tests.infra.conftest import BASE_CONFIG, GPU_CONFIG
from tests.infra.test_traffic_and_scaling import INGRESS, RELEASE, spec, stack

TLS_INGRESS = {"enabled": True, "host": "llm.example.com",
               "certManager": {"enabled": True, "install": True}}
ISSUER = "kubernetes:cert-manager.io/v1:ClusterIssuer"


def _ingress(run, raw: dict[str, Any]) -> dict[str, Any]:
    result = stack(run, raw)
    ingress = result.one(INGRESS).inputs
    return {"result": result, "spec": spec(result.one(INGRESS)),
            "annotations": ingress["metadata"]["annotations"]}


@pytest.mark.parametrize("base", [BASE_CONFIG, GPU_CONFIG], ids=["server", "vllm"])
def test_only_the_v1_prefix_is_routed_for_both_engines(run, base):
    got = _ingress(run, {**base, "ingress": {"enabled": True}})
    [rule] = got["spec"]["rules"]
    assert [(p["path"], p["pathType"]) for p in rule["http"]["paths"]] == [("/v1", "Prefix")]


@pytest.mark.parametrize("path", ["/", "/v2", "/v1x", "v1"])
def test_paths_outside_v1_are_refused_naming_the_key(path):
    with pytest.raises(ConfigError) as caught:
        parse_stack_config({**BASE_CONFIG, "ingress": {"enabled": True, "path": path}})
    assert any(p.startswith("llm-serving:ingress.path: must be /v1") for p in caught.value.problems)


def test_cert_manager_tls_redirects_and_exports_https(run):
    got = _ingress(run, {**BASE_CONFIG, "ingress": TLS_INGRESS})
    assert got["spec"]["tls"] == [{"hosts": ["llm.example.com"], "secretName": "llm-nginx-tls"}]
    assert got["annotations"]["nginx.org/ssl-redirect"] == "True"
    assert got["annotations"]["cert-manager.io/cluster-issuer"] == "llm-nginx-acme"
    assert got["annotations"]["acme.cert-manager.io/http01-edit-in-place"] == "true"
    result = got["result"]
    issuer = result.one(ISSUER).inputs
    assert issuer["spec"]["acme"]["solvers"][0]["http01"]["ingress"]["ingressClassName"] == \
        "llm-nginx"
    charts = {r.inputs["chart"] for r in result.mocks.of_type(RELEASE)}
    assert "cert-manager" in charts


def test_existing_cluster_issuer_is_used_without_creating_one(run):
    ingress = {**TLS_INGRESS, "certManager": {"enabled": True, "clusterIssuer": "corp-ca"}}
    got = _ingress(run, {**BASE_CONFIG, "ingress": ingress})
    assert got["annotations"]["cert-manager.io/cluster-issuer"] == "corp-ca"
    assert "acme.cert-manager.io/http01-edit-in-place" not in got["annotations"]
    assert not got["result"].mocks.of_type(ISSUER)
    assert {r.inputs["chart"] for r in got["result"].mocks.of_type(RELEASE)} == {
        "oci://ghcr.io/nginx/charts/nginx-ingress"}


def test_existing_tls_secret_redirects_too(run):
    ingress = {"enabled": True, "host": "llm.example.com", "tlsSecret": "my-cert"}
    got = _ingress(run, {**BASE_CONFIG, "ingress": ingress})
    assert got["spec"]["tls"][0]["secretName"] == "my-cert"
    assert got["annotations"]["nginx.org/ssl-redirect"] == "True"
    assert not any(k.startswith("cert-manager.io/") for k in got["annotations"])


def test_no_tls_means_no_redirect_and_a_warning(run):
    got = _ingress(run, {**BASE_CONFIG, "ingress": {"enabled": True}})
    assert "tls" not in got["spec"] and "nginx.org/ssl-redirect" not in got["annotations"]
    cfg = parse_stack_config({**BASE_CONFIG, "ingress": {"enabled": True}})
    assert any(w.startswith("llm-serving:ingress: no TLS") for w in stack_warnings(cfg))
    tls = parse_stack_config({**BASE_CONFIG, "ingress": TLS_INGRESS})
    assert not any("no TLS" in w for w in stack_warnings(tls))


@pytest.mark.parametrize("ingress, key", [
    ({"enabled": True, "certManager": {"enabled": True}}, "ingress.certManager.enabled"),
    ({**TLS_INGRESS, "tlsSecret": "x"}, "ingress.tlsSecret"),
])
def test_tls_mistakes_are_refused_naming_the_key(ingress, key):
    with pytest.raises(ConfigError) as caught:
        parse_stack_config({**BASE_CONFIG, "ingress": ingress})
    assert any(p.startswith(f"llm-serving:{key}:") for p in caught.value.problems)


def test_source_ranges_go_to_the_controllers_load_balancer(run):
    ranges = ["203.0.113.0/24", "2001:db8::/32"]
    result = stack(run, {**BASE_CONFIG, "ingress": {"enabled": True,
                                                    "controller": {"sourceRanges": ranges}}})
    [release] = result.mocks.of_type(RELEASE)
    assert release.inputs["values"]["controller"]["service"]["loadBalancerSourceRanges"] == ranges
    with pytest.raises(ConfigError) as caught:
        parse_stack_config({**BASE_CONFIG, "ingress": {"enabled": True},
                            "service": {"sourceRanges": ranges}})
    assert any("set ingress.controller.sourceRanges instead" in p
               for p in caught.value.problems)
    with pytest.raises(ConfigError) as caught:
        parse_stack_config({**BASE_CONFIG, "ingress": {"enabled": True,
                                                       "controller": {"sourceRanges": ["x"]}}})
    assert any(p.startswith("llm-serving:ingress.controller.sourceRanges")
               for p in caught.value.problems)
