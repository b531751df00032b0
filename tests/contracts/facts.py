"""Upstream facts, one JSON file per pinned component version, and the checks that hold the
code to them.

Each file under `data/` is `<component>-<version>.json` with at least `component`, `version`,
`read` (the date it was read) and `sources` (fact -> `owner/repo@tag:path[:line]`): what that
exact version accepts, read from its source at the tag. Mocks show what the program asks for;
these facts say what the deployed version will accept.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from components.pins import PINNED

DATA = Path(__file__).parent / "data"


@functools.cache
def load(component: str, version: str) -> dict[str, Any]:
    path = DATA / f"{component}-{version}.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no facts for {component} {version}: read that version's source at its tag and "
            f"record what the code relies on in {path.relative_to(DATA.parent.parent.parent)}"
        )
    return json.loads(path.read_text())


def pinned(component: str) -> dict[str, Any]:
    """The facts of the version components/pins.py pins."""
    return load(component, PINNED[component])


def all_files() -> list[Path]:
    return sorted(DATA.glob("*.json"))


# --- NGINX Ingress Controller ----------------------------------------------------------------


def annotation_problems(annotations: Mapping[str, str], facts: Mapping[str, Any]) -> list[str]:
    """Annotations the controller version would ignore, or whose value it would reject."""
    problems = []
    known = set(facts["annotations"])
    patterns = facts.get("valuePatterns", {})
    version = facts["version"]
    for key, value in annotations.items():
        if key not in known:
            problems.append(f"{key}: not read by controller {version} (silently ignored)")
            continue
        pattern = patterns.get(key)
        if pattern is not None and not re.match(pattern, value):
            problems.append(f"{key}: value {value!r} fails controller {version}'s rule {pattern}")
    if "nginx.org/proxy-next-upstream" in annotations:
        tokens = annotations["nginx.org/proxy-next-upstream"].split()
        if len(tokens) != len(set(tokens)):
            problems.append("nginx.org/proxy-next-upstream: duplicate token (rejected)")
    return problems


def value_paths(values: Mapping[str, Any], prefix: str = "") -> Iterable[str]:
    """Dotted paths of the leaves of a Helm values tree."""
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from value_paths(value, f"{path}.")
        else:
            yield path


def chart_value_problems(values: Mapping[str, Any], facts: Mapping[str, Any]) -> list[str]:
    """Values the chart does not read. Helm accepts unknown keys silently (the chart's schema
    does not forbid them), so a misspelt key would simply do nothing."""
    chart = facts["chartValues"]
    known = set(chart["values"])
    top_level = set(chart["schemaTopLevelKeys"]) | set(chart["templateOnlyTopLevelKeys"])
    problems = []
    for path in value_paths(values):
        # A value may be an object the chart passes through whole (resources, annotations).
        parents = [path.rsplit(".", n)[0] for n in range(path.count(".") + 1)]
        if not any(p in known for p in parents) and path not in top_level:
            problems.append(f"{path}: not a value chart {facts['chartVersion']} reads")
    return problems


# --- kube-state-metrics ------------------------------------------------------------------------

_SELECTOR = re.compile(r"\b(kube_[a-zA-Z0-9_]+)\s*(?:\{([^}]*)\})?")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def kube_state_metrics_problems(expr: str, facts: Mapping[str, Any]) -> list[str]:
    """What a PromQL expression reads from kube-state-metrics that the pinned version does not
    export: an unknown kube_* metric, or a label (in a selector, or grouped by) that none of the
    expression's kube_* metrics carries."""
    metrics = facts["metrics"]
    version = facts["version"]
    problems, carried = [], set()
    for name, matchers in _SELECTOR.findall(expr):
        if name not in metrics:
            problems.append(f"{name}: not exported by kube-state-metrics {version}")
            continue
        labels = set(metrics[name]["labels"])
        carried |= labels
        for label in _MATCHER.findall(matchers):
            if label not in labels:
                problems.append(f"{name}: no label {label!r} in kube-state-metrics {version}")
    if carried:
        for group in _GROUPING.findall(expr):
            for label in (l.strip() for l in group.split(",") if l.strip()):
                if label not in carried:
                    problems.append(f"grouped by {label!r}, a label no kube_* series here carries")
    return problems


# --- mergeable Ingresses (NGINX Ingress Controller) --------------------------------------------


def _paths(ingress: Mapping[str, Any]) -> list[str]:
    return [p.get("path", "") for rule in ingress["spec"].get("rules", [])
            for p in (rule.get("http") or {}).get("paths", [])]


def host_problems(ingresses: list[Mapping[str, Any]], facts: Mapping[str, Any]) -> list[str]:
    """How the controller version would serve these Ingresses of one IngressClass (manifests,
    camelCase): a host held by two Ingresses (the younger is ignored), a master or minion its
    rules reject, an annotation dropped for its role, a minion without a master, a path two
    minions claim."""
    rules = facts["mergeableIngresses"]
    key = rules["annotation"]
    problems: list[str] = []
    holders: dict[str, list[str]] = {}
    minions: dict[str, list[tuple[str, list[str]]]] = {}
    for ingress in ingresses:
        name = ingress["metadata"]["name"]
        annotations = ingress["metadata"].get("annotations", {})
        role = annotations.get(key)
        spec = ingress["spec"]
        hosts = [r.get("host", "") for r in spec.get("rules", [])]
        if role is not None and role not in rules["values"]:
            problems.append(f"{name}: {key} {role!r} is rejected (allowed: {rules['values']})")
            continue
        if role == "master":
            if len(hosts) != rules["master"]["rules"] or _paths(ingress):
                problems.append(f"{name}: a master needs exactly one rule and no paths")
            dropped = set(annotations) & set(rules["masterDenylist"])
        elif role == "minion":
            if spec.get("tls"):
                problems.append(f"{name}: a minion may not have tls")
            if len(hosts) != rules["minion"]["rules"] or len(_paths(ingress)) < 1:
                problems.append(f"{name}: a minion needs exactly one rule with a path")
            dropped = set(annotations) & set(rules["minionDenylist"])
            minions.setdefault(hosts[0] if hosts else "", []).append((name, _paths(ingress)))
        else:
            dropped = set()
        if dropped:
            problems.append(f"{name}: {sorted(dropped)} ignored on a {role}")
        if role != "minion":
            for host in hosts:
                holders.setdefault(host, []).append(name)
    for host, names in holders.items():
        if len(names) > 1:
            problems.append(f"host {host!r} is taken by another resource: {sorted(names)}")
    for host, found in minions.items():
        masters = [n for n in holders.get(host, []) if any(
            i["metadata"]["name"] == n and i["metadata"].get("annotations", {}).get(key) == "master"
            for i in ingresses)]
        if not masters:
            problems.append(f"minions {[n for n, _ in found]} of {host!r} have no master")
        seen: dict[str, str] = {}
        for name, paths in found:
            for path in paths:
                if path in seen:
                    problems.append(f"path {path} of {host!r} is taken by {seen[path]}")
                seen[path] = name
    return problems


def solver_ingress(facts: Mapping[str, Any], host: str, class_name: str,
                   template: Mapping[str, Any] | None) -> dict[str, Any]:
    """The Ingress cert-manager's HTTP-01 solver creates for `host`, as the version's facts
    describe it (labels, the issuer's ingressTemplate annotations, one rule, one path)."""
    solver = facts["solverIngress"]
    metadata = (template or {}).get("metadata", {})
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": f"{solver['generateName']}x1",
                     "labels": {**solver["labels"], **metadata.get("labels", {})},
                     "annotations": dict(metadata.get("annotations", {}))},
        "spec": {"ingressClassName": class_name, "rules": [{"host": host, "http": {"paths": [{
            "path": solver["path"].replace("<token>", "t0k3n"), "pathType": solver["pathType"],
            "backend": {"service": {"name": "cm-acme-http-solver-x1",
                                    "port": {"number": solver["servicePortNumber"]}}}}]}}]},
    }
