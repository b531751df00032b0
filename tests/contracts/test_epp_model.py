"""The endpoint picker in the discrete-event model (bench/dispatch.py) held to the Inference
Extension's facts at the pin (tests/contracts/data/gateway-api-inference-extension-1.5.0.json):
every weight, interval and threshold the model uses equals the value read at the tag."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from bench.dispatch import READS, EppConfig
from components.pins import PINNED
from tests.contracts import facts

FACTS = facts.pinned("gateway-api-inference-extension")


def _seconds(text: str) -> float:
    """'50ms (--refresh-metrics-interval)' -> 0.05; '200ms' -> 0.2; '1s per scrape' -> 1."""
    m = re.match(r"\s*(\d+(?:\.\d+)?)\s*(ms|s)\b", text)
    assert m, f"no duration in {text!r}"
    return float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)


def expected(f: dict[str, Any]) -> dict[str, float]:
    """What each EppConfig field must be, read from the facts."""
    profile = f["eppConfig"]["chartDefaultPluginsYaml"]["schedulingProfiles"][0]["plugins"]
    weights = {p["pluginRef"]: p["weight"] for p in profile}
    scorers = f["scheduling"]["scorers"]
    prefix = f["scheduling"]["prefixProducer"]["defaults"]
    detector = f["admission"]["saturationDetector"]["defaults"]
    dispatch = f["flowControl"]["dispatch"]
    tick = re.search(r"every (\d+(?:\.\d+)?) ?(ms|s)\b", dispatch)
    limit = re.search(r"static policy: (\d+(?:\.\d+)?)", dispatch)
    assert tick and limit, dispatch
    for name, w in weights.items():  # the chart's profile and the scorer facts agree
        assert scorers[name]["weight"] == w, name
    return {
        "queue_weight": weights["queue-scorer"],
        "kv_cache_weight": weights["kv-cache-utilization-scorer"],
        "prefix_weight": weights["prefix-cache-scorer"],
        "poll_s": _seconds(f["scheduling"]["metricsFreshness"]["pollInterval"]),
        "block_tokens": prefix["blockSizeTokens"],
        "chars_per_token": prefix["averageCharactersPerToken"],
        "max_prefix_blocks": prefix["maxPrefixBlocksToMatch"],
        "lru_capacity": prefix["lruCapacityPerServer"],
        "queue_depth_threshold": detector["queueDepthThreshold"],
        "kv_cache_util_threshold": detector["kvCacheUtilThreshold"],
        "metrics_staleness_s": _seconds(detector["metricsStalenessThreshold"]),
        "dispatch_tick_s": _seconds(f"{tick.group(1)}{tick.group(2)}"),
        "usage_limit": float(limit.group(1)),
    }


def problems(config: EppConfig, f: dict[str, Any]) -> list[str]:
    want = expected(f)
    out = [f"EppConfig.{k} is {getattr(config, k)!r}, the facts say {v!r}"
           for k, v in want.items() if getattr(config, k) != v]
    unchecked = {x.name for x in dataclasses.fields(EppConfig)} - set(want)
    out += [f"EppConfig.{k} is not held to any fact" for k in sorted(unchecked)]
    return out


def test_the_pin_is_the_version_modelled() -> None:
    assert PINNED["gateway-api-inference-extension"] == FACTS["version"] == "1.5.0"


def test_every_modelled_value_equals_the_facts() -> None:
    assert problems(EppConfig(), FACTS) == []


def test_a_wrong_value_is_caught() -> None:
    assert problems(dataclasses.replace(EppConfig(), queue_weight=1.0), FACTS) == [
        "EppConfig.queue_weight is 1.0, the facts say 2"]
    changed = {**FACTS, "scheduling": {**FACTS["scheduling"], "metricsFreshness": {
        "pollInterval": "100ms (--refresh-metrics-interval)"}}}
    assert problems(EppConfig(), changed) == [
        "EppConfig.poll_s is 0.05, the facts say 0.1"]


def test_the_metrics_the_model_reads_are_the_ones_the_epp_scrapes() -> None:
    vllm = FACTS["modelServerMetrics"]["vllm"]
    assert READS == {"waiting": vllm["queue"]["metric"],
                     "kv_usage": vllm["kvCacheUsage"]["metric"],
                     "cache_blocks": vllm["cacheInfo"]["metric"]}
    assert {"block_size", "num_gpu_blocks"} <= set(vllm["cacheInfo"]["labels"])
    # the scheduler's counters mean these gauges (tests/contracts/test_vllm_scheduler.py)
    assert FACTS["scheduling"]["filters"] == []
    assert "flowControl" in FACTS["eppConfig"]["featureGates"]
