"""The README stays in step with the code: the configuration reference (generated from
components/config/), and the default values its prose quotes (local mode, autoscaling, pins)."""

from __future__ import annotations

import re

from components import pins
from components.config.parse import parse_stack_config
from components.policies.nginx_conf import CLIENT_BODY_TIMEOUT_SECONDS
from components.policies.pod_security import POD_SECURITY_VERSION
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


class _UnsetSection(Exception):
    """The key lies inside an optional section the stack leaves unset (None)."""


def _field_value(cfg, key: str):
    """The parsed value at a reference key such as `ingress.controller.resources.requests.cpu`."""
    value = cfg
    for part in key.split("."):
        if value is None:
            raise _UnsetSection(key)
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
        try:
            value = _field_value(cfg, key)
        except _UnsetSection:
            # e.g. loadBalancing.rateLimit.burst: an optional section's keys show the defaults
            # it gets when given; a stack that sets nothing has no such section.
            continue
        assert default == config_reference._shown(value), key
        checked += 1
    assert checked > 80
    rows = {row[0]: row[2] for row in config_reference.rows()}
    assert rows["ingress.controller.resources.requests.cpu"] == "`250m`"
    assert rows["resources.requests.cpu"] == "`1`"


# --- defaults quoted in prose -----------------------------------------------------------------

README = offline.PROJECT_DIR / "README.md"


def _quoted(pattern: str, text: str) -> tuple[str, ...]:
    """The groups of the one place `pattern` matches; a reworded sentence fails here, so the
    check is updated with it rather than silently skipped."""
    found = re.findall(pattern, text)
    assert len(found) == 1, f"expected one match of {pattern!r}, found {found}"
    return found[0] if isinstance(found[0], tuple) else (found[0],)


def test_readme_quotes_local_modes_defaults():
    from components.policies.balancing import LoadBalancingConfig
    from local.__main__ import DEFAULT_REPLICAS, _parser

    readme = README.read_text()
    up = _parser().parse_args(["up"])
    top = _parser().parse_args(["top"])
    replicas, policy, port = _quoted(
        r"python -m local up +# = make local: sim engine, (\d+) replicas, (\w+), :(\d+)", readme)
    # Without --policy (or a stack), local mode runs the balancing policy's own default.
    assert up.policy is None
    assert (int(replicas), policy, int(port)) == (
        DEFAULT_REPLICAS, LoadBalancingConfig().method, up.port)
    replicas, port = _quoted(r"make local +# (\d+) server replicas behind a real nginx on "
                             r"127\.0\.0\.1:(\d+)", readme)
    assert (int(replicas), int(port)) == (DEFAULT_REPLICAS, up.port)
    makefile = (offline.PROJECT_DIR / "Makefile").read_text()
    replicas, port = _quoted(r"# make local +- (\d+) sim replicas behind a real nginx on "
                             r"127\.0\.0\.1:(\d+)", makefile)
    assert (int(replicas), int(port)) == (DEFAULT_REPLICAS, up.port)
    (first,) = _quoted(r"consecutive ports from `--first-port` \((\d+)\)", readme)
    assert int(first) == up.first_port
    (window,) = _quoted(r"over a rolling\s+(\d+) s window", readme)
    assert float(window) == top.window
    (cut_off,) = _quoted(r"trickling its request is cut off after (\d+) s", readme)
    assert int(cut_off) == CLIENT_BODY_TIMEOUT_SECONDS


def test_readme_quotes_autoscalings_defaults():
    readme = README.read_text()
    defaults = parse_stack_config({"model": {"id": "m"}}).autoscaling
    low, high, waiting = _quoted(r"--autoscale +# defaults: (\d+)-(\d+) replicas, (\d+) waiting "
                                 r"per replica", readme)
    assert (int(low), int(high), int(waiting)) == (
        defaults.min_replicas, defaults.max_replicas, defaults.target_waiting_per_replica)


def test_readme_quotes_the_prod_stack_and_the_pins():
    readme = " ".join(README.read_text().split())  # prose wraps anywhere
    config, _ = offline.read_stack_file(offline.PROJECT_DIR / "Pulumi.prod.yaml")
    prod = parse_stack_config(offline.namespace_values(config))
    low, high = _quoted(r"scales vLLM between (\d+) and (\d+) replicas", readme)
    assert (int(low), int(high)) == (prod.autoscaling.min_replicas, prod.autoscaling.max_replicas)
    (fewest,) = _quoted(r"so the prod stack keeps at least (\d+) replicas", readme)
    assert int(fewest) == prod.fewest_replicas
    controller, chart = _quoted(r"F5 NGINX Ingress Controller \*\*([\d.]+) \(chart ([\d.]+)\)\*\*",
                                readme)
    assert (controller, chart) == (pins.NIC_CONTROLLER_VERSION, pins.NIC_CHART_VERSION)
    (standard,) = _quoted(r"`restricted` Pod Security Standard \((v[\d.]+)\)", readme)
    assert standard == POD_SECURITY_VERSION
