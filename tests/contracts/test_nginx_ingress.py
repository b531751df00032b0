"""What the pinned F5 NGINX Ingress Controller and its chart accept, held against what the stack
renders: annotations it reads (and their value rules), chart values it reads, host rules,
watched namespaces and name limits."""

from __future__ import annotations

import itertools

import pytest

from components.config.parse import parse_stack_config
from components.config.rules import stack_warnings
from components.policies.balancing import LoadBalancingConfig, ingress_annotations
from components.resources.ingress import controller_pod_labels
from tests.contracts import facts
from tests.infra.conftest import BASE_CONFIG
from tests.infra.test_traffic_and_scaling import INGRESS, RELEASE, spec, stack
from tools import offline

CONTROLLER = facts.pinned("nginx-ingress-controller")
OLD_CONTROLLER = facts.load("nginx-ingress-controller", "5.3.4")
METHODS = ("round_robin", "least_conn", "random_two_least_conn", "session_hash")
RATE_LIMITS = (None, {"requestsPerSecond": 5, "burst": 10})


def policies() -> list[LoadBalancingConfig]:
    return [
        LoadBalancingConfig.model_validate({"method": m, "rateLimit": r})
        for m, r in itertools.product(METHODS, RATE_LIMITS)
    ]


@pytest.mark.parametrize("policy", policies(), ids=lambda p: f"{p.method}-{bool(p.rate_limit)}")
def test_every_annotation_is_read_and_valid_on_the_pinned_controller(policy):
    annotations = ingress_annotations(policy, 2048)
    assert facts.annotation_problems(annotations, CONTROLLER) == []
    assert not set(annotations) & set(CONTROLLER["plusOnlyAnnotations"])


def test_the_old_pin_would_have_ignored_the_retry_annotations():
    """The check that keeps the pin honest: 5.3.4 (chart 2.4.4) never read proxy-next-upstream*."""
    problems = facts.annotation_problems(ingress_annotations(policies()[0], 2048), OLD_CONTROLLER)
    ignored = {p.split(":")[0] for p in problems}
    assert {"nginx.org/proxy-next-upstream", "nginx.org/proxy-next-upstream-tries",
            "nginx.org/proxy-next-upstream-timeout"} <= ignored


@pytest.mark.parametrize("value, ok", [
    ("120s", True), ("2m", True), ("1h 30m", True), ("120", True), ("120 s", False), ("2 minutes", False),
])
def test_the_time_rule_is_the_controllers(value, ok):
    rule = {"nginx.org/proxy-read-timeout": value}
    assert (facts.annotation_problems(rule, CONTROLLER) == []) is ok


def test_duplicate_retry_tokens_are_caught():
    bad = {"nginx.org/proxy-next-upstream": "error error"}
    assert facts.annotation_problems(bad, CONTROLLER)


# --- the rendered stacks --------------------------------------------------------------------


def _render(stack_name: str) -> offline.ProgramRun:
    config, secret_keys = offline.read_stack_file(offline.PROJECT_DIR / f"Pulumi.{stack_name}.yaml")
    return offline.run_program(config, secret_keys, stack=stack_name)


def _one(run: offline.ProgramRun, typ: str) -> offline.Recorded:
    """The controller's release, or the Ingress that routes the API (with cert-manager a master
    Ingress holds the host beside it: test_security.py)."""
    [found] = [r for r in run.resources if r.type == typ and not r.read
               and (typ != RELEASE or r.inputs["chart"] == CONTROLLER["chartReference"])
               and (typ != INGRESS or facts._paths(offline.to_manifest(r)))]
    return found


@pytest.fixture(scope="module")
def prod() -> offline.ProgramRun:
    return _render("prod")


def test_prod_ingress_is_one_the_pinned_controller_accepts(prod):
    ingresses = [offline.to_manifest(r) for r in prod.resources if r.type == INGRESS]
    assert facts.host_problems(ingresses, CONTROLLER) == []
    for ingress in ingresses:
        _accepted(ingress, _one(prod, RELEASE).inputs["values"])


def _accepted(ingress: dict, values: dict) -> None:
    # cert-manager's own annotations are held to its facts (test_security.py); pulumi.com/*
    # are the provider's (skipAwait on the master Ingress).
    controller_annotations = {k: v for k, v in ingress["metadata"]["annotations"].items()
                              if not k.startswith(("cert-manager.io/", "acme.cert-manager.io/",
                                                   "pulumi.com/"))}
    assert facts.annotation_problems(controller_annotations, CONTROLLER) == []
    for rule in ingress["spec"]["rules"]:
        if not rule.get("host"):
            # Accepted only with the flag, which the chart renders only with custom resources on.
            assert CONTROLLER["hostRequired"]["allowEmptyHost"]["chartValue"] == (
                "controller.allowEmptyIngressHost: true"
            )
            assert values["controller"]["allowEmptyIngressHost"] is True
            assert values["controller"].get("enableCustomResources", True) is not False
            assert not ingress["spec"].get("tls"), "hostless TLS comes from the default server"


def test_a_hostless_ingress_on_the_old_pin_would_be_rejected():
    assert OLD_CONTROLLER["hostRequired"]["value"] is True
    assert OLD_CONTROLLER["hostRequired"]["allowEmptyHost"] is None


def test_prod_controller_values_are_all_read_by_the_pinned_chart(prod):
    release = _one(prod, RELEASE)
    assert release.inputs["version"] == CONTROLLER["chartVersion"]
    assert facts.chart_value_problems(release.inputs["values"], CONTROLLER) == []


def test_a_misspelt_value_is_caught():
    values = {"controller": {"watchNamespaces": "a"}, "fullnameOverride": "x"}
    assert facts.chart_value_problems(values, CONTROLLER) == [
        f"controller.watchNamespaces: not a value chart {CONTROLLER['chartVersion']} reads"
    ]


def test_prod_controller_watches_the_namespace_of_its_own_service(prod):
    """The controller learns its address only from its own Service, seen only through a watched
    namespace; without it the Ingress never gets status and `pulumi up` times out."""
    release = _one(prod, RELEASE)
    values = release.inputs["values"]
    watched = values["controller"]["watchNamespace"].split(",")
    assert "format" in CONTROLLER["watchNamespace"] and "comma-separated" in CONTROLLER["watchNamespace"]["format"]
    assert release.outputs["status"]["namespace"] in watched
    assert _one(prod, INGRESS).inputs["metadata"]["namespace"] in watched
    assert values["controller"]["reportIngressStatus"]["enable"] is True


def _hostless_prod() -> offline.ProgramRun:
    """Prod without a host (and so without TLS): the endpoint is read from the controller."""
    import json

    config, secret_keys = offline.read_stack_file(offline.PROJECT_DIR / "Pulumi.prod.yaml")
    ingress = json.loads(config["llm-serving:ingress"])
    ingress.pop("host")
    ingress.pop("certManager")
    config["llm-serving:ingress"] = json.dumps(ingress)
    return offline.run_program(config, secret_keys, stack="prod")


def test_the_service_the_stack_reads_back_is_the_one_the_chart_names():
    hostless = _hostless_prod()
    values = _one(hostless, RELEASE).inputs["values"]
    service_name = values["serviceNameOverride"][:63].rstrip("-")  # the chart's trunc 63
    [lookup] = [r for r in hostless.resources
                if r.type == "kubernetes:core/v1:Service" and r.read]
    assert lookup.name.endswith("-controller-svc")
    assert service_name == values["serviceNameOverride"]  # never truncated: className <= 52
    assert "trunc 63" in CONTROLLER["nameLimits"]["serviceName"]


def test_controller_selector_labels_match_the_chart():
    rule = CONTROLLER["nameLimits"]["selectorLabels"]
    labels = controller_pod_labels("llm-nginx")
    assert labels == {"app.kubernetes.io/name": "nginx-ingress", "app.kubernetes.io/instance": "llm-nginx"}
    assert "app.kubernetes.io/name: <nginx-ingress.name>" in rule and "app.kubernetes.io/instance: <Release.Name>" in rule


def test_with_a_host_the_controller_keeps_requiring_hosts(run):
    raw = {**BASE_CONFIG, "ingress": {"enabled": True, "host": "llm.example.com"}}
    result = stack(run, raw)
    values = result.one(RELEASE).inputs["values"]
    assert "allowEmptyIngressHost" not in values["controller"]
    assert spec(result.one(INGRESS))["rules"][0]["host"] == "llm.example.com"


def test_existing_controller_without_host_is_warned_about():
    cfg = parse_stack_config({**BASE_CONFIG, "ingress": {"enabled": True,
                                                         "controller": {"install": False}}})
    [warning] = [w for w in stack_warnings(cfg) if w.startswith("llm-serving:ingress.host:")]
    assert "allow-empty-ingress-host" in warning


def test_only_the_verified_chart_version_is_accepted():
    from components.config.parse import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse_stack_config({**BASE_CONFIG, "ingress": {"enabled": True,
                                                       "controller": {"chartVersion": "2.4.4"}}})
    [problem] = caught.value.problems
    assert problem.startswith("llm-serving:ingress.controller.chartVersion:")
    assert CONTROLLER["chartVersion"] in problem


@pytest.mark.parametrize("value, ok", [
    ("X-Queue-Start", True),  # passes the client's own header on
    ("X-Queue-Start: fixed", True),
    ("X-Queue-Start: $msec", False),  # what late binding would need (docs/load-balancing.md)
    ("X-Request-Start: t=${msec}", False),
])
def test_the_pinned_controller_cannot_stamp_a_proxy_time_on_the_request(value, ok):
    """Late binding (bench/des.py Handoff) needs each request to carry the time it reached the
    proxy, so a replica can queue a handed-off request by it. The controller's only way to set a
    request header without snippets rejects every nginx variable."""
    problems = facts.annotation_problems({"nginx.org/proxy-set-headers": value}, CONTROLLER)
    assert (not problems) is ok, problems


# --- several models on one Ingress ------------------------------------------------------------


def test_two_models_share_one_ingress_the_pinned_controller_accepts(run):
    from tests.infra.test_models import TWO_MODELS

    result = stack(run, TWO_MODELS)
    ingress = offline.to_manifest(result.one(INGRESS))
    annotations = ingress["metadata"]["annotations"]
    assert facts.annotation_problems(annotations, CONTROLLER) == []
    # The controller rejects the whole Ingress when a rewrite names a Service that is not one of
    # its backends (validateRewriteListAnnotation).
    backends = {p["backend"]["service"]["name"]
                for p in ingress["spec"]["rules"][0]["http"]["paths"]}
    rewritten = {part.strip().split(" ")[0].removeprefix("serviceName=")
                 for part in annotations["nginx.org/rewrites"].split(";")}
    assert rewritten and rewritten <= backends
    assert "not a backend" in CONTROLLER["annotationValueRules"]["nginx.org/rewrites"]["rule"]
    # One host, one regular Ingress: a second Ingress on the same host would lose it.
    assert "is taken by another resource" in CONTROLLER["sameHostIngresses"]["rule"]
    assert len(ingress["spec"]["rules"]) == 1


@pytest.mark.parametrize("value", [
    "serviceName=svc rewrite=v1",  # the path must start with '/'
    "service=svc rewrite=/v1",  # the key is serviceName
    "serviceName=svc rewrite=/v1 ;serviceName=b rewrite=/$1",  # no '$' in the path
    "serviceName=svc,rewrite=/v1",
])
def test_a_wrong_rewrite_value_is_caught(value):
    assert facts.annotation_problems({"nginx.org/rewrites": value}, CONTROLLER)


def test_the_rewrite_values_the_stack_writes_pass_the_controller_rule():
    ok = "serviceName=llm-api-coder-svc-1a2b3c4d rewrite=/v1;serviceName=b rewrite=/v1"
    assert facts.annotation_problems({"nginx.org/rewrites": ok}, CONTROLLER) == []


def test_two_models_behind_cert_manager_put_their_paths_and_rewrites_on_the_minion(run):
    """With cert-manager the host is split into a master (host, TLS, redirect) and a minion: the
    controller takes paths only from minions, denies nginx.org/rewrites on a master, and lets the
    solver's own minion join the host beside ours."""
    from components.pins import PINNED
    from tests.infra.test_models import TWO_MODELS

    cert_manager = facts.load("cert-manager", PINNED["cert-manager"])
    raw = {**TWO_MODELS, "ingress": {
        "enabled": True, "className": "llm-nginx", "host": "llm.example.com",
        "certManager": {"enabled": True, "install": True, "acmeEmail": "ops@example.com"}}}
    result = stack(run, raw)
    ingresses = [offline.to_manifest(r) for r in result.mocks.of_type(INGRESS) if not r.read]
    [minion] = [i for i in ingresses if facts._paths(i)]
    [master] = [i for i in ingresses if not facts._paths(i)]
    role = CONTROLLER["mergeableIngresses"]["annotation"]
    assert master["metadata"]["annotations"][role] == "master"
    assert minion["metadata"]["annotations"][role] == "minion"
    assert facts._paths(minion) == ["/v1", "/coder/v1"]
    assert "nginx.org/rewrites" in minion["metadata"]["annotations"]
    assert "nginx.org/rewrites" not in master["metadata"]["annotations"]
    assert master["spec"]["tls"] and not minion["spec"].get("tls")
    [issuer] = [offline.to_manifest(r) for r in result.mocks.of_type(
        "kubernetes:cert-manager.io/v1:ClusterIssuer")]
    ingress_config = issuer["spec"]["acme"]["solvers"][0]["http01"]["ingress"]
    solver = facts.solver_ingress(cert_manager, "llm.example.com",
                                  ingress_config["ingressClassName"],
                                  ingress_config["ingressTemplate"])
    assert facts.host_problems([master, minion, solver], CONTROLLER) == []
    for ingress in (master, minion):
        _accepted(ingress, _one_release(result))
    # The check can fail: the rewrites on the master would be dropped.
    moved = {**master, "metadata": {**master["metadata"], "annotations": {
        **master["metadata"]["annotations"],
        "nginx.org/rewrites": minion["metadata"]["annotations"]["nginx.org/rewrites"]}}}
    assert any("['nginx.org/rewrites'] ignored on a master" in p
               for p in facts.host_problems([moved, minion], CONTROLLER))


def _one_release(result) -> dict:
    [release] = [r.inputs for r in result.mocks.of_type(RELEASE)
                 if r.inputs["chart"] == CONTROLLER["chartReference"]]
    return release["values"]
