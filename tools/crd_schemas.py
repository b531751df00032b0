"""Hand-written JSON schemas for the custom resources the stack creates.

kubernetes-validate ships only built-in kinds. These cover what the CRDs
require and the fields this project sets, with unknown spec fields rejected so
a typo fails. They follow KEDA 2.19's ScaledObject CRD, the Prometheus
Operator's monitoring.coreos.com/v1 ServiceMonitor and PrometheusRule CRDs
(PrometheusRule: spec.groups[].name required, rules[].expr required, `for`
a Prometheus duration, label and annotation values strings) and cert-manager's
ClusterIssuer and Certificate.
"""

from __future__ import annotations

from typing import Any

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
