"""Every stack file, run through __main__.py under mocks, as `pulumi preview` would."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.config.parse import ConfigError
from components.pins import KEDA_REPOSITORY, NIC_CHART, NIC_CHART_VERSION
from tests.infra.nginx_support import NGINX
from tests.infra.test_balancing import needs_nginx
from tools import offline

STACK_FILES = sorted(offline.PROJECT_DIR.glob("Pulumi.*.yaml"))


def test_there_are_dev_and_prod_stacks():
    assert {p.name for p in STACK_FILES} >= {"Pulumi.dev.yaml", "Pulumi.prod.yaml",
                                             "Pulumi.prod-gateway.yaml"}


@pytest.mark.parametrize("stack_file", STACK_FILES, ids=lambda p: p.stem.split(".")[1])
def test_stack_file_renders_schema_valid_manifests(stack_file: Path):
    config, secret_keys = offline.read_stack_file(stack_file)
    run = offline.run_program(config, secret_keys)
    manifests = [offline.to_manifest(r) for r in run.resources if offline.is_kubernetes_object(r)]
    kinds = {m["kind"] for m in manifests}
    assert {"Namespace", "Secret", "Deployment", "Service"} <= kinds
    assert [p for m in manifests for p in offline.schema_problems(m)] == []
    assert set(run.exports) == {"endpoint", "models", "apiKey", "image", "namespace"}
    assert run.secret_exports == {"apiKey"}


def test_prod_runs_vllm_on_nvidia_gpus_behind_a_load_balancer():
    run = offline.run_program(*offline.read_stack_file(offline.PROJECT_DIR / "Pulumi.prod.yaml"))
    [deployment] = [offline.to_manifest(r) for r in run.mocks.of_type("kubernetes:apps/v1:Deployment")]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]
    assert "@sha256:" in container["image"]
    # Prod's LoadBalancer is the ingress controller's Service (it balances per
    # request); the model Service behind it is internal.
    [model_service] = [r for r in run.mocks.of_type("kubernetes:core/v1:Service") if not r.read]
    assert model_service.inputs["spec"]["type"] == "ClusterIP"
    [controller] = [r for r in run.mocks.of_type("kubernetes:helm.sh/v3:Release")
                    if "nginx-ingress" in r.inputs["chart"]]
    assert controller.inputs["values"]["controller"]["service"]["type"] == "LoadBalancer"
    # TLS by default: the host, over HTTPS (cert-manager issues the certificate).
    assert run.exports["endpoint"] == "https://llm.example.com/v1"


def test_dev_builds_into_the_local_daemon_without_pushing():
    run = offline.run_program(*offline.read_stack_file(offline.PROJECT_DIR / "Pulumi.dev.yaml"))
    [image] = run.mocks.of_type("docker:index/image:Image")
    assert image.inputs["skipPush"] is True
    assert run.exports["image"] == image.inputs["imageName"]


def test_stack_file_secure_values_become_plain_test_secrets(tmp_path: Path):
    stack = tmp_path / "Pulumi.s.yaml"
    stack.write_text(yaml.safe_dump({"config": {
        "llm-serving:model": {"id": "m"},
        "llm-serving:hfToken": {"secure": "AAABAC0ffee"},
    }}))
    config, secret_keys = offline.read_stack_file(stack)
    assert secret_keys == ["llm-serving:hfToken"]
    run = offline.run_program(config, secret_keys)
    token_secrets = [r for r in run.mocks.of_type("kubernetes:core/v1:Secret")
                     if "token" in r.inputs["stringData"]]
    assert token_secrets[0].inputs["stringData"]["token"] == offline.TEST_SECRET_VALUES["hfToken"]


def test_a_misspelt_key_in_a_stack_file_fails_naming_it():
    config, secrets = offline.read_stack_file(offline.PROJECT_DIR / "Pulumi.dev.yaml")
    config["llm-serving:replcias"] = "3"
    with pytest.raises(ConfigError, match=r"llm-serving:replcias: unknown key"):
        offline.run_program(config, secrets)


def test_schema_validation_catches_an_invalid_manifest():
    run = offline.run_program(*offline.read_stack_file(offline.PROJECT_DIR / "Pulumi.dev.yaml"))
    [deployment] = [offline.to_manifest(r) for r in run.mocks.of_type("kubernetes:apps/v1:Deployment")]
    broken = copy.deepcopy(deployment)
    broken["spec"]["replicas"] = "two"
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {}
    problems = offline.schema_problems(broken)
    assert any("spec.replicas" in p for p in problems)
    assert any("httpGett" in p for p in problems)
    assert any("[Kubernetes 1.31.0]" in p for p in problems)


def _render(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tools.render", *args],
        cwd=offline.PROJECT_DIR, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(offline.PROJECT_DIR)},
    )


def test_render_cli_writes_valid_manifests(tmp_path: Path):
    result = _render("--stack", "prod", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "kubernetes:apps/v1:Deployment" in result.stdout
    assert "gpus=nvidia.com/gpu:1" in result.stdout
    assert "output apiKey: [secret]" in result.stdout
    written = sorted({p.name.split("-")[0] for p in tmp_path.glob("*.yaml")})
    assert (tmp_path / "nginx.conf").exists()
    assert (tmp_path / "prometheus-rules.yml").exists()
    assert written == ["certificate", "clusterissuer", "configmap", "deployment", "helmrelease",
                       "ingress",
                       "namespace", "networkpolicy", "poddisruptionbudget", "prometheusrule",
                       "scaledobject", "secret", "service", "servicemonitor"]
    # Each Helm release the stack installs, with its chart, version and full values.
    releases = {p.name: yaml.safe_load(p.read_text()) for p in tmp_path.glob("helmrelease-*.yaml")}
    assert set(releases) == {"helmrelease-llm-nginx.yaml", "helmrelease-keda.yaml",
                             "helmrelease-cert-manager.yaml"}
    controller = releases["helmrelease-llm-nginx.yaml"]
    assert controller["chart"] == NIC_CHART and controller["version"] == NIC_CHART_VERSION
    assert controller["namespace"] == "nginx-ingress"
    assert controller["values"]["controller"]["ingressClass"]["name"] == "llm-nginx"
    assert releases["helmrelease-keda.yaml"]["repository"] == KEDA_REPOSITORY
    deployment = yaml.safe_load(next(tmp_path.glob("deployment-*.yaml")).read_text())
    assert isinstance(deployment["spec"]["replicas"], int)
    assert "startupProbe" in deployment["spec"]["template"]["spec"]["containers"][0]
    secret = yaml.safe_load(next(tmp_path.glob("secret-*.yaml")).read_text())
    assert set(secret["stringData"].values()) == {"<secret>"}
    # One line says what `pulumi up` would do, counted by kind; the counts are what was
    # written (a manifest file per object, a file per Helm release) and what the table lists.
    manifests = [p for p in tmp_path.glob("*.yaml") if not p.name.startswith("helmrelease-")]
    [line] = [l for l in result.stdout.splitlines() if l.startswith("would create ")]
    assert line == (f"would create {len(manifests) + len(releases) + 2} resources "
                    f"({len(manifests)} manifests, {len(releases)} Helm releases, one image "
                    f"build, one random value) in "
                    f"{result.stdout.count('llm-serving:index:')} components")
    # The digest of an image nobody built is the mocks', and says so where it is printed.
    [image_line] = [l for l in result.stdout.splitlines() if l.startswith("output image:")]
    assert "@sha256:" in image_line and image_line.endswith("[mocked: image digest]")
    assert "output endpoint: https://llm.example.com/v1\n" in result.stdout  # from the config
    deployment_text = next(tmp_path.glob("deployment-*.yaml")).read_text()
    assert "#   spec.template.spec.containers[0].image: image digest\n" in deployment_text


def test_render_cli_writes_the_gateway_stack(tmp_path: Path):
    from components.pins import EPP_CHART, NGF_CHART, NGF_VERSION

    result = _render("--stack", "prod-gateway", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    kinds = {p.name.split("-")[0] for p in tmp_path.glob("*.yaml")}
    assert {"gateway", "httproute", "proxysettingspolicy", "clientsettingspolicy",
            "helmrelease", "deployment", "scaledobject"} <= kinds
    releases = {p.name: yaml.safe_load(p.read_text()) for p in tmp_path.glob("helmrelease-*.yaml")}
    assert set(releases) == {"helmrelease-llm-nginx.yaml", "helmrelease-llm-qwen-7b.yaml",
                             "helmrelease-llm-coder-14b.yaml", "helmrelease-keda.yaml"}
    controller = releases["helmrelease-llm-nginx.yaml"]
    assert (controller["chart"], controller["version"]) == (NGF_CHART, NGF_VERSION)
    assert releases["helmrelease-llm-coder-14b.yaml"]["chart"] == EPP_CHART
    # One Deployment per model, and the router.
    assert len(list(tmp_path.glob("deployment-*.yaml"))) == 3
    assert "output endpoint: https://llm.example.com/v1" in result.stdout
    # The local-mode nginx.conf serves every model of the stack, routed by the body's model,
    # with each model's replica count (the autoscaling minimum: 2 each), and nginx accepts it.
    conf = (tmp_path / "nginx.conf").read_text()
    served = ["qwen2.5-7b-instruct", "qwen2.5-coder-14b-instruct"]
    for index, name in enumerate(served):
        assert f"llm_model_{index};  # {name}" in conf
        block = conf.split(f"upstream llm_model_{index} {{", 1)[1].split("}", 1)[0]
        assert block.count("server 127.0.0.1:") == 2
    assert "mirror /_llm_read_body;" in conf
    if NGINX is not None:
        checked = subprocess.run(
            [NGINX, "-t", "-p", f"{tmp_path}/", "-c", str(tmp_path / "nginx.conf"),
             "-e", str(tmp_path / "error.log")], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr


@needs_nginx
def test_rendered_local_nginx_conf_passes_nginx_t(tmp_path: Path):
    result = _render("--stack", "prod", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    conf = (tmp_path / "nginx.conf").read_text()
    assert "least_conn;" in conf and "proxy_buffering off;" in conf
    checked = subprocess.run(
        [NGINX, "-t", "-p", f"{tmp_path}/", "-c", str(tmp_path / "nginx.conf"),
         "-e", str(tmp_path / "error.log")],
        capture_output=True, text=True, timeout=30,
    )
    assert checked.returncode == 0, checked.stderr


def test_render_cli_names_a_misspelt_key_without_a_traceback(tmp_path: Path):
    bad = tmp_path / "Pulumi.bad.yaml"
    document = yaml.safe_load((offline.PROJECT_DIR / "Pulumi.dev.yaml").read_text())
    document["config"]["llm-serving:model"]["maxOutputTokns"] = 64
    bad.write_text(yaml.safe_dump(document))
    result = _render("--stack", "bad", "--stack-file", str(bad))
    assert result.returncode == 2
    assert "llm-serving:model.maxOutputTokns: unknown key" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_render_cli_names_an_unknown_stack():
    result = _render("--stack", "staging")
    assert result.returncode == 2
    assert "Pulumi.staging.yaml" in result.stderr and "dev" in result.stderr


# --- what render prints -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dev_render(tmp_path_factory):
    """`python -m tools.render --stack dev --out DIR`, in process: (stdout, stderr, DIR)."""
    import contextlib
    import io

    from tools import render

    out = tmp_path_factory.mktemp("dev")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert render.render("dev", out) == 0
    return stdout.getvalue(), stderr.getvalue(), out


def test_render_prefixes_every_warning(dev_render):
    """The dev stack's warning (a component's pulumi.log.warn) comes out as `warning: ...`,
    as `pulumi preview` prints it, not as bare text."""
    _, stderr, _ = dev_render
    lines = stderr.splitlines()
    assert any("modelCache.accessMode ReadWriteOnce" in l for l in lines)
    assert lines and all(l.startswith("warning: ") for l in lines), lines


def test_render_marks_the_mocked_load_balancer_address_and_random_key(dev_render):
    stdout, _, _ = dev_render
    assert (f"output endpoint: http://{offline.FAKE_LB_IP}/v1  [mocked: load-balancer address]"
            in stdout.splitlines())
    assert "output apiKey: [secret]  [mocked: random value]" in stdout.splitlines()
    assert "output image: llm-server:dev" in stdout.splitlines()  # the config's, not mocked
    assert "would create 9 resources (7 manifests, no Helm release, one image build, one " \
           "random value) in 6 components" in stdout.splitlines()


def test_render_names_the_schema_versions_and_why(dev_render):
    from kubernetes_validate import utils

    stdout, _, _ = dev_render
    newest = utils.latest_version()
    assert (f"against the Kubernetes {offline.OLDEST_KUBERNETES} and {newest} API schemas "
            f"({offline.OLDEST_KUBERNETES}: the oldest Kubernetes the stacks support; {newest}: "
            "the newest kubernetes-validate") in stdout
    assert "newest," not in stdout and "latest" not in stdout


def test_rendered_yaml_is_in_kubectls_field_order(dev_render):
    """`kubectl get -o yaml` order: keys sorted the go-yaml way at every level, so apiVersion,
    kind, metadata, spec; a container's image before its name; name before value in env."""
    _, _, out = dev_render
    deployment = yaml.safe_load(next(out.glob("deployment-*.yaml")).read_text())
    assert list(deployment) == ["apiVersion", "kind", "metadata", "spec"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    keys = list(container)
    assert keys.index("image") < keys.index("imagePullPolicy") < keys.index("name")
    assert keys == sorted(keys)  # these keys are plain letters: go-yaml's order is code point
    assert all(list(env)[0] == "name" and list(env)[1] in ("value", "valueFrom")
               for env in container["env"])
    secret = yaml.safe_load(next(out.glob("secret-*.yaml")).read_text())
    assert list(secret) == ["apiVersion", "kind", "metadata", "stringData", "type"]
    labels = list(deployment["metadata"]["labels"])
    assert labels == sorted(labels)


def test_kubectl_key_order_follows_go_yaml():
    """go-yaml v2's key order (kubernetes-sigs/yaml@v1.4.0 goyaml.v2/sorter.go): a non-letter
    before a letter, upper case before lower, digit runs as numbers, the shorter key first."""
    keys = ["a10", "b", "a2", "ab", "a.b", "Z", "_x", "a", "a100", "a19"]
    assert list(offline.kubectl_order(dict.fromkeys(keys))) == [
        "_x", "Z", "a", "a.b", "a2", "a10", "a19", "a100", "ab", "b"]
    configmap = {"metadata": {}, "kind": "ConfigMap", "data": {}, "apiVersion": "v1"}
    assert list(offline.kubectl_order(configmap)) == ["apiVersion", "data", "kind", "metadata"]


def test_readme_quotes_the_dev_render_summary(dev_render):
    stdout, _, _ = dev_render
    readme = " ".join((offline.PROJECT_DIR / "README.md").read_text().split())
    [quoted] = re.findall(r"`(would create [^`]*)` for dev", readme)
    [printed] = [l for l in stdout.splitlines() if l.startswith("would create ")]
    assert quoted == printed
