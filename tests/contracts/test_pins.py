"""A pin and its facts move together; every fact says where it was read."""

from __future__ import annotations

import json
import re

import pytest

from components.pins import NIC_CHART, NIC_CHART_VERSION, NIC_CONTROLLER_VERSION, PINNED
from tests.contracts import facts

FILES = facts.all_files()


@pytest.mark.parametrize("component", sorted(PINNED))
def test_every_pinned_version_has_a_facts_file(component):
    data = facts.pinned(component)
    assert data["component"] == component
    assert data["version"] == PINNED[component]


def test_a_pin_without_facts_is_reported_with_what_to_do():
    with pytest.raises(FileNotFoundError, match="read that version's source at its tag"):
        facts.load("nginx-ingress-controller", "9.9.9")


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_facts_files_name_their_version_and_cite_it(path):
    data = json.loads(path.read_text())
    # <component>-<version>.json, or <component>-<version>.<topic>.json for a topic of its own.
    assert re.fullmatch(rf"{re.escape(data['component'])}-{re.escape(data['version'])}(\.\w+)?\.json",
                        path.name)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", data["read"])
    assert data["sources"], "a facts file needs sources"
    # Whatever is read from the component's own repositories is read at this version's tag.
    tag = data.get("tag", f"v{data['version']}")
    own = data.get("repositories", [])
    assert own, "name the component's own repositories"
    cited = 0
    for fact, source in data["sources"].items():
        for repo in own:
            for ref in re.findall(rf"{re.escape(repo)}@([^:\s]+)", source):
                assert ref == tag, f"{fact}: {source} is read at {ref}, not {tag}"
                cited += 1
    assert cited, f"no source cites {own} at {tag}"


def test_controller_pin_matches_the_chart_it_comes_with():
    data = facts.pinned("nginx-ingress-controller")
    assert data["chartVersion"] == NIC_CHART_VERSION
    assert data["chartReference"] == NIC_CHART
    assert data["version"] == NIC_CONTROLLER_VERSION
