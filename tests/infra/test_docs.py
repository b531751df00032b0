"""The README's configuration reference stays in step with components/config/stack.py."""

from __future__ import annotations

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
