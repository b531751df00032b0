"""Preview a stack offline: `python -m tools.render --stack dev [--out DIR]`.

Runs __main__.py under Pulumi's mocks with Pulumi.<stack>.yaml, prints the
resources it would create and a one-line summary of what `pulumi up` would do,
writes every Kubernetes object as a YAML manifest (in `kubectl get -o yaml`'s
field order), and validates each against the Kubernetes OpenAPI schemas. What
the mocks make up (a load balancer's address, image digests, random values,
Pulumi's name suffixes) is marked as mocked wherever it is printed or written.
Exit codes: 0 all valid, 1 a manifest is invalid, 2 the configuration or the
command is wrong.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from components.config.parse import ConfigError, parse_stack_config
from components.config.rules import stack_warnings
from components.config.stack import StackConfig
from components.engines import PROFILES
from components.policies.alerting import local_rules
from components.policies.balancing import SERVER_ADMISSION_DEFAULT
from components.policies.nginx_conf import nginx_conf
from local.models import models_from_stack
from tools import offline


def _facts(resource: offline.Recorded) -> str:
    """The few fields a reviewer looks for first."""
    inputs = offline._normalise(resource.inputs)
    spec = inputs.get("spec", {})
    facts = []
    if resource.read:
        return "(existing object, read)"
    if resource.type == "kubernetes:apps/v1:Deployment":
        pod = spec["template"]["spec"]
        container = pod["containers"][0]
        facts.append(f"replicas={spec.get('replicas')}")
        gpus = {
            k: v for k, v in container.get("resources", {}).get("limits", {}).items() if "gpu" in k
        }
        facts.append("gpus=" + (",".join(f"{k}:{v}" for k, v in gpus.items()) or "0"))
        facts.append(f"image={container['image']}")
    elif resource.type == "kubernetes:core/v1:Service":
        ports = ",".join(str(p["port"]) for p in spec.get("ports", []))
        facts.append(f"type={spec.get('type', 'ClusterIP')} port={ports}")
    elif resource.type == "kubernetes:core/v1:PersistentVolumeClaim":
        facts.append(f"size={spec['resources']['requests']['storage']}")
    elif resource.type == "docker:index/image:Image":
        facts.append(f"image={inputs['imageName']} push={not inputs.get('skipPush', False)}")
    elif resource.type.startswith("kubernetes:helm.sh"):
        facts.append(f"chart={inputs.get('chart')} version={inputs.get('version')}")
        service = inputs.get("values", {}).get("controller", {}).get("service", {})
        if service.get("type"):
            facts.append(f"service type={service['type']}")
    elif resource.type == "kubernetes:networking.k8s.io/v1:Ingress":
        annotations = inputs.get("metadata", {}).get("annotations", {})
        facts.append(f"class={spec.get('ingressClassName')}")
        role = annotations.get("nginx.org/mergeable-ingress-type")
        if role:
            facts.append(f"mergeable={role}")
        if any(rule.get("http") for rule in spec.get("rules", [])):
            facts.append(
                f"lb-method={annotations.get('nginx.org/lb-method')!r} "
                f"buffering={annotations.get('nginx.org/proxy-buffering')} "
                f"read-timeout={annotations.get('nginx.org/proxy-read-timeout')}"
            )
        if spec.get("tls"):
            facts.append("tls=" + ",".join(h for t in spec["tls"] for h in t.get("hosts", [])))
    elif resource.type == "kubernetes:keda.sh/v1alpha1:ScaledObject":
        facts.append(
            f"replicas={spec.get('minReplicaCount')}..{spec.get('maxReplicaCount')} "
            f"triggers={len(spec.get('triggers', []))}"
        )
    return " ".join(facts)


def _count(n: int, one: str, many: str | None = None) -> str:
    """`no Helm release`, `one image build`, `7 manifests`."""
    if n == 0:
        return f"no {one}"
    return f"one {one}" if n == 1 else f"{n} {many or one + 's'}"


IMAGE_BUILDS = ("docker:index/image:Image", "docker-build:index:Image")


def summary(resources: list[offline.Recorded]) -> str:
    """What `pulumi up` would do, counted by kind from what the program registers:
    `would create 9 resources (7 manifests, no Helm release, one image build, one random
    value) in 6 components`."""
    created = [r for r in resources if not r.read]
    components = [r for r in created if r.type.startswith("llm-serving:")]
    kinds = {
        "manifests": [r for r in created if offline.is_kubernetes_object(r)],
        "helm": [r for r in created if offline.is_helm_release(r)],
        "images": [r for r in created if r.type in IMAGE_BUILDS],
        "random": [r for r in created if r.type.startswith("random:")],
    }
    counted = {id(r) for group in kinds.values() for r in group} | {id(r) for r in components}
    other = [r for r in created if id(r) not in counted]
    parts = [
        _count(len(kinds["manifests"]), "manifest"),
        _count(len(kinds["helm"]), "Helm release"),
        _count(len(kinds["images"]), "image build"),
        _count(len(kinds["random"]), "random value"),
    ]
    if other:
        parts.append(_count(len(other), "other resource"))
    total = len(created) - len(components)
    line = (f"would create {_count(total, 'resource')} ({', '.join(parts)}) "
            f"in {_count(len(components), 'component')}")
    reads = [r for r in resources if r.read]
    if reads:
        line += f", and read {_count(len(reads), 'existing object')}"
    return line


def _marked(text: str, mocks: offline.RecordingMocks) -> str:
    """`text`, followed by what in it the mocks made up: `... [mocked: image digest]`."""
    mocked = mocks.mocked_in(text)
    return f"{text}  [mocked: {', '.join(mocked)}]" if mocked else text


def _manifest_yaml(manifest: dict[str, Any], mocks: offline.RecordingMocks) -> str:
    """The manifest as YAML, headed by a comment naming each field whose value is mocked."""
    found = mocks.mocked_paths(manifest)
    header = ""
    if found:
        header = ("# Rendered offline (python -m tools.render); mocked here, computed by "
                  "`pulumi up`:\n")
        header += "".join(f"#   {path}: {what}\n" for path, what in found)
    return header + yaml.safe_dump(manifest, sort_keys=False)


def _table(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(
        f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}".rstrip() for r in rows
    )


def _file_name(manifest: dict[str, Any]) -> str:
    return f"{manifest['kind'].lower()}-{manifest['metadata']['name']}.yaml"


LOCAL_FIRST_PORT = 8000
LOCAL_LISTEN_PORT = 8080
SERVER_DEFAULT_QUEUE = 128
"""LLM_MAX_QUEUE's default (server/settings.py); the stack does not set it."""


def _local_nginx_conf(cfg: StackConfig, out: Path) -> str:
    """The same loadBalancing policy as plain nginx.conf, for replicas on 127.0.0.1:8000+
    (every model's, model after model, as `python -m local up --stack` starts them)."""
    models = models_from_stack(cfg)
    replicas = sum(m.replicas for m in models)
    addresses = iter(f"127.0.0.1:{LOCAL_FIRST_PORT + i}" for i in range(replicas))
    groups = {m.served_name: [next(addresses) for _ in range(m.replicas)] for m in models}
    upstreams = groups if len(groups) > 1 else next(iter(groups.values()))
    admitted = None
    slots = [view.model.max_concurrency for view in cfg.model_views()]
    if any(s is not None for s in slots):  # running slots + the server's default queue
        admitted = sum(m.replicas * (SERVER_ADMISSION_DEFAULT if s is None
                                     else s + SERVER_DEFAULT_QUEUE)
                       for m, s in zip(models, slots))
    return nginx_conf(
        cfg.load_balancing, upstreams, LOCAL_LISTEN_PORT, cfg.model.max_output_tokens,
        prefix=out.resolve(), admission_limit=admitted,
        replica_slots=cfg.model.max_concurrency,
    )


def _local_rules(cfg: StackConfig) -> str:
    """The same alerting policy as a plain rule file for local mode: its scrape job, and the
    metric names of the server engine local mode runs."""
    return local_rules(cfg, profile=PROFILES["server"])


def render(stack: str, out: Path | None, stack_file: Path | None = None) -> int:
    stack_file = stack_file or offline.PROJECT_DIR / f"Pulumi.{stack}.yaml"
    if not stack_file.exists():
        known = sorted(p.name[len("Pulumi."):-len(".yaml")] for p in offline.PROJECT_DIR.glob("Pulumi.*.yaml"))
        print(f"error: no stack file {stack_file.name}; stacks here: {', '.join(known)}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        config, secret_keys = offline.read_stack_file(stack_file)
    except yaml.YAMLError as err:
        print(f"error: {stack_file.name} is not valid YAML: {err}", file=sys.stderr)
        return 2
    try:
        cfg = parse_stack_config(offline.namespace_values(config))
        run = offline.run_program(config, secret_keys, stack=stack)
    except ConfigError as err:
        print(f"error: {stack_file.name}: {err}", file=sys.stderr)
        return 2

    rows = [("TYPE", "NAME", "FACTS")]
    rows += [(r.type, r.name, _marked(_facts(r), run.mocks)) for r in run.resources]
    print(_table(rows))

    # What the program logs (LlmStack logs the configuration's warnings; components add their
    # own), each line prefixed as Pulumi prints it; the configuration's warnings also when the
    # program did not log them.
    messages = list(run.mocks.messages)
    messages += [("warning", w) for w in stack_warnings(cfg) if ("warning", w) not in messages]
    for severity, text in messages:
        print(f"{severity}: {text}", file=sys.stderr)

    manifests = [offline.to_manifest(r) for r in run.resources if offline.is_kubernetes_object(r)]
    releases = [offline.to_helm_release(r) for r in run.resources if offline.is_helm_release(r)]
    problems = [p for m in manifests for p in offline.schema_problems(m)]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for manifest in manifests:
            (out / _file_name(manifest)).write_text(_manifest_yaml(manifest, run.mocks))
        for release in releases:
            (out / f"helmrelease-{release['name']}.yaml").write_text(
                yaml.safe_dump(release, sort_keys=False)
            )
        (out / "nginx.conf").write_text(_local_nginx_conf(cfg, out))
        (out / "prometheus-rules.yml").write_text(_local_rules(cfg))

    print()
    for name, value in sorted(run.exports.items()):
        if name in run.secret_exports:  # say what it is made of, never the value
            mocked = run.mocks.mocked_in(str(value))
            print(f"output {name}: [secret]" + (f"  [mocked: {', '.join(mocked)}]" if mocked
                                                 else ""))
        else:
            print(_marked(f"output {name}: {value}", run.mocks))
    print(f"\n{summary(run.resources)}")
    elapsed = time.perf_counter() - started
    if problems:
        print(f"\n{len(problems)} schema problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    where = (
        f", written to {out} with {_count(len(releases), 'Helm release file')}, the local-mode "
        "nginx.conf and prometheus-rules.yml" if out is not None else ""
    )
    print(
        f"{len(manifests)} manifests valid against {offline.schema_versions_described()}"
        f"{where} ({elapsed:.1f} s)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.render", description=__doc__.splitlines()[0])
    parser.add_argument("--stack", required=True, help="stack name: reads Pulumi.<stack>.yaml")
    parser.add_argument("--out", type=Path, help="directory to write the manifests into")
    parser.add_argument(
        "--stack-file", type=Path, help="read this file instead of Pulumi.<stack>.yaml"
    )
    args = parser.parse_args(argv)
    return render(args.stack, args.out, args.stack_file)


if __name__ == "__main__":
    sys.exit(main())
