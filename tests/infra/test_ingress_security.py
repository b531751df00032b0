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


CERTIFICATE = "kubernetes:cert-manager.io/v1:Certificate"


def _ingress(run, raw: dict[str, Any]) -> dict[str, Any]:
    """The Ingress that routes the API and, with cert-manager, the master holding the host."""
    result = stack(run, raw)
    [api] = [r for r in result.mocks.of_type(INGRESS) if r.name == "llm-ingress-ingress"]
    hosts = [r for r in result.mocks.of_type(INGRESS) if r.name == "llm-ingress-host"]
    got = {"result": result, "spec": spec(api), "annotations": api.inputs["metadata"]["annotations"]}
    if hosts:
        got["host_spec"] = spec(hosts[0])
        got["host_annotations"] = hosts[0].inputs["metadata"]["annotations"]
    return got


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
    # The master holds the host, its TLS and the redirect; the API Ingress is its minion.
    assert got["host_spec"]["tls"] == [{"hosts": ["llm.example.com"],
                                        "secretName": "llm-nginx-tls"}]
    assert got["host_annotations"]["nginx.org/ssl-redirect"] == "True"
    assert got["host_annotations"]["nginx.org/mergeable-ingress-type"] == "master"
    assert got["annotations"]["nginx.org/mergeable-ingress-type"] == "minion"
    assert "tls" not in got["spec"] and "nginx.org/ssl-redirect" not in got["annotations"]
    # No cert-manager annotation on either: the stack makes the Certificate itself.
    for annotations in (got["annotations"], got["host_annotations"]):
        assert not any("cert-manager.io/" in k for k in annotations)
    result = got["result"]
    certificate = result.one(CERTIFICATE).inputs
    assert certificate["spec"]["issuerRef"]["name"] == "llm-nginx-acme"
    assert certificate["metadata"]["annotations"] == {
        "cert-manager.io/issue-temporary-certificate": "true"}
    issuer = result.one(ISSUER).inputs
    http01 = issuer["spec"]["acme"]["solvers"][0]["http01"]["ingress"]
    assert http01["ingressClassName"] == "llm-nginx"
    assert http01["ingressTemplate"] == {
        "metadata": {"annotations": {"nginx.org/mergeable-ingress-type": "minion"}}}
    charts = {r.inputs["chart"] for r in result.mocks.of_type(RELEASE)}
    assert "cert-manager" in charts
    assert result.values["endpoint"] == "https://llm.example.com/v1"


def test_existing_cluster_issuer_is_used_without_creating_one(run):
    ingress = {**TLS_INGRESS, "certManager": {"enabled": True, "clusterIssuer": "corp-ca"}}
    got = _ingress(run, {**BASE_CONFIG, "ingress": ingress})
    assert got["result"].one(CERTIFICATE).inputs["spec"]["issuerRef"]["name"] == "corp-ca"
    # Its HTTP-01 solver, if any, joins the host as a minion when the issuer's ingressTemplate
    # says so (README); the master is there for it.
    assert got["host_annotations"]["nginx.org/mergeable-ingress-type"] == "master"
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
