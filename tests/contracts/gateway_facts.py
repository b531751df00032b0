"""What the Gateway path may render, held to the pinned upstreams' own rules.

The facts (tests/contracts/data) are NGINX Gateway Fabric's chart values and behaviour, the Gateway
API CRDs, and the Inference Extension's CRDs, endpoint-picker (EPP) chart and flags, each read at
its pinned tag. Component code calls:

- `check_values(chart, values)`: every key a Helm release sets is one that chart version reads, with
  a value of the type (and enum) it accepts. Helm itself ignores unknown keys silently for both
  charts (NGF's values.schema.json allows extra keys; the EPP chart has no schema at all).
- `check_manifest(obj)`: a Gateway API, Inference Extension or NGF policy object is valid against
  the CRD's own OpenAPI schema with unknown fields rejected (the API server would prune them
  silently), passes the CEL rules named in `CEL_EVALUATED`, uses only fields whose behaviour at the
  pins was read, and avoids what NGF 2.6.7 ignores.

Both raise ValueError with one line per problem, naming the key or field and what is allowed;
`values_problems` and `manifest_problems` return the same lines as a list.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, Iterable, Mapping

import jsonschema

from components.pins import PINNED
from tests.contracts import facts
from tools import crd_schemas

NGF_CHART = "nginx-gateway-fabric"
EPP_CHART = "inferencepool"

NGF = facts.pinned("nginx-gateway-fabric")
GIE = facts.pinned("gateway-api-inference-extension")
GWAPI = facts.pinned("gateway-api")


@functools.cache
def supplement(component: str, topic: str) -> dict[str, Any]:
    """A pinned component's facts on one topic: `<component>-<version>.<topic>.json`."""
    return json.loads((facts.DATA / f"{component}-{PINNED[component]}.{topic}.json").read_text())


def normalise(value: Any) -> Any:
    """Pulumi mocks hand numbers over as floats (`replicas: 2.0`): make integral floats ints."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    return value


def _raise(problems: list[str], what: str) -> None:
    if problems:
        raise ValueError(f"{what}:\n" + "\n".join(f"  {p}" for p in problems))


# --- chart values ---------------------------------------------------------------------------


def values_problems(chart: str, values: Mapping[str, Any]) -> list[str]:
    """Keys the chart does not read and values it would reject or mis-render."""
    checks: dict[str, Callable[[Mapping[str, Any]], list[str]]] = {
        NGF_CHART: _ngf_values_problems,
        EPP_CHART: _epp_values_problems,
    }
    if chart not in checks:
        return [f"chart {chart!r}: no facts; known charts: {sorted(checks)}"]
    return checks[chart](normalise(values))


def check_values(chart: str, values: Mapping[str, Any]) -> None:
    _raise(values_problems(chart, values), f"values for chart {chart}")


@functools.cache
def _ngf_schema() -> dict[str, Any]:
    return supplement("nginx-gateway-fabric", "values_schema")["schema"]


def _ngf_values_problems(values: Mapping[str, Any]) -> list[str]:
    version = NGF["chart"]["version"]
    template_only = set(NGF["chartValues"]["templateOnlyTopLevelKeys"])
    problems = []

    def walk(node: Mapping[str, Any], schema: Mapping[str, Any], path: str) -> None:
        props = schema.get("properties")
        if props is None:  # an object the chart passes through whole (resources, affinity, ...)
            return
        for key, value in node.items():
            where = f"{path}{key}"
            if key not in props:
                if not path and key in template_only:
                    continue
                problems.append(f"{where}: not a value chart {NGF_CHART} {version} reads (Helm would "
                                f"ignore it); keys here: {', '.join(sorted(props))}")
            elif isinstance(value, Mapping):
                walk(value, props[key], f"{where}.")

    walk(values, _ngf_schema(), "")
    # Helm validates the user's values merged over the chart's values.yaml, so required keys the
    # defaults provide are present.
    merged = _coalesce(supplement("nginx-gateway-fabric", "values_schema")["valuesYaml"], values)
    validator = jsonschema.Draft7Validator(_ngf_schema())
    for error in sorted(validator.iter_errors(merged), key=lambda e: [str(p) for p in e.path]):
        where = ".".join(str(p) for p in error.path) or "(root)"
        problems.append(f"{where}: {error.message} (values.schema.json of chart {version})")
    return problems


def _coalesce(defaults: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """Helm's merge of user values over chart defaults: maps merge, anything else replaces."""
    out = dict(defaults)
    for key, value in values.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _coalesce(out[key], value)
        else:
            out[key] = value
    return out


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "boolean": (bool,), "integer": (int,), "number": (int, float), "string": (str,),
    "array": (list, tuple), "object": (Mapping,),
}


def _is(value: Any, json_type: str) -> bool:
    if json_type == "null":
        return True  # default null: the chart gives no type
    if json_type in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _JSON_TYPES[json_type])


def _epp_values_problems(values: Mapping[str, Any]) -> list[str]:
    chart = GIE["eppChart"]
    table: dict[str, dict[str, Any]] = chart["values"]
    label = f"chart {EPP_CHART} {chart['version']}"
    problems = []

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            entry = table.get(path)
            if entry is not None:
                if not _is(value, entry["type"]):
                    problems.append(f"{path}: {value!r} is not of type {entry['type']} ({label})")
                elif "enum" in entry and value not in entry["enum"]:
                    problems.append(f"{path}: {value!r} is not one of {entry['enum']} ({label})")
                elif isinstance(value, Mapping) and not entry.get("freeForm"):
                    walk(value, f"{path}.")
                continue
            if any(k.startswith(f"{path}.") for k in table):
                if isinstance(value, Mapping):
                    walk(value, f"{path}.")
                else:
                    problems.append(f"{path}: must be a map, got {value!r} ({label})")
                continue
            siblings = sorted({k[len(prefix):].split(".")[0] for k in table if k.startswith(prefix)})
            problems.append(f"{path}: not a value {label} reads (Helm would ignore it); keys here: "
                            f"{', '.join(siblings)}")

    walk(values, "")
    problems += _epp_semantic_problems(values, label)
    return problems


def _get(values: Mapping[str, Any], path: str, default: Any = None) -> Any:
    node: Any = values
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


# Flags the EPP chart already renders itself (cited in the facts' eppChart.argsRendered).
_CHART_RENDERED_FLAGS = {"pool-name", "pool-namespace", "pool-group", "zap-encoder", "config-file",
                         "ha-enable-leader-election", "tracing", "metrics-endpoint-auth"}


def _epp_semantic_problems(values: Mapping[str, Any], label: str) -> list[str]:
    """What the EPP chart renders but the EPP or Kubernetes would reject, read in its templates."""
    problems = []
    labels = _get(values, "inferencePool.modelServers.matchLabels")
    if not labels:
        problems.append(f"inferencePool.modelServers.matchLabels: required by {label} (its render fails without it)")
    elif not all(isinstance(v, str) and isinstance(k, str) for k, v in labels.items()):
        problems.append("inferencePool.modelServers.matchLabels: label keys and values must be strings")
    ports = _get(values, "inferencePool.targetPorts")
    if ports is not None:
        numbers = [p.get("number") if isinstance(p, Mapping) else None for p in ports]
        if not numbers or not all(isinstance(n, int) and 1 <= n <= 65535 for n in numbers):
            problems.append(f"inferencePool.targetPorts: {ports!r} must be 1 to 8 entries {{number: 1..65535}}")
        elif len(set(numbers)) != len(numbers) or len(numbers) > 8:
            problems.append(f"inferencePool.targetPorts: {numbers} must be unique, at most 8 (InferencePool CRD)")
    if _get(values, "inferenceObjectives"):
        problems.append(f"inferenceObjectives: the template of {label} reads .Values inside 'range' and fails "
                        f"to render; create InferenceObjectives as separate resources")
    engine = _get(values, "inferencePool.modelServerType", "vllm")
    if isinstance(engine, str) and engine != "vllm":
        problems.append(f"inferencePool.modelServerType: {engine!r} makes {label} pass deprecated metric "
                        f"flags that the EPP {GIE['version']} refuses to start with; only 'vllm' works")
    flags = _get(values, "inferenceExtension.flags") or {}
    known = GIE["eppFlags"]
    for name, value in flags.items():
        where = f"inferenceExtension.flags.{name}"
        if name not in known:
            problems.append(f"{where}: not a flag of the EPP {GIE['version']} (it exits on unknown flags)")
        elif known[name].get("rejectedIfSet"):
            problems.append(f"{where}: deprecated; the EPP {GIE['version']} refuses to start when it is set")
        elif known[name]["type"] == "bool":
            problems.append(f"{where}: a bool flag; the chart renders '--{name}' and '\"{value}\"' as two "
                            f"arguments, so the flag turns true and the value is lost")
        elif name in _CHART_RENDERED_FLAGS:
            problems.append(f"{where}: the chart renders --{name} itself")
    return problems


# --- manifests ------------------------------------------------------------------------------


@functools.cache
def _schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> {scope, openAPIV3Schema, component} for every saved CRD schema."""
    found = {}
    for component in ("gateway-api", "gateway-api-inference-extension", "nginx-gateway-fabric"):
        for kind, entry in supplement(component, "crds")["schemas"].items():
            found[(entry["apiVersion"], kind)] = {**entry, "component": component}
    return found


def crd_schema(api_version: str, kind: str) -> dict[str, Any] | None:
    """JSON schema of a whole manifest of that kind (None if the pinned CRDs do not define it):
    the one `make render` validates with (tools/crd_schemas.py)."""
    return crd_schemas.pinned_crd_schema(api_version, kind)


def _fields(node: Any, prefix: str = "") -> Iterable[str]:
    """Leaf field paths, list indices written as []."""
    if isinstance(node, Mapping) and node:
        for key, value in node.items():
            yield from _fields(value, f"{prefix}.{key}" if prefix else key)
    elif isinstance(node, list) and node:
        for value in node:
            yield from _fields(value, f"{prefix}[]")
    else:
        yield prefix


def _listed(path: str, allowed: Iterable[str]) -> bool:
    return any(path == a or path.startswith(f"{a}.") or path.startswith(f"{a}[") for a in allowed)


# Fields whose behaviour at the pins was read, per kind (None: the CRD schema is the whole list).
FIELDS_USED: dict[str, list[str] | None] = {
    "HTTPRoute": GWAPI["httpRoute"]["fieldsUsed"],
    "Gateway": GWAPI["gateway"]["fieldsUsed"],
    "InferencePool": list(GIE["inferencePool"]["fields"]),
    "InferenceObjective": list(GIE["inferenceObjective"]["fields"]),
}

# CEL rules of the CRDs that manifest_problems evaluates, by their upstream message; the tests
# check that each still exists in the saved schema.
CEL_EVALUATED: dict[str, list[str]] = {
    "InferencePool": ["port number must be unique",
                      "port is required when kind is 'Service' or unspecified (defaults to 'Service')"],
    "HTTPRoute": ["value must be an absolute path and start with '/' when type one of ['Exact', 'PathPrefix']",
                  "must not contain '//' when type one of ['Exact', 'PathPrefix']",
                  "Must have port for Service reference"],
    "Gateway": ["Listener name must be unique within the Gateway",
                "tls must not be specified for protocols ['HTTP', 'TCP', 'UDP']"],
}


def _cel_problems(kind: str, spec: Mapping[str, Any]) -> list[str]:
    problems = []
    if kind == "InferencePool":
        numbers = [p.get("number") for p in spec.get("targetPorts", []) if isinstance(p, Mapping)]
        if len(numbers) != len(set(numbers)):
            problems.append(f"spec.targetPorts: {CEL_EVALUATED[kind][0]} ({numbers})")
        ref = spec.get("endpointPickerRef")
        if isinstance(ref, Mapping) and ref.get("kind", "Service") == "Service" and "port" not in ref:
            problems.append(f"spec.endpointPickerRef: {CEL_EVALUATED[kind][1]}")
    elif kind == "HTTPRoute":
        for i, rule in enumerate(spec.get("rules", [])):
            for j, match in enumerate(rule.get("matches", [])):
                path = match.get("path") or {}
                if path.get("type", "PathPrefix") in ("Exact", "PathPrefix") and "value" in path:
                    where = f"spec.rules[{i}].matches[{j}].path"
                    if not str(path["value"]).startswith("/"):
                        problems.append(f"{where}: {CEL_EVALUATED[kind][0]}")
                    if "//" in str(path["value"]):
                        problems.append(f"{where}: {CEL_EVALUATED[kind][1]}")
            for j, ref in enumerate(rule.get("backendRefs", [])):
                if ref.get("group", "") == "" and ref.get("kind", "Service") == "Service" and "port" not in ref:
                    problems.append(f"spec.rules[{i}].backendRefs[{j}]: {CEL_EVALUATED[kind][2]}")
    elif kind == "Gateway":
        names = [listener.get("name") for listener in spec.get("listeners", [])]
        if len(names) != len(set(names)):
            problems.append(f"spec.listeners: {CEL_EVALUATED[kind][0]} ({names})")
        for i, listener in enumerate(spec.get("listeners", [])):
            if listener.get("protocol") in ("HTTP", "TCP", "UDP") and "tls" in listener:
                problems.append(f"spec.listeners[{i}].tls: {CEL_EVALUATED[kind][1]}")
    return problems


def _ngf_problems(kind: str, spec: Mapping[str, Any]) -> list[str]:
    """What NGINX Gateway Fabric 2.6.7 ignores or rejects although the CRD accepts it."""
    version = NGF["version"]
    route = NGF["httpRoute"]
    problems = []
    if kind == "HTTPRoute":
        for i, rule in enumerate(spec.get("rules", [])):
            for field in route["unsupportedRuleFieldsIgnored"]:
                name = field.split(".")[-1]
                if name in rule:
                    problems.append(f"spec.rules[{i}].{name}: NGF {version} ignores it (warning condition on "
                                    f"the route); set timeouts with a ProxySettingsPolicy")
            for j, match in enumerate(rule.get("matches", [])):
                for k, header in enumerate(match.get("headers", [])):
                    where = f"spec.rules[{i}].matches[{j}].headers[{k}]"
                    if header.get("type", "Exact") not in route["headerMatchTypes"]:
                        problems.append(f"{where}.type: NGF {version} supports {route['headerMatchTypes']}")
                    if not str(header.get("value", "")).strip():
                        problems.append(f"{where}.value: NGF {version} rejects an empty or blank value")
            for j, ref in enumerate(rule.get("backendRefs", [])):
                where = f"spec.rules[{i}].backendRefs[{j}]"
                group, ref_kind = ref.get("group", ""), ref.get("kind", "Service")
                if group not in route["backendRefGroups"] or ref_kind not in route["backendRefKinds"]:
                    problems.append(f"{where}: NGF {version} accepts group/kind {route['backendRefGroups']} / "
                                    f"{route['backendRefKinds']}, got {group!r}/{ref_kind!r}")
                pool = route["inferencePoolBackendRef"]
                if (ref_kind == pool["kind"]) != (group == pool["group"]):
                    problems.append(f"{where}: kind {pool['kind']} goes with group {pool['group']} "
                                    f"(NGF {version}), got {group!r}/{ref_kind!r}")
    elif kind == "InferencePool":
        ref_kind = (spec.get("endpointPickerRef") or {}).get("kind", "Service")
        allowed = NGF["inferenceExtension"]["endpointPickerRefKinds"]
        if ref_kind not in allowed:
            problems.append(f"spec.endpointPickerRef.kind: NGF {version} resolves only {allowed}, got {ref_kind!r}")
    return problems


def manifest_problems(obj: Mapping[str, Any]) -> list[str]:
    """Schema, listed-field, CEL and NGF problems of one manifest, as `Kind/name: field: message`."""
    obj = normalise(obj)
    api_version, kind = obj.get("apiVersion", "?"), obj.get("kind", "?")
    name = (obj.get("metadata") or {}).get("name", "?")
    schema = crd_schema(api_version, kind)
    if schema is None:
        served = sorted(av for av, k in _schemas() if k == kind)
        if served:
            return [f"{kind}/{name}: apiVersion {api_version} is not served by the pinned CRDs; use {served}"]
        return [f"{kind}/{name}: {api_version} {kind} is not a kind of the pinned Gateway API, Inference "
                f"Extension or NGF CRDs"]
    problems = []
    validator = jsonschema.Draft7Validator(schema)
    for error in sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.path]):
        where = ".".join(str(p) for p in error.path) or "(root)"
        problems.append(f"{where}: {error.message}")
    spec = obj.get("spec") if isinstance(obj.get("spec"), Mapping) else {}
    allowed = FIELDS_USED.get(kind)
    if allowed is not None:
        for path in _fields(spec, "spec"):
            if path != "spec" and not _listed(path, allowed):
                problems.append(f"{path}: not among the {kind} fields whose behaviour at the pins was read "
                                f"(facts: {sorted(allowed)})")
    problems += _cel_problems(kind, spec)
    problems += _ngf_problems(kind, spec)
    return [f"{kind}/{name}: {p}" for p in problems]


def check_manifest(obj: Mapping[str, Any]) -> None:
    _raise(manifest_problems(obj), "manifest")

