"""Property tests of the stack configuration parser: a clear error or a valid config, never a
traceback.

``parse_stack_config`` must either return a ``StackConfig`` or raise ``ConfigError`` whose every
problem names a key (``llm-serving:<path>: ...``). The strategies start from valid configs (the
repository's stacks and a few variants) and mutate one field at any depth — wrong types, random
strings and numbers, nested JSON, JSON text as Pulumi hands structured values over — so most
examples get through pydantic and reach the cross-section checks (``components.config.rules.cross_check``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.config.parse import ConfigError, parse_stack_config
from components.config.stack import StackConfig
from components.config.types import NAMESPACE

REPO = Path(__file__).resolve().parents[2]
HYPOTHESIS = {"derandomize": True, "deadline": None, "database": None, "print_blob": True,
                  "suppress_health_check": list(HealthCheck)}


def _stack(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / name).read_text())["config"]
    prefix = f"{NAMESPACE}:"
    return {k.removeprefix(prefix): v for k, v in doc.items() if k.startswith(prefix)}


MINIMAL = {"model": {"id": "org/model"}}
BASES = [
    MINIMAL,
    {**MINIMAL, "ingress": {"enabled": True}},  # the ingress defaults: /v1 only, no TLS
    _stack("Pulumi.dev.yaml"),
    _stack("Pulumi.prod.yaml"),
    _stack("Pulumi.prod-gateway.yaml"),  # a models list, per-model overrides, the gateway
    {  # two models on the Ingress path: the model-list rules and ingress.modelPaths
        "models": [{"id": "org/a", "servedName": "a"},
                   {"id": "org/b", "servedName": "b", "replicas": 2}],
        "ingress": {"enabled": True, "modelPaths": {"b": "/b/v1"}},
    },
    {  # CPU autoscaling, ingress with TLS, tolerations, monitoring: the cross-check paths
        "model": {"id": "m", "maxContextLength": 2048, "maxOutputTokens": 256,
                  "loadTimeoutSeconds": 60},
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"},
                      "limits": {"cpu": "2", "memory": "2Gi"}},
        "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3,
                        "scaleDownStabilizationSeconds": 60},
        "ingress": {"enabled": True, "host": "llm.example.com", "tlsSecret": "llm-tls"},
        "service": {"type": "LoadBalancer", "sourceRanges": ["10.0.0.0/8"]},
        "networkPolicy": {"enabled": True, "monitoringNamespace": "monitoring"},
        "monitoring": {"serviceMonitor": True, "labels": {"release": "kps"}},
        "labels": {"team": "ml"},
    },
]
for base in BASES:  # the strategies rely on these being valid
    parse_stack_config(base)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path (dict keys and list indices) inside a config value."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


# Key names the parser knows, at any level: a mutation that adds one of them lands on a real field.
KNOWN_KEYS = sorted({p[-1] for b in BASES for p in _paths(b) if isinstance(p[-1], str)}
                    | {f.alias or n for n, f in StackConfig.model_fields.items()}
                    | {"apiKey", "hfToken", "count", "operator", "effect", "value", "key",
                       "tolerationSeconds", "type", "build", "push", "reference", "method"})

text = st.text(max_size=20)
scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2, 5000)
           | st.floats(allow_nan=True, allow_infinity=True) | text
           | st.sampled_from(["", " ", "0", "1", "-1", "true", "null", "500m", "2Gi", "1.5Gi",
                              "9" * 400 + "Gi", "0.0001m", "vllm", "server", "Exists", "Equal",
                              "NoExecute", "baked", "pvc", "ClusterIP", "NodePort", "{", "[",
                              "{}", "[]", "[1,", '{"a": 1}', "NaN", "Infinity", "1e309",
                              "10.0.0.0/33", "::/0", "a" * 64, "UPPER", "x/y"]))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(KNOWN_KEYS) | text, inner, max_size=5),
    max_leaves=15,
)


def _as_pulumi(value: Any, as_json_text: bool) -> Any:
    """Pulumi passes structured values (and sometimes scalars) as JSON text."""
    if as_json_text:
        return json.dumps(value)
    return value


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid config with one field set, replaced, added or removed (at any depth)."""
    cfg = copy.deepcopy(draw(st.sampled_from(BASES)))
    paths = _paths(cfg)
    action = draw(st.sampled_from(["replace", "replace", "replace", "add", "delete", "top"]))
    if action == "top" or not paths:
        cfg[draw(st.sampled_from(KNOWN_KEYS) | text)] = draw(json_values)
    else:
        path = draw(st.sampled_from(paths))
        parent = cfg
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        if action == "replace":
            parent[last] = draw(json_values)
        elif action == "delete":
            parent.pop(last)  # a dict key or a list index
        else:
            target = parent[last]
            if isinstance(target, dict):
                target[draw(st.sampled_from(KNOWN_KEYS) | text)] = draw(json_values)
            elif isinstance(target, list):
                target.append(draw(json_values))
            else:
                parent[last] = draw(json_values)
    # Some top-level values arrive as JSON text, as the Pulumi engine sends them.
    encode = draw(st.sets(st.sampled_from(sorted(cfg)), max_size=len(cfg))) if cfg else set()
    return {k: _as_pulumi(v, k in encode) for k, v in cfg.items()}


arbitrary_configs = st.dictionaries(
    st.sampled_from(KNOWN_KEYS) | text,
    json_values | json_values.map(json.dumps),
    max_size=6,
)


def _parse_or_clear_error(raw: dict[str, Any]) -> StackConfig | None:
    try:
        cfg = parse_stack_config(raw)
    except ConfigError as err:
        assert err.problems, raw
        for problem in err.problems:
            assert isinstance(problem, str) and problem.startswith(f"{NAMESPACE}:"), problem
        return None
    assert isinstance(cfg, StackConfig)
    return cfg


def _assert_round_trip(cfg: StackConfig) -> None:
    dumped = cfg.model_dump(by_alias=True, mode="json")
    assert parse_stack_config(dumped) == cfg
    # Also the way Pulumi hands values over: structured values as JSON text, scalars as text.
    as_pulumi = {k: json.dumps(v) if isinstance(v, (dict, list))
                 else json.dumps(v) if isinstance(v, bool) else str(v)
                 for k, v in dumped.items() if v is not None}
    assert parse_stack_config(as_pulumi) == cfg


STATS: dict[str, int] = {"valid": 0, "invalid": 0}


@settings(max_examples=400, **HYPOTHESIS)
@given(raw=mutated_configs())
def test_mutated_config_is_valid_or_a_clear_error(raw: dict[str, Any]) -> None:
    cfg = _parse_or_clear_error(raw)
    STATS["valid" if cfg is not None else "invalid"] += 1
    if cfg is not None:
        _assert_round_trip(cfg)


def test_mutations_reach_both_outcomes() -> None:
    """The mutation strategy must not degenerate into all-valid or all-invalid inputs."""
    if not sum(STATS.values()):
        pytest.skip("runs after test_mutated_config_is_valid_or_a_clear_error")
    assert STATS["valid"] >= 20 and STATS["invalid"] >= 20, STATS


@settings(max_examples=250, **HYPOTHESIS)
@given(raw=arbitrary_configs)
def test_arbitrary_config_is_valid_or_a_clear_error(raw: dict[str, Any]) -> None:
    cfg = _parse_or_clear_error(raw)
    if cfg is not None:
        _assert_round_trip(cfg)


@settings(max_examples=100, **HYPOTHESIS)
@given(raw=st.dictionaries(text, json_values.map(json.dumps) | text, max_size=4)
       .map(lambda d: {**BASES[0], **d}))
def test_json_text_values(raw: dict[str, Any]) -> None:
    _parse_or_clear_error(raw)


@pytest.mark.parametrize("base", range(len(BASES)))
def test_valid_configs_round_trip(base: int) -> None:
    _assert_round_trip(parse_stack_config(BASES[base]))


@pytest.mark.parametrize("value", [
    "[" * 100_000,  # json.loads: RecursionError
    json.dumps(json.loads("[" * 500 + "]" * 500)),
    "{" + '"a":{' * 2000 + "}" * 2001,
])
@pytest.mark.parametrize("key", ["labels", "model", "gpu", "unknownKey"])
def test_deeply_nested_json_text(key: str, value: str) -> None:
    _parse_or_clear_error({**MINIMAL, key: value})
