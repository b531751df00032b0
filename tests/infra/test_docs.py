"""The README's configuration reference stays in step with components/config.py."""

from __future__ import annotations

from tools import config_reference, offline


def test_readme_configuration_table_matches_the_config_model():
    readme = (offline.PROJECT_DIR / "README.md").read_text()
    expected = config_reference.table()
    assert expected in readme, (
        "README.md's configuration table is stale: regenerate it with "
        "`python -m tools.config_reference`"
    )


def test_reference_lists_every_leaf_key():
    keys = {row[0] for row in config_reference.rows()}
    assert {"model.id", "gpu.tolerations[].effect", "service.sourceRanges", "rollout.drainSeconds"} <= keys
