"""JSON schemas for the custom resources the stack creates.

kubernetes-validate ships only built-in kinds. Two sources:

- Hand-written (`SCHEMAS`): what the CRDs require and the fields this project sets, with unknown
  spec fields rejected so a typo fails. They follow KEDA 2.19's ScaledObject CRD, the Prometheus
  Operator's monitoring.coreos.com/v1 ServiceMonitor and PrometheusRule CRDs (PrometheusRule:
  spec.groups[].name required, rules[].expr required, `for` a Prometheus duration, label and
  annotation values strings) and cert-manager's ClusterIssuer and Certificate.
- The pinned CRDs' own OpenAPI schemas (`pinned_crd_schema`): the Gateway API, the Inference
  Extension and NGINX Gateway Fabric's policies, as read at their tags into
  tests/contracts/data/<component>-<version>.crds.json (the one copy; CEL rules are evaluated by
  the contract tests), with unknown fields rejected wherever the CRD lists the fields.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

from components.pins import PINNED

FACTS_DIR = Path(__file__).resolve().parent.parent / "tests" / "contracts" / "data"
CRD_COMPONENTS = ("gateway-api", "gateway-api-inference-extension", "nginx-gateway-fabric")
"""Pinned components whose CRD schemas were saved beside their facts."""

_INT = {"type": "integer", "minimum": 0}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {"name": {"type": "string", "minLength": 1}, "namespace": {"type": "string"}},
}
_CLUSTER_METADATA = {  # cluster-scoped kinds: no namespace
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "minLength": 1}},
}


def _resource(spec: dict[str, Any], metadata: dict[str, Any] = _METADATA) -> dict[str, Any]:
    """A custom resource: apiVersion, kind, metadata and the kind's `spec` schema."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": metadata, "spec": spec},
    }


SCALED_OBJECT: dict[str, Any] = _resource({
    "type": "object",
    "required": ["scaleTargetRef", "triggers"],
    "additionalProperties": False,
    "properties": {
        "scaleTargetRef": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "name": {"type": "string", "minLength": 1},
                "envSourceContainerName": {"type": "string"},
            },
        },
        "pollingInterval": _INT,
        "cooldownPeriod": _INT,
        "initialCooldownPeriod": _INT,
        "idleReplicaCount": _INT,
        "minReplicaCount": _INT,
        "maxReplicaCount": _INT,
        "fallback": {"type": "object"},
        "advanced": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "restoreToOriginalReplicaCount": {"type": "boolean"},
                "scalingModifiers": {"type": "object"},
                "horizontalPodAutoscalerConfig": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string"},
                        "behavior": {"type": "object"},
                    },
                },
            },
        },
        "triggers": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["type", "metadata"],
                "properties": {
                    "type": {"type": "string", "minLength": 1},
                    "name": {"type": "string"},
                    "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                    "useCachedMetrics": {"type": "boolean"},
                    # KEDA trigger metadata values are strings, numbers included.
                    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                    "authenticationRef": {"type": "object"},
                },
            },
        },
    },
})

_RELABEL_CONFIG: dict[str, Any] = {  # monitoring.coreos.com/v1 RelabelConfig
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer", "minimum": 0},
        "replacement": {"type": "string"},
        "action": {"enum": [
            "replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
            "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
            "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
            "dropequal", "DropEqual"]},
    },
}

SERVICE_MONITOR: dict[str, Any] = _resource({
    "type": "object",
    "required": ["selector"],
    "properties": {
        "selector": {
            "type": "object",
            "properties": {
                "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                "matchExpressions": {"type": "array"},
            },
            "additionalProperties": False,
        },
        "namespaceSelector": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "any": {"type": "boolean"},
                "matchNames": {"type": "array", "items": {"type": "string"}},
            },
        },
        "endpoints": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "port": {"type": "string"},
                    "targetPort": {},
                    "path": {"type": "string", "pattern": "^/"},
                    "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                    "scheme": {"enum": ["http", "https"]},
                    "relabelings": {"type": "array", "items": _RELABEL_CONFIG},
                },
            },
        },
        "jobLabel": {"type": "string"},
    },
})

# cert-manager v1.21.1's ClusterIssuer CRD (cluster-scoped: no namespace), the ACME part
# this stack sets; tests/contracts validates against the upstream schema itself.
CLUSTER_ISSUER: dict[str, Any] = _resource({
    "type": "object",
    "required": ["acme"],
    "additionalProperties": False,
    "properties": {"acme": {
        "type": "object",
        "required": ["server", "privateKeySecretRef"],
        "additionalProperties": False,
        "properties": {
            "server": {"type": "string", "minLength": 1},
            "email": {"type": "string"},
            "privateKeySecretRef": {
                "type": "object", "required": ["name"],
                "properties": {"name": {"type": "string", "minLength": 1}}},
            "solvers": {"type": "array", "items": {"type": "object"}},
        },
    }},
}, metadata=_CLUSTER_METADATA)

# cert-manager v1.21.1's Certificate CRD (deploy/crds/cert-manager.io_certificates.yaml): spec
# requires issuerRef (with name) and secretName; the fields this stack sets.
CERTIFICATE: dict[str, Any] = _resource({
    "type": "object",
    "required": ["issuerRef", "secretName"],
    "additionalProperties": False,
    "properties": {
        "secretName": {"type": "string", "minLength": 1},
        "dnsNames": {"type": "array", "items": {"type": "string"}},
        "issuerRef": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {"name": {"type": "string", "minLength": 1}, "kind": {"type": "string"},
                           "group": {"type": "string"}}},
    },
})

_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

PROMETHEUS_RULE: dict[str, Any] = _resource({
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "groups": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": _DURATION,
                    "query_offset": _DURATION,
                    "limit": {"type": "integer"},
                    "partial_response_strategy": {"type": "string"},
                    "labels": _STRING_MAP,
                    "rules": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["expr"],
                            "additionalProperties": False,
                            # A rule records or alerts, never both.
                            "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
                            "properties": {
                                "record": {"type": "string"},
                                "alert": {"type": "string"},
                                "expr": {"type": "string", "minLength": 1},
                                "for": _DURATION,
                                "keep_firing_for": {"type": "string", "minLength": 1},
                                "labels": _STRING_MAP,
                                "annotations": _STRING_MAP,
                            },
                        },
                    },
                },
            },
        },
    },
})

SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("cert-manager.io/v1", "ClusterIssuer"): CLUSTER_ISSUER,
    ("cert-manager.io/v1", "Certificate"): CERTIFICATE,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
}


@functools.cache
def pinned_crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> {scope, openAPIV3Schema, component} of every saved pinned CRD."""
    found = {}
    for component in CRD_COMPONENTS:
        path = FACTS_DIR / f"{component}-{PINNED[component]}.crds.json"
        for kind, entry in json.loads(path.read_text())["schemas"].items():
            found[(entry["apiVersion"], kind)] = {**entry, "component": component}
    return found


def _strict(schema: Any) -> Any:
    """The schema with unknown fields rejected wherever the CRD lists the fields (the API server
    prunes unknown fields without an error, so a misspelt one would simply vanish)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def pinned_crd_schema(api_version: str, kind: str) -> dict[str, Any] | None:
    """JSON schema of a whole manifest of a pinned CRD's kind (None if none defines it)."""
    entry = pinned_crds().get((api_version, kind))
    if entry is None:
        return None
    schema = _strict(copy.deepcopy(entry["openAPIV3Schema"]))
    metadata = {"type": "object", "required": ["name"],
                "properties": {"name": {"type": "string", "minLength": 1},
                               "namespace": {"type": "string"}}}
    if entry["scope"] == "Namespaced":
        metadata["required"] = ["name", "namespace"]
    schema["properties"]["metadata"] = metadata
    schema["properties"]["apiVersion"] = {"const": api_version}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({"apiVersion", "kind", "metadata", "spec",
                                 *schema.get("required", [])})
    return schema


def schema_for(api_version: str, kind: str) -> dict[str, Any] | None:
    """The custom-resource schema a manifest is validated against, if any."""
    return SCHEMAS.get((api_version, kind)) or pinned_crd_schema(api_version, kind)
