"""The prod render's security settings, held against the pinned upstreams' own rules: TLS from
cert-manager through the controller, only /v1 published, source ranges, a rate limit, Pod
Security labels at the level each namespace's pods meet, and egress rules."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from components.pins import CERT_MANAGER_REPOSITORY, CERT_MANAGER_VERSION, PINNED
from tests.contracts import facts
from tools import offline

CONTROLLER = facts.pinned("nginx-ingress-controller")
CERT_MANAGER = facts.pinned("cert-manager")
PSA = facts.pinned("pod-security-admission")
KEDA_PSS = json.loads((facts.DATA / f"keda-{PINNED['keda']}.podsecurity.json").read_text())
INGRESS = "kubernetes:networking.k8s.io/v1:Ingress"
RELEASE = "kubernetes:helm.sh/v3:Release"
ISSUER = "kubernetes:cert-manager.io/v1:ClusterIssuer"
NAMESPACE = "kubernetes:core/v1:Namespace"
NETPOL = "kubernetes:networking.k8s.io/v1:NetworkPolicy"


@pytest.fixture(scope="module")
def prod() -> offline.ProgramRun:
    config, secret_keys = offline.read_stack_file(offline.PROJECT_DIR / "Pulumi.prod.yaml")
    return offline.run_program(config, secret_keys, stack="prod")


def _all(run: offline.ProgramRun, typ: str) -> list[dict]:
    return [offline.to_manifest(r) for r in run.resources if r.type == typ and not r.read]


def _release(run: offline.ProgramRun, chart: str) -> dict:
    [found] = [r.inputs for r in run.resources if r.type == RELEASE and r.inputs["chart"] == chart]
    return found


def test_prod_serves_tls_only_for_v1_and_redirects_plain_http(prod):
    [ingress] = _all(prod, INGRESS)
    spec, annotations = ingress["spec"], ingress["metadata"]["annotations"]
    [rule] = spec["rules"]
    assert [(p["path"], p["pathType"]) for p in rule["http"]["paths"]] == [("/v1", "Prefix")]
    assert spec["tls"] == [{"hosts": [rule["host"]], "secretName": "llm-nginx-tls"}]
    assert annotations["nginx.org/ssl-redirect"] == "True"
    assert "nginx.org/ssl-redirect" in CONTROLLER["annotations"]
    assert re.match(CONTROLLER["valuePatterns"]["nginx.org/ssl-redirect"], "True")
    assert prod.exports["endpoint"] == f"https://{rule['host']}/v1"


def test_cert_manager_annotations_are_the_pinned_ones(prod):
    [ingress] = _all(prod, INGRESS)
    ours = {k: v for k, v in ingress["metadata"]["annotations"].items()
            if k.startswith(("cert-manager.io/", "acme.cert-manager.io/"))}
    assert set(ours) == set(CERT_MANAGER["annotations"])
    # The controller gives a host to one Ingress only: the challenge path goes into ours.
    assert ours["acme.cert-manager.io/http01-edit-in-place"] == "true"
    [issuer] = _all(prod, ISSUER)
    assert ours["cert-manager.io/cluster-issuer"] == issuer["metadata"]["name"]


def test_cluster_issuer_is_valid_against_the_upstream_crd_schema(prod):
    [issuer] = _all(prod, ISSUER)
    jsonschema.validate(issuer, CERT_MANAGER["clusterIssuerSchema"])
    [solver] = issuer["spec"]["acme"]["solvers"]
    assert solver["http01"]["ingress"]["ingressClassName"] == "llm-nginx"
    with pytest.raises(jsonschema.ValidationError):  # the schema does reject mistakes
        jsonschema.validate({**issuer, "spec": {"acme": {"server": "x"}}},
                            CERT_MANAGER["clusterIssuerSchema"])


def test_cert_manager_release_uses_only_values_its_chart_reads(prod):
    release = _release(prod, "cert-manager")
    assert release["version"] == CERT_MANAGER_VERSION == CERT_MANAGER["chartVersion"]
    assert release["repositoryOpts"]["repo"] == CERT_MANAGER_REPOSITORY
    assert set(facts.value_paths(release["values"])) <= set(CERT_MANAGER["chartValues"])
    assert release["values"]["crds"]["enabled"] is True


def test_controller_admits_only_the_source_ranges_and_prod_rate_limits(prod):
    values = _release(prod, CONTROLLER["chartReference"])["values"]
    ranges = values["controller"]["service"]["loadBalancerSourceRanges"]
    assert ranges and "controller.service.loadBalancerSourceRanges" in CONTROLLER["chartValues"]["values"]
    assert facts.chart_value_problems(values, CONTROLLER) == []
    [ingress] = _all(prod, INGRESS)
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.org/limit-req-rate"].endswith("r/s")
    assert annotations["nginx.org/limit-req-reject-code"] == "429"
    nginx = {k: v for k, v in annotations.items() if k.startswith("nginx.org/")}
    assert facts.annotation_problems(nginx, CONTROLLER) == []


def _restricted(fact: str) -> bool:
    return fact.startswith("restricted")


def test_every_namespace_enforces_warns_and_audits_the_level_its_pods_meet(prod):
    meets = {
        "llm-prod": True,  # the model pods: tests/infra checks their security context
        "nginx-ingress": _restricted(CONTROLLER["podSecurity"]["podSecurityStandard"]),
        "keda": _restricted(KEDA_PSS["podSecurityStandard"]),
        "cert-manager": _restricted(CERT_MANAGER["podSecurityStandard"]),
    }
    namespaces = {ns["metadata"]["name"]: ns["metadata"]["labels"] for ns in _all(prod, NAMESPACE)}
    assert set(namespaces) == set(meets)
    for name, labels in namespaces.items():
        psa = {k: v for k, v in labels.items() if k.startswith("pod-security.kubernetes.io/")}
        assert set(psa) == set(PSA["labels"]), name
        for mode in ("enforce", "warn", "audit"):
            assert psa[f"pod-security.kubernetes.io/{mode}"] == "restricted" and meets[name]
            assert re.fullmatch(PSA["versionPattern"],
                                psa[f"pod-security.kubernetes.io/{mode}-version"])


def test_prod_network_policy_has_egress_rules(prod):
    [policy] = _all(prod, NETPOL)
    assert "Egress" in policy["spec"]["policyTypes"]
    assert policy["spec"]["egress"] == []  # baked weights: the pods reach nothing
