"""Run the Pulumi program offline under mocks, and check what it would create.

Shared by `tools.render` (a preview without a cluster) and the test suite, so
both see the same fake cloud: one mocks class that records every resource and
returns the computed outputs a real cluster would.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hashlib
import json
import logging
import runpy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml

from tools import crd_schemas

PROJECT = "llm-serving"
PROJECT_DIR = Path(__file__).resolve().parent.parent
PROGRAM = PROJECT_DIR / "__main__.py"

FAKE_LB_IP = "203.0.113.10"
"""A documentation address (TEST-NET-3) standing in for the cloud's load balancer."""

OLDEST_KUBERNETES = "1.31.0"
"""The oldest Kubernetes the stacks support: a field it does not know would be refused there."""
SCHEMA_VERSIONS = (OLDEST_KUBERNETES, "latest")
"""Kubernetes versions every manifest must satisfy: the oldest supported, and the newest whose
schema kubernetes-validate ships ("latest"; `schema_version` names it)."""


def schema_version(version: str) -> str:
    """A SCHEMA_VERSIONS entry as a version number ("latest" -> e.g. "1.37.0")."""
    if version != "latest":
        return version
    from kubernetes_validate import utils

    return str(utils.latest_version())


def schema_versions_described() -> str:
    """Which schemas the manifests were checked against, and why those two."""
    newest = schema_version("latest")
    from importlib.metadata import version

    return (
        f"the Kubernetes {OLDEST_KUBERNETES} and {newest} API schemas ({OLDEST_KUBERNETES}: the "
        f"oldest Kubernetes the stacks support; {newest}: the newest kubernetes-validate "
        f"{version('kubernetes-validate')} ships)"
    )


@dataclass
class Recorded:
    type: str
    name: str
    inputs: dict[str, Any]
    """Inputs as the engine receives them: camelCase keys, numbers as floats."""
    outputs: dict[str, Any]
    read: bool = False
    """A lookup of an existing object (`.get`), not one the program creates."""
    secret_paths: frozenset[str] = frozenset()
    """Dotted paths of the inputs that arrived as Pulumi secrets (e.g. `secrets.hf_token`)."""


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


_SIG = "4dabf18193072939515e22adb298388d"
_SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"


def _unwrap(value: Any, path: str = "", secrets: set[str] | None = None) -> Any:
    """Secret inputs reach mocks wrapped in Pulumi's wire envelope; take the value out,
    noting each secret's dotted path in `secrets`."""
    if isinstance(value, dict):
        if value.get(_SIG) == _SECRET_SIG:
            if secrets is not None:
                secrets.add(path)
            return _unwrap(value.get("value"), path, secrets)
        return {
            k: _unwrap(v, f"{path}.{k}" if path else k, secrets) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_unwrap(v, f"{path}[{i}]", secrets) for i, v in enumerate(value)]
    return value


MOCKED_ADDRESS = "load-balancer address"
MOCKED_DIGEST = "image digest"
MOCKED_CONTEXT = "build context hash"
MOCKED_RANDOM = "random value"
MOCKED_NAME = "name suffix (Pulumi auto-naming)"


class RecordingMocks(pulumi.runtime.Mocks):
    """Records registered resources and fakes the outputs a real cloud computes."""

    def __init__(self) -> None:
        self.resources: list[Recorded] = []
        self.mocked: dict[str, str] = {}
        """Every value these mocks made up -> what a real `pulumi up` computes in its place."""
        self.messages: list[tuple[str, str]] = []
        """(severity, text) the program logged (pulumi.log.warn, .error), in order."""

    def _fake(self, value: str, what: str) -> str:
        self.mocked[value] = what
        return value

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        secret_paths: set[str] = set()
        inputs = _unwrap(dict(args.inputs), secrets=secret_paths)
        outputs = copy.deepcopy(inputs)
        if args.typ.startswith("kubernetes:") and not args.typ.startswith("kubernetes:helm"):
            metadata = outputs.setdefault("metadata", {})
            # Pulumi auto-names Kubernetes objects as <name>-<random suffix>.
            if "name" not in metadata:
                metadata["name"] = self._fake(f"{args.name}-{_digest(args.name)[:8]}",
                                              MOCKED_NAME)
            if args.typ != "kubernetes:core/v1:Namespace":
                metadata.setdefault("namespace", "default")
            is_service = args.typ == "kubernetes:core/v1:Service"
            # A read (Service.get) of a chart's Service is a LoadBalancer we did not declare.
            if is_service and (
                outputs.get("spec", {}).get("type") == "LoadBalancer" or args.resource_id
            ):
                outputs["status"] = {"loadBalancer": {"ingress": [
                    {"ip": self._fake(FAKE_LB_IP, MOCKED_ADDRESS)}]}}
        elif args.typ == "kubernetes:helm.sh/v3:Release":
            outputs["status"] = {
                "name": inputs.get("name", args.name),
                "namespace": inputs.get("namespace", "default"),
                "status": "deployed",
                "version": inputs.get("version"),
            }
        elif args.typ == "docker:index/image:Image":
            image_name = inputs["imageName"]
            content = self._fake("sha256:" + _digest(inputs), MOCKED_DIGEST)
            repository = image_name.rsplit(":", 1)[0] if "/" not in image_name.rsplit(":", 1)[-1] else image_name
            outputs["repoDigest"] = (
                content if inputs.get("skipPush") else f"{repository}@{content}"
            )
        elif args.typ == "docker-build:index:Image":
            # Digest and context hash over the non-secret inputs only.
            public = {k: v for k, v in inputs.items() if k != "secrets"}
            content = self._fake("sha256:" + _digest(public), MOCKED_DIGEST)
            outputs["contextHash"] = self._fake(_digest("context", public), MOCKED_CONTEXT)
            if inputs.get("push"):
                outputs["digest"] = content
                outputs["ref"] = f"{inputs['tags'][0]}@{content}"
            else:
                outputs["digest"] = ""
                outputs["ref"] = inputs["tags"][0]
        elif args.typ == "random:index/randomPassword:RandomPassword":
            length = int(inputs.get("length", 16))
            outputs["result"] = self._fake((_digest(args.name) * 4)[:length], MOCKED_RANDOM)
        self.resources.append(
            Recorded(
                args.typ, args.name, inputs, outputs, read=bool(args.resource_id),
                secret_paths=frozenset(secret_paths),
            )
        )
        return f"{args.name}-id", outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict, list | None]:
        return {}, None

    def of_type(self, typ: str) -> list[Recorded]:
        return [r for r in self.resources if r.type == typ]

    def mocked_in(self, text: str) -> list[str]:
        """What each made-up value inside `text` stands for (e.g. ["image digest"])."""
        return sorted({what for value, what in self.mocked.items() if value and value in text})

    def mocked_paths(self, value: Any, path: str = "") -> list[tuple[str, str]]:
        """(dotted path, what it stands for) of every string in `value` that holds a made-up
        value, e.g. ("spec.template.spec.containers[0].image", "image digest")."""
        if isinstance(value, dict):
            return [found for k, v in value.items()
                    for found in self.mocked_paths(v, f"{path}.{k}" if path else str(k))]
        if isinstance(value, list):
            return [found for i, v in enumerate(value)
                    for found in self.mocked_paths(v, f"{path}[{i}]")]
        if isinstance(value, str):
            return [(path, what) for what in self.mocked_in(value)]
        return []


class _ProgramLog(logging.Handler):
    """Collects what the program logs under mocks into the current mocks' `messages`; without
    it the records reach Python's last-resort handler, which prints the bare text to stderr."""

    target: list[tuple[str, str]] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.target is not None:
            self.target.append((record.levelname.lower(), record.getMessage()))


_PROGRAM_LOG = _ProgramLog(level=logging.WARNING)
_PROGRAM_LOGGER = logging.getLogger("llm-serving.offline.program")
_PROGRAM_LOGGER.addHandler(_PROGRAM_LOG)
_PROGRAM_LOGGER.setLevel(logging.WARNING)
_PROGRAM_LOGGER.propagate = False


def _ensure_event_loop() -> None:
    """Pulumi's runtime uses the thread's current event loop; code that ran
    asyncio.run() before (other tests) leaves none, or a closed one."""
    try:
        loop = asyncio.get_event_loop_policy().get_event_loop()
        if loop.is_closed():
            raise RuntimeError("closed")
    except RuntimeError:
        asyncio.set_event_loop(asyncio.new_event_loop())


def install_mocks(stack: str = "test") -> RecordingMocks:
    """Fresh mocks and a fresh root stack; mocks are process-global."""
    _ensure_event_loop()
    pulumi.runtime.settings.ROOT.set(None)
    mocks = RecordingMocks()
    _PROGRAM_LOG.target = mocks.messages
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack=stack, preview=False,
                             logger=_PROGRAM_LOGGER)
    return mocks


# --- stack files ------------------------------------------------------------------

TEST_SECRET_VALUES = {"apiKey": "test-api-key-0123456789abcdef0123456789", "hfToken": "hf_test_token"}


def read_stack_file(path: Path) -> tuple[dict[str, str], list[str]]:
    """Config and secret keys as the Pulumi engine hands them to the program.

    Structured values become JSON text, as `pulumi up` passes them; `secure:`
    values (ciphertext we cannot decrypt here) become plain test values.
    """
    document = yaml.safe_load(path.read_text()) or {}
    config: dict[str, str] = {}
    secret_keys: list[str] = []
    for key, value in (document.get("config") or {}).items():
        if isinstance(value, dict) and set(value) == {"secure"}:
            short = key.split(":", 1)[-1]
            value = TEST_SECRET_VALUES.get(short, f"test-secret-{short}")
            secret_keys.append(key)
        config[key] = value if isinstance(value, str) else json.dumps(value)
    return config, secret_keys


def namespace_values(config: dict[str, str]) -> dict[str, str]:
    """The `llm-serving:*` values of a stack's config, keys without the namespace."""
    prefix = f"{PROJECT}:"
    return {k.removeprefix(prefix): v for k, v in config.items() if k.startswith(prefix)}


@dataclass
class ProgramRun:
    mocks: RecordingMocks
    exports: dict[str, Any] = field(default_factory=dict)
    secret_exports: set[str] = field(default_factory=set)

    @property
    def resources(self) -> list[Recorded]:
        return self.mocks.resources

    @property
    def warnings(self) -> list[str]:
        """What the program warned about (pulumi.log.warn), in order."""
        return [text for severity, text in self.mocks.messages if severity == "warning"]


def capture(outputs: dict[str, Any], values: dict[str, Any], secrets: set[str]) -> pulumi.Output:
    """An Output that, once awaited, has filled `values` and `secrets` from `outputs`."""

    async def collect() -> None:
        for name, value in outputs.items():
            output = pulumi.Output.from_input(value)
            values[name] = await output.future()
            if await output.is_secret():
                secrets.add(name)

    return pulumi.Output.from_input(asyncio.ensure_future(collect()))


def run_program(
    config: dict[str, str],
    secret_keys: list[str] = (),  # type: ignore[assignment]
    stack: str = "test",
) -> ProgramRun:
    """Run __main__.py under mocks with this configuration; returns what it registered."""
    mocks = install_mocks(stack)
    pulumi.runtime.set_all_config(dict(config), list(secret_keys))
    run = ProgramRun(mocks)

    def program() -> Any:
        runpy.run_path(str(PROGRAM), run_name="__main__")
        root = pulumi.runtime.settings.get_root_resource()
        return capture(dict(root.outputs), run.exports, run.secret_exports)

    try:
        pulumi.runtime.test(program)()
    finally:
        pulumi.runtime.set_all_config({}, [])
    return run


# --- manifests --------------------------------------------------------------------


def _normalise(value: Any) -> Any:
    """Mock inputs carry numbers as floats; Kubernetes wants integers."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value


def is_kubernetes_object(resource: Recorded) -> bool:
    """An object the program would apply (not a chart release, not a lookup)."""
    return not resource.read and resource.type.startswith("kubernetes:") and not resource.type.startswith(
        ("kubernetes:helm.sh", "kubernetes:yaml", "kubernetes:kustomize")
    )


def is_helm_release(resource: Recorded) -> bool:
    return resource.type == "kubernetes:helm.sh/v3:Release"


def to_helm_release(resource: Recorded) -> dict[str, Any]:
    """What a Helm release would install: chart, version, where, and the full values."""
    inputs = _normalise(resource.inputs)
    release = {
        "name": inputs.get("name", resource.name),
        "namespace": resource.outputs.get("status", {}).get("namespace", inputs.get("namespace")),
        "chart": inputs["chart"],
        "version": inputs.get("version"),
    }
    repository = inputs.get("repositoryOpts", {}).get("repo")
    if repository:
        release["repository"] = repository
    release["values"] = inputs.get("values", {})
    return release


def to_manifest(resource: Recorded) -> dict[str, Any]:
    """The Kubernetes object a resource would apply, as a plain manifest."""
    manifest = _normalise(copy.deepcopy(resource.inputs))
    manifest.pop("status", None)
    metadata = manifest.setdefault("metadata", {})
    metadata["name"] = resource.outputs["metadata"]["name"]
    if "namespace" in resource.outputs.get("metadata", {}) and "namespace" not in metadata:
        metadata["namespace"] = resource.outputs["metadata"]["namespace"]
    # Secret values are placeholders in the manifest; the real ones stay in Pulumi state.
    if manifest.get("kind") == "Secret":
        for section in ("stringData", "data"):
            if section in manifest:
                manifest[section] = {k: "<secret>" for k in manifest[section]}
    return kubectl_order(manifest)


def _kubectl_less(a: str, b: str) -> bool:
    """Whether key `a` comes before `b` in `kubectl get -o yaml`.

    kubectl prints objects with sigs.k8s.io/yaml (k8s.io/cli-runtime printers.YAMLPrinter):
    JSON first, then go-yaml v2 marshals the decoded maps, sorting keys at every level
    (kubernetes-sigs/yaml@v1.4.0 goyaml.v2/sorter.go, keyList.Less). Its order, in our own
    words: the first differing character decides; two letters compare by code point; a
    non-letter comes before a letter; runs of digits compare as numbers; then the shorter key.
    """
    for i, (x, y) in enumerate(zip(a, b)):
        if x == y:
            continue
        if x.isalpha() and y.isalpha():
            return x < y
        if x.isalpha() or y.isalpha():
            return y.isalpha()
        if x.isdigit() and y.isdigit():
            start = i  # the number began with the digits both keys share
            while start > 0 and a[start - 1].isdigit():
                start -= 1
            run_a = len(a[i:]) - len(a[i:].lstrip("0123456789"))
            run_b = len(b[i:]) - len(b[i:].lstrip("0123456789"))
            number_a, number_b = int(a[start:i + run_a]), int(b[start:i + run_b])
            if number_a != number_b:
                return number_a < number_b
            if run_a != run_b:
                return run_a < run_b
        return x < y
    return len(a) < len(b)


_KUBECTL_KEY = functools.cmp_to_key(
    lambda a, b: -1 if _kubectl_less(a, b) else (1 if _kubectl_less(b, a) else 0))


def kubectl_order(value: Any) -> Any:
    """`value` with every mapping's keys in the order `kubectl get -o yaml` prints them:
    apiVersion, kind, metadata, spec; within a container image before name; in an env entry
    name before value (a Secret's stringData and type come after metadata)."""
    if isinstance(value, dict):
        return {k: kubectl_order(value[k]) for k in sorted(value, key=_KUBECTL_KEY)}
    if isinstance(value, list):
        return [kubectl_order(v) for v in value]
    return value


@functools.lru_cache(maxsize=None)
def _validator(kind: str, api_version: str, version: str):
    """A cached strict-schema validator; building one parses megabytes of JSON."""
    import jsonschema
    import referencing
    from kubernetes_validate import utils

    if version == "latest":
        version = utils.latest_version()
    group_version = api_version.split("/")
    short = (
        f"{group_version[0].split('.')[0]}-{group_version[1]}"
        if len(group_version) == 2
        else api_version
    )
    schema_dir = f"v{version}-local-strict"
    try:
        schema = utils.schema_contents(
            f"kubernetes-json-schema/{schema_dir}/{kind.lower()}-{short}.json", version
        )
    except FileNotFoundError:
        return None
    definitions = utils.schema_contents(
        f"kubernetes-json-schema/{schema_dir}/_definitions.json", version
    )
    registry = referencing.Resource.from_contents(definitions) @ (
        referencing.Resource.from_contents(schema) @ referencing.Registry()
    )
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def schema_problems(manifest: dict[str, Any], versions: tuple[str, ...] = SCHEMA_VERSIONS) -> list[str]:
    """Every schema violation, as `Kind/name: field.path: message [k8s version]`."""
    problems = []
    kind, api_version = manifest.get("kind", "?"), manifest.get("apiVersion", "?")
    name = manifest.get("metadata", {}).get("name", "?")
    custom = crd_schemas.schema_for(api_version, kind)
    if custom is not None:
        import jsonschema

        validator = jsonschema.validators.Draft202012Validator(custom)
        for error in sorted(validator.iter_errors(manifest), key=lambda e: list(e.path)):
            where = ".".join(str(p) for p in error.path) or "(root)"
            problems.append(f"{kind}/{name}: {where}: {error.message} [{api_version} CRD]")
        return problems
    for version in versions:
        validator = _validator(kind, api_version, version)
        label = schema_version(version)
        if validator is None:
            problems.append(f"{kind}/{name}: no schema for {api_version} in Kubernetes {label}")
            continue
        for error in sorted(validator.iter_errors(manifest), key=lambda e: list(e.path)):
            where = ".".join(str(p) for p in error.path) or "(root)"
            problems.append(f"{kind}/{name}: {where}: {error.message} [Kubernetes {label}]")
    return problems
