"""`make local` installs requirements-local.txt alone: it must bring every third-party package
that local mode (sim engine) imports (listed, or a dependency of one listed), at the same pins
as the full environment, and nothing heavy. The import side of the same promise (no Pulumi,
torch or transformers) is tests/infra/test_layers.py's."""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "transformers", "tokenizers", "safetensors", "huggingface-hub", "numpy",
         "matplotlib"}
OWN = {"local", "server", "components", "bench", "tools", "tests"}


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement line (`uvicorn[standard]==1` ->
    `uvicorn`)."""
    return re.split(r"[\[=<>!~;\s]", requirement.strip(), maxsplit=1)[0].lower().replace(
        "_", "-")


def _requirements(path: Path) -> dict[str, str]:
    """name -> the line, for every requirement in `path` and the files it includes (-r)."""
    out: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            out |= _requirements(path.parent / line[3:].strip())
        else:
            out[_name(line)] = line
    return out


def _extras(requirement: str) -> set[str]:
    match = re.search(r"\[([^\]]*)\]", requirement.split(";", 1)[0])
    return {e.strip() for e in match.group(1).split(",")} if match else set()


def _closure(lines: dict[str, str]) -> set[str]:
    """The listed distributions and what they pull in, as installed here: their dependencies
    and those of the extras asked for (`uvicorn[standard]`), recursively."""
    seen: set[str] = set()
    todo = [(name, _extras(line)) for name, line in lines.items()]
    while todo:
        name, extras = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for req in requires:
            extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
            if extra is None or extra.group(1) in extras:
                todo.append((_name(req), _extras(req)))
    return seen


def _local_mode_modules() -> list[str]:
    """The repository's modules that `python -m local` and a sim replica load."""
    code = ("import sys, json\n"
            "import local.__main__, local.top, local.autoscaler, server.factory\n"
            "import server.engines.sim\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return [m for m in json.loads(out) if m.split(".")[0] in OWN]


def _third_party_imports(module: str) -> set[str]:
    """Top-level names of non-repository, non-stdlib modules `module`'s file imports, lazy
    imports inside functions included."""
    spec = __import__("importlib.util").util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return set()
    names = set()
    for node in ast.walk(ast.parse(Path(spec.origin).read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in OWN and n not in sys.stdlib_module_names
            and n != "__future__"}


def test_requirements_local_holds_every_package_local_mode_imports() -> None:
    listed = _requirements(ROOT / "requirements-local.txt")
    installed = _closure(listed)
    by_module = md.packages_distributions()
    missing = {}
    for module in _local_mode_modules():
        for name in _third_party_imports(module):
            dists = {d.lower().replace("_", "-") for d in by_module.get(name, [name])}
            if not dists & installed:
                missing[f"{module} imports {name}"] = sorted(dists)
    assert not missing, missing
    assert {"fastapi", "uvicorn", "httpx"} <= set(listed)  # the scan did find the server


def test_requirements_local_pins_match_the_full_environment_and_hold_nothing_heavy() -> None:
    listed = _requirements(ROOT / "requirements-local.txt")
    full = _requirements(ROOT / "requirements-dev.txt")
    assert not set(listed) & HEAVY
    assert not [n for n in listed if n.startswith("pulumi")]
    drift = {n: (line, full.get(n)) for n, line in listed.items() if full.get(n) != line}
    assert not drift, drift
