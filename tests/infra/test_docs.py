"""The README's configuration reference stays in step with components/config/stack.py."""

from __future__ import annotations

from components.config.parse import parse_stack_config
from tools import config_reference, offline


def test_readme_configuration_table_matches_the_config_model():
    readme = (offline.PROJECT_DIR / "README.md").read_text()
    assert config_reference.documented_table(readme) == config_reference.table(), (
        "README.md's configuration table is stale: regenerate it with "
        "`make config-reference`"
    )


def test_reference_lists_every_leaf_key():
    keys = {row[0] for row in config_reference.rows()}
    assert {"model.id", "gpu.tolerations[].effect", "service.sourceRanges", "rollout.drainSeconds"} <= keys


def test_reference_names_scalar_types():
    types = {row[0]: row[1] for row in config_reference.rows()}
    assert types["loadBalancing.boundFactor"] == "number"
    assert types["monitoring.slo.ttftP99Seconds"] == "number"
    assert types["autoscaling.runningAverageSeconds"] == "integer"


def _field_value(cfg, key: str):
    """The parsed value at a reference key such as `ingress.controller.resources.requests.cpu`."""
    value = cfg
    for part in key.split("."):
        fields = type(value).model_fields
        name = next(n for n, f in fields.items() if part in (n, f.alias))
        value = getattr(value, name)
    return value


def test_every_documented_default_is_the_parsed_default():
    """The Default column says what a stack that sets nothing gets, also inside a section
    whose parent gives it other defaults (ingress.controller.resources: 250m, not the model
    replicas' 1)."""
    cfg = parse_stack_config({"model": {"id": "m"}})
    checked = 0
    for key, kind, default, _ in config_reference.rows():
        if kind == "section" or "[]" in key or default == "required" or key.startswith("model."):
            continue
        assert default == config_reference._shown(_field_value(cfg, key)), key
        checked += 1
    assert checked > 80
    rows = {row[0]: row[2] for row in config_reference.rows()}
    assert rows["ingress.controller.resources.requests.cpu"] == "`250m`"
    assert rows["resources.requests.cpu"] == "`1`"
