"""The layers of components/ hold: config and policies stay pure, and the code that must run
without the Pulumi SDK (local mode, the server, the benchmarks) never imports it, nor torch or
transformers unless it serves a real model."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("pulumi", "pulumi_kubernetes", "pulumi_docker", "pulumi_docker_build", "pulumi_random",
         "grafana_foundation_sdk", "torch", "transformers")
PURE = [p for p in (ROOT / "components").rglob("*.py")
        if "resources" not in p.parts and p.name != "pulumi_source.py"]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_and_policies_import_neither_pulumi_nor_the_resources(path: Path) -> None:
    bad = {n for n in _imports(path)
           if n.split(".")[0].startswith("pulumi") or n.startswith("components.resources")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_resource_layer_exists_and_uses_pulumi() -> None:
    # The check above must not pass because the layout changed under it.
    resources = list((ROOT / "components" / "resources").glob("*.py"))
    assert any("pulumi" in _imports(p) for p in resources)
    assert len(PURE) >= 15


def test_local_mode_the_server_and_the_benchmarks_import_no_heavy_package() -> None:
    """What `python -m local up` (sim engine), `uvicorn server:app` and `python -m bench` load:
    `make local` installs none of HEAVY."""
    code = (
        "import sys, json\n"
        "import local.__main__, local.autoscaler, local.top, server, server.factory\n"
        "import server.engines.sim, bench.__main__, bench.balance, bench.autoscale, bench.faults\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    loaded = {m.split(".")[0] for m in json.loads(out)}
    assert "local" in loaded and "components" in loaded  # it did import the stack's policies
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
