"""Benchmark one server replica: the sim engine against its latency model (default), or the
transformers engine against the raw batched forward of its model (``--engine transformers``,
see server/bench_transformers.py).

    python -m server.bench [--streams 256] [--max-tokens 64] [--prompt-tokens 200]
    python -m server.bench --engine transformers [--streams 8] [--model-size 20m|1b]
        [--device cpu|cuda] [--compare-library]

Sim mode:

Starts ONE real ``uvicorn server:app`` process (sim engine) on 127.0.0.1, holds ``--streams``
concurrent streaming chat requests against it from async httpx clients (closed loop: each client
starts a new request after its stream ends and a random pause of up to one decode step; starts
are staggered over one cycle so arrivals are spread), parses the SSE, and compares measured
time-to-first-token and inter-token times (median, p90) with what the latency model predicts for
that concurrency. Exit code 0 when every ratio is within --tolerance.

Prediction (formulas of server/engines/sim.py; no measured value goes in):
  P   = prefill_base + prefill_per_token * prompt_tokens            (TTFT, no queueing)
  S   = decode_base + decode_per_seq * A                           (one decode step = ITL)
  A   = sequences in the decode batch. Each closed-loop client pauses W on average, spends P in
        prefill, on average S/2 waiting for the next step boundary, then (T-1) steps in the
        batch, so A = N * (T-1)*S / (W + P + S/2 + (T-1)*S), solved with S by fixed-point
        iteration. The model has no variance for equal prompts, so its p90 equals its median.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from local.procs import run_command, spawn
from server import bench_transformers
from server.engines.profile import Profile
from server.engines.sim import sim_chat_prompt, sim_tokenize
from server.settings import from_env

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Samples:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    requests: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    inflight: int = 0
    inflight_samples: list[int] = field(default_factory=list)
    running_samples: list[float] = field(default_factory=list)
    server_ttft: list[tuple[float, float]] = field(default_factory=list)
    """(sum, count) of llm_time_to_first_token_seconds at the window's start and end."""


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def predict(p: Profile, n: int, prompt_tokens: int, max_tokens: int,
            think: float) -> tuple[float, float, float]:
    """Return (TTFT, inter-token time, decode batch size A) predicted by the model.

    ``think`` is the mean pause of a client between two requests.
    """
    prefill = p.prefill_seconds(prompt_tokens)
    if max_tokens <= 1:
        return prefill, 0.0, 0.0
    a = float(n)
    for _ in range(200):
        step = p.decode_step_seconds(a)
        in_batch = (max_tokens - 1) * step
        a = n * in_batch / (think + prefill + step / 2 + in_batch)
    return prefill, p.decode_step_seconds(a), a


async def one_request(client: httpx.AsyncClient, body: dict, s: Samples,
                      window: tuple[float, float]) -> None:
    start_w, end_w = window
    t0 = time.monotonic()
    last = None
    s.inflight += 1
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                s.errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            buf = b""
            # SSE events end with a blank line; split raw bytes ourselves (cheaper than
            # aiter_lines, which matters with thousands of events per second on 2 cores).
            async for data in r.aiter_raw():
                now = time.monotonic()
                buf += data
                *events, buf = buf.split(b"\n\n")
                for event in events:
                    if not event.startswith(b"data: {"):
                        continue
                    choice = json.loads(event[6:])["choices"]
                    if not choice or not choice[0]["delta"].get("content"):
                        continue
                    if start_w <= now <= end_w:
                        s.tokens += 1
                        if last is None:
                            if t0 >= start_w:
                                s.ttft.append(now - t0)
                        else:
                            s.itl.append(now - last)
                    last = now
        if start_w <= t0 and time.monotonic() <= end_w:
            s.requests += 1
    except httpx.HTTPError as exc:
        s.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        s.inflight -= 1


async def worker(client: httpx.AsyncClient, body: dict, s: Samples, delay: float,
                 think: float, window: tuple[float, float], seed: int) -> None:
    rng = random.Random(seed)
    await asyncio.sleep(delay)
    while time.monotonic() < window[1]:
        await one_request(client, body, s, window)
        # A random pause before the next request, as independent users would have. Without it
        # every client fires its next request the instant its stream ends, which is always
        # right after a decode step, while both event loops are busy delivering that step's
        # tokens: the benchmark would then measure its own lock-step, not the server.
        await asyncio.sleep(rng.uniform(0, think))


async def sampler(base: str, s: Samples, window: tuple[float, float]) -> None:
    async with httpx.AsyncClient(base_url=base) as c:
        while time.monotonic() < window[1]:
            await asyncio.sleep(0.5)
            if time.monotonic() >= window[0]:
                s.inflight_samples.append(s.inflight)
                values = {}
                for line in (await c.get("/metrics")).text.splitlines():
                    if not line.startswith("#") and " " in line:
                        name, value = line.rsplit(" ", 1)
                        values[name] = float(value)
                s.running_samples.append(values["llm_requests_running"])
                ttft = (values["llm_time_to_first_token_seconds_sum"],
                        values["llm_time_to_first_token_seconds_count"])
                s.server_ttft[1:] = [ttft]
                if len(s.server_ttft) == 1:
                    s.server_ttft.append(ttft)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(env: dict[str, str], port: int, timeout: float = 30.0) -> subprocess.Popen:
    """A server process on 127.0.0.1:`port` with `env` over this one's (minus its LLM_*),
    once /ready answers 200 (a transformers model may take minutes to load)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")} | env
    # Its own session, recorded so that no signal to this command leaves it running.
    proc = spawn(
        [sys.executable, "-m", "uvicorn", "server:app", "--host", "127.0.0.1", "--port",
         str(port), "--log-level", "warning", "--no-access-log"],
        log=None, cwd=ROOT, env=full,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"server did not become ready in {timeout:g} s")


async def run_part(base: str, body: dict, streams: range, total: int, cycle: float,
                   think: float, window: tuple[float, float], with_sampler: bool) -> Samples:
    s = Samples()
    limits = httpx.Limits(max_connections=len(streams) + 4,
                          max_keepalive_connections=len(streams) + 4)
    timeout = httpx.Timeout(60.0, connect=10.0)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as client:
        tasks = [asyncio.create_task(worker(client, body, s, i * cycle / total, think, window, i))
                 for i in streams]
        if with_sampler:
            tasks.append(asyncio.create_task(sampler(base, s, window)))
        else:
            tasks.append(asyncio.create_task(count_inflight(s, window)))
        await asyncio.gather(*tasks)
    return s


async def count_inflight(s: Samples, window: tuple[float, float]) -> None:
    while time.monotonic() < window[1]:
        await asyncio.sleep(0.5)
        if time.monotonic() >= window[0]:
            s.inflight_samples.append(s.inflight)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _part_main(args: tuple) -> Samples:
    return asyncio.run(run_part(*args))


def run(args: argparse.Namespace, base: str, body: dict, cycle: float, think: float) -> Samples:
    """Drive the load from ``--client-procs`` processes (one Python event loop parsing
    thousands of SSE events per second adds its own queueing delay to what it measures)."""
    t0 = time.monotonic()  # CLOCK_MONOTONIC is shared by the processes of this machine
    warmup = args.warmup if args.warmup is not None else cycle * 1.2
    window = (t0 + warmup, t0 + warmup + args.duration)
    n, k = args.streams, max(1, args.client_procs)
    parts = [(base, body, range(i, n, k), n, cycle, think, window, i == 0) for i in range(k)]
    if k == 1:
        results = [_part_main(parts[0])]
    else:
        # The workers leave Ctrl-C to this process, which stops them (and the server).
        with multiprocessing.get_context("spawn").Pool(k, initializer=_ignore_sigint) as pool:
            results = pool.map(_part_main, parts)
    total = Samples()
    for r in results:
        total.ttft += r.ttft
        total.itl += r.itl
        total.requests += r.requests
        total.tokens += r.tokens
        total.errors += r.errors
        total.running_samples += r.running_samples
        total.server_ttft += r.server_ttft
    m = min(len(r.inflight_samples) for r in results)
    total.inflight_samples = [sum(r.inflight_samples[i] for r in results) for i in range(m)]
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m server.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("sim", "transformers"), default="sim",
                    help="the engine served: sim (default) or transformers (a random-weight "
                         "Llama built here, no download)")
    ap.add_argument("--streams", type=int, default=None,
                    help="concurrent streams (default: sim 256, transformers 8)")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="tokens per request (default: sim 64, transformers 128)")
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="approximate prompt size (default: sim 200, transformers 64)")
    ap.add_argument("--duration", type=float, default=None,
                    help="measured seconds (default: sim 15, transformers 30)")
    ap.add_argument("--warmup", type=float, default=None, help="default: 1.2 request cycles")
    ap.add_argument("--tolerance", type=float, default=0.10,
                    help="largest |measured/predicted - 1| that passes (default 0.10)")
    ap.add_argument("--think-ms", type=float, default=None,
                    help="clients pause uniform(0, think) between requests; default: one "
                         "decode step at full load, from the model")
    ap.add_argument("--client-procs", type=int, default=2,
                    help="sim: client processes sharing the streams")
    bench_transformers.add_arguments(ap)
    args = ap.parse_args(argv)
    tf = args.engine == "transformers"
    for name, sim_default, tf_default in (("streams", 256, 8), ("max_tokens", 64, 128),
                                          ("prompt_tokens", 200, 64), ("duration", 15.0, 30.0)):
        if getattr(args, name) is None:
            setattr(args, name, tf_default if tf else sim_default)
    if tf:
        return bench_transformers.main(args)

    # Sim parameters: the server defaults unless LLM_SIM_* (a profile, overrides, a time
    # dilation) are set in the environment.
    env = {k: v for k, v in os.environ.items() if k.startswith("LLM_SIM_")}
    env |= {"LLM_ENGINE": "sim", "LLM_MAX_CONCURRENCY": str(args.streams),
            "LLM_MAX_QUEUE": str(args.streams), "LLM_MAX_TOKENS": str(args.max_tokens),
            "LLM_MAX_MODEL_LEN": str(max(4096, args.prompt_tokens * 2 + args.max_tokens)),
            "LLM_DRAIN_SECONDS": "5", "LLM_LOG_LEVEL": "warning"}
    settings = from_env(env)
    params = settings.sim_latency_profile()
    if params.kind != "slots":
        print(f"server.bench predicts slots profiles only; {params.name} is {params.kind}")
        return 2

    words = " ".join(f"w{i}" for i in range(args.prompt_tokens))
    messages = [{"role": "user", "content": words}]
    prompt_tokens = len(sim_tokenize(sim_chat_prompt(messages)))
    body = {"model": settings.model_name, "messages": messages, "max_tokens": args.max_tokens,
            "stream": True, "seed": 1}
    think = (args.think_ms / 1000 if args.think_ms is not None
             else params.decode_step_seconds(args.streams))
    ttft_p, itl_p, batch_p = predict(params, args.streams, prompt_tokens, args.max_tokens,
                                     think / 2)

    port = free_port()
    proc = start_server(env, port)
    try:
        cycle = think / 2 + ttft_p + itl_p / 2 + (args.max_tokens - 1) * itl_p
        s = run(args, f"http://127.0.0.1:{port}", body, cycle, think)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()

    if not s.ttft or not s.itl:
        print("no samples; errors:", s.errors[:5])
        return 1
    print(f"sim model: {params.describe()}")
    print(f"load: {args.streams} concurrent streams (closed loop, pause uniform(0, "
          f"{think * 1e3:.0f} ms) between requests, {args.client_procs} client processes), "
          f"prompt {prompt_tokens} tokens, max_tokens {args.max_tokens}, measured for "
          f"{args.duration:g} s on {os.cpu_count()} cores")
    mean_inflight = statistics.mean(s.inflight_samples) if s.inflight_samples else float("nan")
    mean_running = statistics.mean(s.running_samples) if s.running_samples else float("nan")
    cycle = think / 2 + ttft_p + itl_p / 2 + (args.max_tokens - 1) * itl_p
    inflight_p = args.streams * (cycle - think / 2) / cycle
    print(f"concurrency: client streams in flight {mean_inflight:.1f} (mean; model "
          f"{inflight_p:.1f}), server llm_requests_running {mean_running:.1f} (mean); model's "
          f"decode batch {batch_p:.1f}")
    if len(s.server_ttft) == 2 and s.server_ttft[1][1] > s.server_ttft[0][1]:
        (s0, c0), (s1, c1) = s.server_ttft
        print(f"server-side TTFT (llm_time_to_first_token_seconds, mean over the window): "
              f"{(s1 - s0) / (c1 - c0) * 1e3:.1f} ms")
    print(f"done: {s.requests} requests, {s.tokens} tokens ({s.tokens / args.duration:.0f} "
          f"tokens/s), errors {len(s.errors)}")
    rows = [
        ("TTFT median", statistics.median(s.ttft), ttft_p),
        ("TTFT p90", quantile(s.ttft, 0.9), ttft_p),
        ("inter-token median", statistics.median(s.itl), itl_p),
        ("inter-token p90", quantile(s.itl, 0.9), itl_p),
    ]
    print(f"{'metric':<20}{'measured ms':>13}{'predicted ms':>14}{'ratio':>8}  verdict")
    ok = not s.errors
    for name, measured, predicted in rows:
        ratio = measured / predicted
        good = abs(ratio - 1) <= args.tolerance
        ok &= good
        print(f"{name:<20}{measured * 1e3:>13.1f}{predicted * 1e3:>14.1f}{ratio:>8.3f}  "
              f"{'PASS' if good else 'FAIL'}")
    if s.errors:
        print("errors (first 3):", *s.errors[:3], sep="\n  ")
    print(f"overall: {'PASS' if ok else 'FAIL'} (tolerance {args.tolerance:.0%}, "
          f"samples: {len(s.ttft)} TTFT, {len(s.itl)} inter-token)")
    if ok:
        print(f"Conclusion: at {args.streams} concurrent streams the sim engine runs as its "
              f"latency model predicts (first-token and inter-token times within "
              f"{args.tolerance:.0%}).")
    else:
        print(f"Conclusion: at {args.streams} concurrent streams the sim engine does not run "
              f"as its latency model predicts (a FAIL row above, or failed requests); a busy "
              f"machine slows the measured side.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_command(main, what="python -m server.bench"))
