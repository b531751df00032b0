"""``python -m server.bench --engine transformers``: the real engine against its own hardware limit.

1. Builds a random-weight Llama locally (:mod:`server.engines.random_llama`; no download): by
   default ~23 M parameters (``--model-size 20m``), a size where the forward pass, not Python,
   is most of a step on a CPU; ``--model-size 1b`` is the GPU shape (~1.0 B parameters).
2. **Raw batched forward** at batch B, in this process, while the server is idle: the B prompts
   prefilled in one forward, then ``max_tokens - 1`` decode steps of all B sequences (greedy
   argmax on the device, transformers' own ``DynamicCache``; on CUDA a ``StaticCache`` step
   replayed as a CUDA graph unless ``--no-cuda-graphs``). Its rate, B x max_tokens tokens over
   that time, is the limit for that batch on that machine: the same prompts and token counts the
   server serves, with no HTTP, scheduling, sampling or detokenisation.
3. Optionally (``--compare-library``), transformers' own continuous batching on the same
   prompts: ``generate_batch`` as one call, and a persistent ``ContinuousBatchingManager``
   (created, started and warmed up before the clock starts).
4. **Served**: one real ``uvicorn server:app`` process (``LLM_ENGINE=transformers``, B slots)
   and B concurrent streaming chat clients in a closed loop (each starts its next request when
   its stream ends; starts staggered over one request's duration at the raw rate), sampling at
   temperature 1. Tokens are counted as the clients receive them, in windows after a warm-up.

The speed of these shared machines drifts by tens of percent within minutes, so raw and served
alternate: ``--rounds`` rounds of (one raw run, one served window of ``duration / rounds``), and
a last raw run; Z is the median of the raw runs, X the served tokens over all windows. The last
line is ``transformers engine: X tokens/s served at B streams, Y% of the raw batched forward
(Z tokens/s)``. The clients share the machine with the server, as they would in local mode; on
a 2-core CPU they take about 5% of one core.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.client import SseParser, is_content
from local import cleanup
from server.engines.random_llama import SIZES, build_random_llama, prompt_text


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("--engine transformers")
    g.add_argument("--model-size", choices=sorted(SIZES), default="20m",
                   help="random-weight Llama shape (default 20m: ~23 M parameters; 1b for a GPU)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when torch sees a GPU, else cpu")
    g.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="auto: float32 on CPU, bfloat16 on CUDA")
    g.add_argument("--rounds", type=int, default=3,
                   help="served windows (--duration split between them), each after a raw run")
    g.add_argument("--no-cuda-graphs", action="store_true",
                   help="CUDA: eager raw loop, and LLM_CUDA_GRAPHS=off for the server")
    g.add_argument("--compare-library", action="store_true",
                   help="also time transformers' generate_batch / ContinuousBatchingManager")
    g.add_argument("--model-dir", type=Path, default=None,
                   help="build the model here (kept) instead of a temporary directory")


@dataclass
class Load:
    stamps: list[float] = field(default_factory=list)
    """Arrival time of every content event the clients received."""
    ttft: list[float] = field(default_factory=list)
    requests: int = 0
    errors: list[str] = field(default_factory=list)


def _resolve(args: argparse.Namespace, torch: Any) -> tuple[str, str]:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, dtype


def _prompt(tokenizer: Any, target: int) -> tuple[str, list[int]]:
    """Chat prompt text whose template-encoded length is close to ``target`` tokens."""
    words, best = target, None
    for _ in range(8):
        text = prompt_text(words)
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 tokenize=False, add_generation_prompt=True)
        ids = list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        if best is None or abs(len(ids) - target) < abs(len(best[1]) - target):
            best = (text, ids)
        if abs(len(ids) - target) <= 2:
            break
        words = max(1, round(words * target / len(ids)))
    assert best is not None
    return best


def raw_batched(torch: Any, model: Any, prompt: list[int], batch: int, steps: int,
                device: str, graphs: bool) -> tuple[float, float]:
    """Seconds of (prefill of ``batch`` copies of ``prompt``, ``steps - 1`` decode steps)."""
    from transformers import DynamicCache, StaticCache

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ids = torch.tensor([prompt] * batch, device=device)
    with torch.inference_mode():
        if device == "cuda" and graphs:
            cache = StaticCache(config=model.config, max_cache_len=len(prompt) + steps + 8)
        else:
            cache = DynamicCache(config=model.config)
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t1 = time.perf_counter()
        if device == "cuda" and graphs:
            def one() -> None:
                o = model(input_ids=tok, cache=cache, use_cache=True)
                tok.copy_(o.logits[:, -1].argmax(-1, keepdim=True))

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    one()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                one()
            sync()
            t1 = time.perf_counter()  # capture is setup, not part of the steps
            for _ in range(steps - 1):
                graph.replay()
            sync()
            t2 = time.perf_counter()
            del graph
        else:
            for _ in range(steps - 1):
                out = model(input_ids=tok, cache=cache, use_cache=True)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def library_rates(torch: Any, model: Any, prompt: list[int], batch: int, steps: int
                  ) -> dict[str, float]:
    """transformers' continuous batching on the same work: tokens/s of one ``generate_batch``
    call and of a persistent, warmed-up ``ContinuousBatchingManager``."""
    import logging

    from transformers import ContinuousBatchingConfig, GenerationConfig

    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)
    gen = GenerationConfig(max_new_tokens=steps, do_sample=False, eos_token_id=-1,
                           pad_token_id=0)
    inputs = [list(prompt) for _ in range(batch)]
    blocks = max(16, 2 * batch * (-(-(len(prompt) + steps) // 256)))
    rates: dict[str, float] = {}
    t = time.perf_counter()
    res = model.generate_batch(inputs=inputs, generation_config=gen)
    dt = time.perf_counter() - t
    rates["generate_batch (one call)"] = sum(len(r.generated_tokens) for r in res.values()) / dt
    mgr = model.init_continuous_batching(
        generation_config=gen,
        continuous_batching_config=ContinuousBatchingConfig(num_blocks=blocks))
    mgr.start()
    try:
        def run(n: int) -> float:
            t = time.perf_counter()
            mgr.add_requests(inputs=inputs[:n], max_new_tokens=steps)
            done = tokens = 0
            while done < n:
                r = mgr.get_result(timeout=30)
                if r is None:
                    raise RuntimeError("ContinuousBatchingManager returned nothing in 30 s")
                if r.is_finished():
                    done += 1
                    tokens += len(r.generated_tokens)
            return tokens / (time.perf_counter() - t)

        run(min(2, batch))
        rates["ContinuousBatchingManager (persistent, warm)"] = statistics.median(
            run(batch) for _ in range(2))
    finally:
        mgr.stop(block=True, timeout=10)
        model.destroy_cached_continuous_batching_manager()
    return rates


async def _client(base: str, body: dict, load: Load, delay: float, end: float,
                  window: tuple[float, float]) -> None:
    await asyncio.sleep(delay)
    timeout = httpx.Timeout(120.0, connect=10.0)
    async with httpx.AsyncClient(base_url=base, timeout=timeout) as client:
        while time.monotonic() < end:
            t0 = time.monotonic()
            first = True
            try:
                async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        load.errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                        await asyncio.sleep(0.5)
                        continue
                    parser = SseParser()
                    async for data in r.aiter_raw():
                        now = time.monotonic()
                        for payload in parser.feed(data):
                            if not is_content(payload):
                                continue  # the role chunk, the finish chunk, [DONE]
                            load.stamps.append(now)
                            if first and window[0] <= t0 <= window[1]:
                                load.ttft.append(now - t0)
                            first = False
                if window[0] <= t0 and time.monotonic() <= window[1]:
                    load.requests += 1
            except httpx.HTTPError as exc:
                load.errors.append(f"{type(exc).__name__}: {exc}")


def server_env(args: argparse.Namespace, model_dir: Path, device: str, dtype: str,
               prompt_len: int) -> dict[str, str]:
    b, t = args.streams, args.max_tokens
    env = {"LLM_ENGINE": "transformers", "LLM_MODEL": str(model_dir),
           "LLM_SERVED_MODEL_NAME": "bench", "LLM_DEVICE": device, "LLM_DTYPE": dtype,
           "LLM_MAX_CONCURRENCY": str(b), "LLM_MAX_QUEUE": str(b), "LLM_MAX_TOKENS": str(t),
           "LLM_MAX_MODEL_LEN": str(max(256, prompt_len + t + 1)), "LLM_DRAIN_SECONDS": "5",
           "LLM_LOG_LEVEL": "warning", "HF_HUB_OFFLINE": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if args.no_cuda_graphs:
        env["LLM_CUDA_GRAPHS"] = "off"
    return env


def serve_round(base: str, body: dict, streams: int, cycle: float, warmup: float,
                duration: float) -> tuple[Load, tuple[float, float]]:
    """``streams`` closed-loop clients, starts staggered over ``cycle``; tokens are counted in
    the window ``[warmup, warmup + duration]``; returns when every client's last stream ended
    (the server is idle again)."""
    load = Load()
    t0 = time.monotonic()
    window = (t0 + warmup, t0 + warmup + duration)

    async def drive() -> None:
        await asyncio.gather(*(_client(base, body, load, i * cycle / streams, window[1], window)
                               for i in range(streams)))

    asyncio.run(drive())
    return load, window


def main(args: argparse.Namespace) -> int:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.bench import free_port, start_server

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device, dtype = _resolve(args, torch)
    graphs = device == "cuda" and not args.no_cuda_graphs
    b, t = args.streams, args.max_tokens
    tmp = None
    if args.model_dir is None:
        tmp = model_dir = cleanup.temp_dir("llm-bench-model-")
    else:
        model_dir = args.model_dir
    raws: list[float] = []
    rounds: list[tuple[Load, tuple[float, float]]] = []
    proc = None
    try:
        info = build_random_llama(model_dir, args.model_size, device=device, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        text, prompt = _prompt(tokenizer, args.prompt_tokens)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                     attn_implementation="sdpa")
        model.to(device).eval()
        where = (torch.cuda.get_device_name(0) if device == "cuda"
                 else f"cpu, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
        print(f"model: random-weight Llama {args.model_size} ({info['params'] / 1e6:.1f} M "
              f"parameters, vocabulary {info['vocab']}), {dtype} on {where}; torch "
              f"{torch.__version__}, transformers {transformers.__version__}", flush=True)
        print(f"workload: batch/streams {b}, prompt {len(prompt)} tokens, {t} new tokens per "
              f"request; raw batched forward = one prefill of {b}x{len(prompt)} tokens, then "
              f"{t - 1} decode steps ({'CUDA graph' if graphs else 'eager'}), greedy on the "
              f"device; served = {b} streaming chat clients in a closed loop, temperature 1",
              flush=True)

        def raw() -> tuple[float, float]:
            prefill, decode = raw_batched(torch, model, prompt, b, t, device, graphs)
            raws.append(b * t / (prefill + decode))
            return raws[-1], decode / (t - 1) * 1e3

        raw_batched(torch, model, prompt, b, min(t, 16), device, graphs)  # warm-up
        if args.compare_library:
            rate, _ = raw()
            for name, lib in library_rates(torch, model, prompt, b, t).items():
                print(f"transformers {name}: {lib:.0f} tokens/s, {100 * lib / rate:.0f}% of "
                      f"the raw batched forward ({rate:.0f} tokens/s, measured just before)",
                      flush=True)
            raws.clear()

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = start_server(server_env(args, model_dir, device, dtype, len(prompt)), port,
                            timeout=900)
        body = {"model": "bench", "messages": [{"role": "user", "content": text}],
                "max_tokens": t, "stream": True, "temperature": 1.0, "seed": 1}
        per_round = args.duration / args.rounds
        step_ms: list[float] = []
        for r in range(args.rounds):
            rate, ms = raw()  # while the server is idle
            step_ms.append(ms)
            cycle = t * b / rate  # one request's duration at the raw rate
            warmup = args.warmup if args.warmup is not None else 1.5 * cycle
            load, window = serve_round(base, body, b, cycle, warmup, per_round)
            rounds.append((load, window))
            got = sum(1 for s in load.stamps if window[0] <= s <= window[1]) / per_round
            print(f"round {r + 1}: raw {rate:.0f} tokens/s, then served {got:.0f} tokens/s "
                  f"({100 * got / rate:.0f}%)", flush=True)
        rate, ms = raw()
        step_ms.append(ms)
        card = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]
        del model
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        cleanup.remove_temp_dir(tmp)

    z = statistics.median(raws)
    print(f"raw batched forward: {z:.0f} tokens/s (median of {len(raws)} runs bracketing the "
          f"served rounds, range {min(raws):.0f}-{max(raws):.0f}), "
          f"{statistics.median(step_ms):.1f} ms per decode step", flush=True)
    tokens = sum(sum(1 for s in load.stamps if w[0] <= s <= w[1]) for load, w in rounds)
    x = tokens / args.duration
    ttft = [v for load, _ in rounds for v in load.ttft]
    errors = [e for load, _ in rounds for e in load.errors]
    done = sum(load.requests for load, _ in rounds)
    ttft_text = f"{statistics.median(ttft) * 1e3:.0f} ms" if ttft else "n/a"
    print(f"served: {tokens} tokens in {args.rounds} windows of {per_round:g} s ({x:.0f} "
          f"tokens/s), {done} requests completed inside them, TTFT median {ttft_text}, "
          f"errors {len(errors)}", flush=True)
    stats = card.get("batching")
    if stats:
        step = stats["decode_seconds"] / max(1, stats["decode_steps"]) * 1e3
        print(f"engine (whole run): {stats['decode_steps']} decode steps, mean batch "
              f"{stats['mean_decode_batch']}, {step:.1f} ms per decode step, "
              f"{stats['prefill_steps']} prefill steps, CUDA graphs captured "
              f"{stats['cuda_graphs_captured']}", flush=True)
    if errors:
        print("errors (first 3):", *errors[:3], sep="\n  ")
    if not tokens:
        print("no tokens were served in the windows")
        return 1
    print(f"transformers engine: {x:.0f} tokens/s served at {b} streams, {100 * x / z:.0f}% of "
          f"the raw batched forward ({z:.0f} tokens/s)")
    return 0 if not errors else 1
