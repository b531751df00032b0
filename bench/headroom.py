"""How many SSE events per second this machine delivers with the sim's timing intact:
``python -m bench.headroom [--replicas 3] [--steps-ms 80,40,20,10,5] [--write]``.

Local mode's sim replicas (3 by default) behind its nginx, each with ``--slots`` busy streams
from ONE client process (as a benchmark or a calibration runs beside the cluster), in a closed
loop through nginx. Every replica decodes all its streams in steps of a fixed length, so the
offered event rate is ``replicas x slots / step``; the steps get shorter level by level. At each
level we count the content events delivered in a window after a warm-up and the median gap
between two events of one stream. The model holds while the median gap stays within
``--tolerance`` of the step (a CPU that falls behind delivers events late and in bunches, so
the median gap leaves the step on either side); the headroom is the delivered rate of the fastest level where it
holds. ``--write`` records it in local/headroom.yaml, where ``python -m local up --profile``
reads it to choose a time dilation (local/dilation.py). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass

import httpx
import yaml

from bench.client import SseParser, is_content
from bench.command import shown
from bench.ports import free_ports
from local.dilation import HEADROOM_FILE

TOKENS = 100
"""Output tokens per request."""


@dataclass(frozen=True)
class Level:
    step_ms: float
    offered: float
    delivered: float
    median_gap_ms: float
    errors: int

    @property
    def stretch(self) -> float:
        return self.median_gap_ms / self.step_ms


async def _stream(client: httpx.AsyncClient, url: str, body: dict, delay: float,
                  window: tuple[float, float], counts: list[int], gaps: list[float]) -> None:
    await asyncio.sleep(delay)
    while time.monotonic() < window[1]:
        parser, last = SseParser(), None
        try:
            async with client.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    counts[1] += 1
                    await r.aread()
                    await asyncio.sleep(0.05)
                    continue
                async for data in r.aiter_raw():
                    now = time.monotonic()
                    n = sum(1 for p in parser.feed(data) if is_content(p))
                    if n and window[0] <= now < window[1]:
                        counts[0] += n
                        if last is not None:
                            gaps.append(now - last)
                    if n:
                        last = now
                    if now >= window[1]:
                        break
        except httpx.HTTPError:
            counts[1] += 1
            await asyncio.sleep(0.05)


async def _level(endpoint: str, model: str, key: str, streams: int, step_s: float,
                 warmup: float, seconds: float) -> tuple[float, float, int]:
    """Closed loop; the streams start staggered over one request's length (as independent
    users would), so their requests do not all end and restart in the same step."""
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": model, "stream": True, "max_tokens": TOKENS,
            "messages": [{"role": "user", "content": "count to a hundred"}]}
    request_s = TOKENS * step_s
    t0 = time.monotonic()
    start = t0 + max(warmup, request_s * 1.2)
    window = (start, start + seconds)
    counts, gaps = [0, 0], []
    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    async with httpx.AsyncClient(limits=limits, headers=headers,
                                 timeout=httpx.Timeout(60, connect=10)) as c:
        await asyncio.gather(*[_stream(c, f"{endpoint}/chat/completions", body,
                                       i * request_s / streams, window, counts, gaps)
                               for i in range(streams)])
    return counts[0] / seconds, statistics.median(gaps) if gaps else float("nan"), counts[1]


def measure(replicas: int, slots: int, steps_ms: list[float], warmup: float,
            seconds: float, say=print) -> list[Level]:
    from local.cluster import LocalCluster

    levels = []
    for step in steps_ms:
        base = free_ports(replicas + 1, random.Random(f"headroom-{step}"))
        env = {"LLM_SIM_PREFILL_BASE_MS": "5", "LLM_SIM_PREFILL_MS_PER_TOKEN": "0",
               "LLM_SIM_DECODE_BASE_MS": f"{step:g}", "LLM_SIM_DECODE_MS_PER_SEQ": "0",
               "LLM_MAX_CONCURRENCY": str(slots), "LLM_MAX_QUEUE": str(slots),
               "LLM_MAX_TOKENS": "256", "LLM_LOG_LEVEL": "warning", "LLM_DRAIN_SECONDS": "1"}
        with LocalCluster(replicas, port=base, first_replica_port=base + 1, server_env=env,
                          max_output_tokens=256) as cluster:
            rate, gap, errors = asyncio.run(_level(cluster.endpoint, cluster.model_name,
                                                   cluster.api_key, replicas * slots, step / 1e3,
                                                   warmup, seconds))
        level = Level(step, replicas * slots / (step / 1e3), rate, gap * 1e3, errors)
        levels.append(level)
        say(f"step {step:g} ms: offered {level.offered:,.0f} events/s, delivered "
            f"{rate:,.0f}, median gap {gap * 1e3:.1f} ms ({level.stretch:.2f}x the step), "
            f"{errors} errors")
    return levels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.headroom", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--slots", type=int, default=32, help="busy streams per replica")
    ap.add_argument("--steps-ms", default="80,40,20,10,5",
                    help="decode step per level, ms (comma-separated, slowest first)")
    ap.add_argument("--warmup", type=float, default=3.0,
                    help="at least; and at least 1.2 request lengths, over which streams start")
    ap.add_argument("--seconds", type=float, default=8.0, help="measured window per level")
    ap.add_argument("--tolerance", type=float, default=0.05,
                    help="the model holds while the median gap is within this of the step "
                         "(late events arrive bunched: a median below the step is a miss too)")
    ap.add_argument("--write", action="store_true", help=f"record the figure in {HEADROOM_FILE}")
    args = ap.parse_args(argv)
    steps = [float(x) for x in args.steps_ms.split(",") if x]
    started = time.monotonic()
    levels = measure(args.replicas, args.slots, steps, args.warmup, args.seconds)
    holding = [lv for lv in levels if abs(lv.stretch - 1) <= args.tolerance and not lv.errors]
    if not holding:
        print("headroom: the model did not hold at any level; try longer steps")
        return 1
    best = max(holding, key=lambda lv: lv.delivered)
    command = shown("python -m bench.headroom", sys.argv[1:] if argv is None else argv)
    print(f"headroom: {best.delivered:,.0f} SSE events/s with the timing intact (step "
          f"{best.step_ms:g} ms, median gap {best.stretch:.2f}x) through nginx to {args.replicas} "
          f"replicas on {os.cpu_count()} cores, one client process; "
          f"{time.monotonic() - started:.0f} s")
    if args.write:
        HEADROOM_FILE.write_text(
            "# Written by `python -m bench.headroom --write` (see local/dilation.py).\n"
            + yaml.safe_dump({
                "events_per_s": round(best.delivered),
                "cores": os.cpu_count(), "replicas": args.replicas,
                "command": command.removesuffix(" --write"),
                "date": datetime.date.today().isoformat(),
                "levels": [{"step_ms": lv.step_ms, "offered": round(lv.offered),
                            "delivered": round(lv.delivered),
                            "median_gap_ms": round(lv.median_gap_ms, 2), "errors": lv.errors}
                           for lv in levels]}, sort_keys=False))
        print(f"wrote {HEADROOM_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
