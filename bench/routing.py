"""First streamed event through the model router vs single-model local mode:
``python -m bench.routing [--rounds 20]``.

Starts, side by side, two local clusters of sim replicas (the benchmark's latency model,
bench/simmodel.py): ``single`` serves one model (today's nginx.conf, no routing) and ``routed``
serves two (nginx reads the body and routes by its ``model``,
components/policies/model_routing.py), two replicas per model. Then, one request at a time,
sends the same streaming chat completion (local mode's banner prompt, model ``alpha``) to each,
and straight to one replica (``direct``: what the proxy adds), rotating which goes first each
round. For each it times the first SSE event (the role announcement: proxy, server and
tokenization, before any generation) and the first token (plus the prefill). Prints medians
with 95 % bootstrap intervals, and the paired ratio routed/single.

``--pad-kib`` adds a second prompt of that size (the routing regex walks the whole body).
Run it under the exclusive CPU lock; about half a minute.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence

import httpx

from bench import ci
from bench.client import SseParser, is_content
from bench.ports import free_ports
from bench.simmodel import SimModel
from local.__main__ import PROMPT
from local.cluster import LocalCluster
from local.models import LocalModel

TARGETS = ("single", "routed", "direct")
REPLICAS = 2
"""Per model."""


def first_event(client: httpx.Client, url: str, body: dict[str, object],
                key: str) -> tuple[float, float]:
    """(seconds to the first SSE event, seconds to the first token) of one streamed request."""
    parser = SseParser()
    started = time.perf_counter()
    event = token = None
    with client.stream("POST", url, json=body,
                       headers={"Authorization": f"Bearer {key}"}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code} {response.read()[:200]!r}")
        for data in response.iter_raw():
            now = time.perf_counter() - started
            for payload in parser.feed(data):
                if event is None:
                    event = now
                if token is None and is_content(payload):
                    token = now
    if event is None or token is None:
        raise RuntimeError(f"{url}: the stream had no token")
    return event, token


def measure(rounds: int, prompt: str, single: LocalCluster, routed: LocalCluster,
            warmup: int = 3) -> dict[str, list[tuple[float, float]]]:
    urls = {"single": single.endpoint + "/chat/completions",
            "routed": routed.endpoint + "/chat/completions",
            "direct": single.replica_urls[0] + "/v1/chat/completions"}
    body = {"model": "alpha", "stream": True, "max_tokens": 4,
            "messages": [{"role": "user", "content": prompt}]}
    out: dict[str, list[tuple[float, float]]] = {t: [] for t in TARGETS}
    rng = random.Random(19)
    with httpx.Client(timeout=30) as client:
        for number in range(warmup + rounds):
            order = list(TARGETS)
            rng.shuffle(order)
            for target in order:
                key = single.api_key if target != "routed" else routed.api_key
                timing = first_event(client, urls[target], body, key)
                if number >= warmup:
                    out[target].append(timing)
    return out


def report(label: str, runs: dict[str, list[tuple[float, float]]]) -> list[str]:
    lines = [f"{label}: median (95 % interval), ms, n={len(runs['single'])}"]
    for index, what in ((0, "first event"), (1, "first token")):
        series = {t: [r[index] * 1000 for r in runs[t]] for t in TARGETS}
        cells = "  ".join(f"{t} {ci.quantile(series[t], 50, block=1)}" for t in TARGETS)
        paired = ci.ratio(series["routed"], series["single"], 50, block=1)
        lines.append(f"  {what:11s}  {cells}  routed/single {paired}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20, help="requests per target (default 20)")
    ap.add_argument("--pad-kib", type=int, default=16,
                    help="also measure a prompt of this many KiB (0: only the short one)")
    args = ap.parse_args(argv)

    model = SimModel()
    base = free_ports(3 * REPLICAS + 2, random.Random())
    print(f"{model.describe()}; nginx routes 2 models x {REPLICAS} replicas vs 1 x {REPLICAS}",
          flush=True)
    single = LocalCluster(models=[LocalModel("alpha", REPLICAS)], port=base,
                          first_replica_port=base + 1, server_env=model.env(),
                          max_output_tokens=model.max_tokens)
    routed = LocalCluster(models=[LocalModel("alpha", REPLICAS), LocalModel("beta", REPLICAS)],
                          port=base + REPLICAS + 1, first_replica_port=base + REPLICAS + 2,
                          server_env=model.env(), max_output_tokens=model.max_tokens)
    with single, routed:
        prompts = [("short prompt", PROMPT)]
        if args.pad_kib > 0:
            words = (PROMPT + " ") * (args.pad_kib * 1024 // (len(PROMPT) + 1))
            prompts.append((f"{args.pad_kib} KiB prompt", words))
        for label, prompt in prompts:
            for line in report(label, measure(args.rounds, prompt, single, routed)):
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
