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


CERTIFICATE = "kubernetes:cert-manager.io/v1:Certificate"


def _api_and_host(run: offline.ProgramRun) -> tuple[dict, dict]:
    """(the Ingress that routes the API, the master that holds the host and its TLS)."""
    ingresses = _all(run, INGRESS)
    [api] = [i for i in ingresses if facts._paths(i)]
    [host] = [i for i in ingresses if not facts._paths(i)]
    return api, host


def test_prod_serves_tls_only_for_v1_and_redirects_plain_http(prod):
    api, host = _api_and_host(prod)
    [rule] = api["spec"]["rules"]
    assert [(p["path"], p["pathType"]) for p in rule["http"]["paths"]] == [("/v1", "Prefix")]
    # The host's TLS and redirect are the master's: the controller serves the API minion's
    # path in the master's server.
    assert host["spec"]["tls"] == [{"hosts": [rule["host"]], "secretName": "llm-nginx-tls"}]
    assert host["spec"]["rules"] == [{"host": rule["host"]}]
    assert host["metadata"]["annotations"]["nginx.org/ssl-redirect"] == "True"
    assert "nginx.org/ssl-redirect" in CONTROLLER["mergeableIngresses"]["minionDenylist"]
    assert "nginx.org/ssl-redirect" in CONTROLLER["annotations"]
    assert re.match(CONTROLLER["valuePatterns"]["nginx.org/ssl-redirect"], "True")
    assert prod.exports["endpoint"] == f"https://{rule['host']}/v1"


def test_the_stack_makes_its_own_certificate_and_invites_no_edits(prod):
    """No object Pulumi manages is one cert-manager edits: no ingress-shim annotation (which
    would make cert-manager create and own the Certificate) and no edit-in-place (which makes
    it Update our Ingress, an edit our next apply undoes). The Certificate is ours, asks for a
    temporary certificate (the redirect needs one for the handshake while ACME works) and is
    valid against the pinned CRD."""
    for ingress in _all(prod, INGRESS):
        assert not set(ingress["metadata"]["annotations"]) & set(CERT_MANAGER["annotations"])
    [certificate] = _all(prod, CERTIFICATE)
    jsonschema.validate(certificate, CERT_MANAGER["certificateSchema"])
    assert certificate["metadata"]["annotations"] == {
        a: "true" for a in CERT_MANAGER["certificateAnnotations"]}
    _, host = _api_and_host(prod)
    [issuer] = _all(prod, ISSUER)
    assert certificate["spec"]["secretName"] == host["spec"]["tls"][0]["secretName"]
    assert certificate["spec"]["dnsNames"] == host["spec"]["tls"][0]["hosts"]
    assert certificate["spec"]["issuerRef"] == {
        "name": issuer["metadata"]["name"], "kind": "ClusterIssuer", "group": "cert-manager.io"}
    # Named as the ingress-shim named its Certificate (after the Secret): on a cluster rendered
    # before, the create fails loudly instead of two Certificates silently stalling renewals.
    assert certificate["metadata"]["name"] == certificate["spec"]["secretName"]


def test_the_solvers_own_ingress_joins_our_host_so_no_up_can_undo_an_issuance(prod):
    """The HTTP-01 solver's Ingress, as cert-manager v1.21.1 creates it with our issuer's
    template, is accepted by controller 5.5.4 next to ours: a minion of our master, its path
    free. cert-manager creates and deletes it; Pulumi never sees it, so no `pulumi up`, at any
    moment of an issuance, changes what routes the challenge."""
    api, host = _api_and_host(prod)
    [issuer] = _all(prod, ISSUER)
    [solver_config] = issuer["spec"]["acme"]["solvers"]
    ingress_config = solver_config["http01"]["ingress"]
    solver = facts.solver_ingress(CERT_MANAGER, host["spec"]["rules"][0]["host"],
                                  ingress_config["ingressClassName"],
                                  ingress_config["ingressTemplate"])
    assert facts.host_problems([api, host, solver], CONTROLLER) == []
    assert {i["spec"]["ingressClassName"] for i in (api, host, solver)} == {"llm-nginx"}
    # The controller would otherwise treat it as a challenge of a VirtualServer, or refuse it.
    assert CONTROLLER["mergeableIngresses"]["minionsCheckedBeforeChallenge"] is True
    # And the master's status covers the minions, which `pulumi up` waits for on the API one.
    assert CONTROLLER["mergeableIngresses"]["statusCoversMinions"] is True


def test_without_the_template_the_solver_would_lose_the_host():
    """The check can fail: a solver Ingress that is not a minion finds the host taken (why the
    single Ingress needed edit-in-place), and a master with paths or a minion with TLS is
    rejected."""
    master = {"metadata": {"name": "m", "annotations": {
                  "nginx.org/mergeable-ingress-type": "master"}},
              "spec": {"rules": [{"host": "h"}], "tls": [{"hosts": ["h"]}]}}
    plain_solver = facts.solver_ingress(CERT_MANAGER, "h", "c", None)
    [problem] = facts.host_problems([master, plain_solver], CONTROLLER)
    assert "host 'h' is taken" in problem
    minion = facts.solver_ingress(CERT_MANAGER, "h", "c", {"metadata": {"annotations": {
        "nginx.org/mergeable-ingress-type": "minion", "nginx.org/ssl-redirect": "True"}}})
    minion["spec"]["tls"] = [{"hosts": ["h"]}]
    with_paths = {**master, "spec": {**master["spec"], "rules": [
        {"host": "h", "http": {"paths": [{"path": "/"}]}}]}}
    problems = facts.host_problems([with_paths, minion], CONTROLLER)
    assert any("a master needs exactly one rule and no paths" in p for p in problems)
    assert any("a minion may not have tls" in p for p in problems)
    assert any("['nginx.org/ssl-redirect'] ignored on a minion" in p for p in problems)


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
    ingress, _ = _api_and_host(prod)
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
