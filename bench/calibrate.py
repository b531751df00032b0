"""``python -m bench calibrate``: measure any OpenAI-compatible endpoint and fit a latency profile.

    python -m bench calibrate --url URL [--api-key K] [--model M] [--minutes N] --out PATH
        [--hardware TEXT] [--time-dilation D] [--prompts 128,512,2048]
        [--concurrency 1,8,32,128] [--max-requests 1000] [--hold 128] [--max-error 15]
        [--raw FILE | --refit FILE]

Probes the endpoint with streaming chat completions, one probe per (prompt length,
concurrency), each built so that what it times is one kind of engine step (bench/
calibrate_probe.py); fits both scheduler kinds, keeps the one that explains the probes better
(bench/calibrate_fit.py), prints the fit per probe and writes the profile (the format of
server/profiles/, ``provenance.source: measured-endpoint``). A fit whose worst cell misses by
more than ``--max-error`` percent is refused (exit 1, nothing written) with the probes that
disagree. Bounded: ``--minutes`` for everything (each probe gets a share and is cut short at
its end) and ``--max-requests``.

Calibrate one replica: through a balancer over several, the streams of a probe land on
different engines and no longer share steps. A simulated endpoint reports its time dilation in
/v1/models and the profile describes the undilated regime (``--time-dilation`` overrides; a real
endpoint has none). docs/latency-profiles.md has the how-to and the limits.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import calibrate_fit as cf
from bench import calibrate_probe as cp
from server.engines.profile import ProfileError, parse_profile

DEFAULT_PROMPTS = "128,512,2048"
DEFAULT_CONCURRENCY = "1,8,32,128"
DEFAULT_MAX_ERROR = 15.0
EXIT_REFUSED = 1
EXIT_ERROR = 2


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None,
                    help="the endpoint: http://HOST:PORT or its /v1 root (required unless "
                         "--refit)")
    ap.add_argument("--api-key", default=None,
                    help="bearer key (default: $OPENAI_API_KEY; none if unset)")
    ap.add_argument("--model", default=None, help="model to calibrate (default: the first in "
                                                  "/v1/models)")
    ap.add_argument("--minutes", type=float, default=5.0,
                    help="time for everything, fit included (default 5)")
    ap.add_argument("--max-requests", type=int, default=1000,
                    help="requests at most (default 1000); the highest concurrency levels are "
                         "dropped to fit")
    ap.add_argument("--out", type=Path, required=True, help="profile file to write (.yaml)")
    ap.add_argument("--name", default=None, help="profile name (default: from --out)")
    ap.add_argument("--hardware", default="unknown",
                    help="what the endpoint runs on, for the provenance (default unknown)")
    ap.add_argument("--time-dilation", type=float, default=None,
                    help="divide measured times by this (default: what /v1/models reports, "
                         "else 1)")
    ap.add_argument("--prompts", default=DEFAULT_PROMPTS,
                    help=f"prompt lengths in tokens (default {DEFAULT_PROMPTS})")
    ap.add_argument("--concurrency", default=DEFAULT_CONCURRENCY,
                    help=f"concurrent streams (default {DEFAULT_CONCURRENCY}; 1 is always "
                         "probed)")
    ap.add_argument("--hold", type=int, default=cp.HOLD_TOKENS,
                    help=f"tokens every stream of the largest probe reaches before it ends, so "
                         f"the KV-cache lower bound covers requests that long (default "
                         f"{cp.HOLD_TOKENS}; 0: no hold)")
    ap.add_argument("--max-error", type=float, default=DEFAULT_MAX_ERROR,
                    help=f"refuse a fit whose worst cell misses by more than this many percent "
                         f"(default {DEFAULT_MAX_ERROR:g})")
    ap.add_argument("--raw", type=Path, default=None,
                    help="also write the measurement (every probe's records) here (JSON)")
    ap.add_argument("--refit", type=Path, default=None, metavar="RAW",
                    help="fit a measurement written by --raw instead of probing")
    args = ap.parse_args(argv)
    if (args.url is None) == (args.refit is None):
        ap.error("give --url (probe an endpoint) or --refit RAW (fit a saved measurement)")
    try:
        prompts = _ints(args.prompts, "--prompts")
        levels = sorted(set(_ints(args.concurrency, "--concurrency")) | {1})
        if args.time_dilation is not None and not args.time_dilation > 0:
            raise ValueError(f"--time-dilation must be positive, got {args.time_dilation:g}")
        if not 0 < args.max_error:
            raise ValueError(f"--max-error must be positive, got {args.max_error:g}")
        name = args.name or _name_from(args.out)
        if args.hold < 0:
            raise ValueError(f"--hold must be 0 or more, got {args.hold}")
        plan = cp.plan_probes(prompts, levels, args.minutes, args.max_requests, args.hold)
    except ValueError as exc:
        ap.error(str(exc))
    if args.refit is not None:
        try:
            measured = Measurement.load(args.refit)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"calibrate: error: {args.refit}: not a measurement written by --raw: {exc}",
                  file=sys.stderr, flush=True)
            return EXIT_ERROR
        say(f"calibrate: re-fitting {args.refit} ({measured.url}, {len(measured.probes)} "
            "probes)")
        return analyse(measured, args.out, name, args.max_error / 100)
    api_key = args.api_key if args.api_key is not None else os.environ.get("OPENAI_API_KEY")
    try:
        measured = asyncio.run(measure(args.url, api_key, args.model, args.time_dilation,
                                       args.hardware, plan))
    except cp.EndpointError as exc:
        print(f"calibrate: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    if args.raw is not None:
        measured.save(args.raw)
        say(f"  measurement written to {args.raw} (--refit {args.raw} fits it again)")
    return analyse(measured, args.out, name, args.max_error / 100)


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{flag} must be comma-separated positive integers, got {text!r}")
    return values


def _name_from(path: Path) -> str:
    name = re.sub(r"[^a-z0-9.-]+", "-", path.stem.lower()).strip("-.")
    if not name:
        raise ValueError(f"cannot make a profile name from {path.name!r}: pass --name")
    return name


def say(text: str) -> None:
    print(text, flush=True)


# --- running ---------------------------------------------------------------------------------


@dataclass
class Measurement:
    """What probing an endpoint produced: enough to fit (and re-fit) a profile."""

    url: str
    model: str
    card: dict[str, Any]
    version: str | None
    hardware: str
    dilation: float
    dilation_source: str
    accounting: str
    notes: list[str]
    requests: int
    seconds: float
    probes: list[cp.ProbeRecord]
    not_probed: list[str]

    def save(self, path: Path) -> None:
        data = {k: v for k, v in self.__dict__.items() if k != "probes"}
        data["probes"] = [r.to_json() for r in self.probes]
        path.write_text(json.dumps(data))

    @classmethod
    def load(cls, path: Path) -> Measurement:
        data = json.loads(path.read_text())
        data["probes"] = [cp.ProbeRecord.from_json(r) for r in data["probes"]]
        return cls(**data)


async def measure(url: str, api_key: str | None, model: str | None, dilation: float | None,
                  hardware: str, plan: cp.Plan, transport: Any = None) -> Measurement:
    """Discover the endpoint, find what it accepts, run the planned probes within the plan's
    time and request bounds."""
    t0 = time.monotonic()
    end = t0 + plan.seconds - cp.FIT_SECONDS
    runner = cp.Runner(url, api_key, plan.max_requests, say, transport=transport)
    try:
        info = await asyncio.wait_for(runner.discover(model, dilation),
                                      timeout=max(1.0, end - time.monotonic()))
        engine = info.card.get("engine") or info.card.get("owned_by")
        say(f"calibrate: {info.url}, model {info.model}"
            + (f", engine {engine}" if engine else "")
            + (f", version {info.version}" if info.version else ""))
        say(f"  time dilation {info.time_dilation:g} ({info.dilation_source}): measured times "
            f"are divided by it")
        await asyncio.wait_for(runner.negotiate(info.max_model_len),
                               timeout=max(1.0, end - time.monotonic()))
        plan = _fit_context(plan, info, runner.dialect)
        p = runner.prompts
        say(f"  prompts: {p.base:.1f} + {p.per_word:.3f} tokens per word"
            f"{'' if p.exact else ' (ASSUMED)'}; max_tokens {runner.dialect.max_tokens}; "
            f"{len(plan.probes)} probes, at most {plan.requests} requests, "
            f"{plan.seconds / 60:g} min")
        for note in runner.dialect.notes + list(plan.dropped):
            say(f"  note: {note}")
        records = await _run_probes(runner, plan, end, info.time_dilation)
    except TimeoutError:
        raise cp.EndpointError("the endpoint did not answer within --minutes") from None
    finally:
        await runner.close()
    accounting = runner.accounting.describe()
    say(f"  token counts: {accounting}")
    return Measurement(
        url=info.url, model=info.model, card=info.card, version=info.version,
        hardware=hardware, dilation=info.time_dilation, dilation_source=info.dilation_source,
        accounting=accounting, notes=list(runner.dialect.notes) + list(plan.dropped),
        requests=runner.sent, seconds=time.monotonic() - t0, probes=records,
        not_probed=[cp.probe_name(q.prompt, q.concurrency) for q in plan.probes[len(records):]])


def analyse(m: Measurement, out: Path, name: str, max_error: float) -> int:
    """Fit, print the fit per probe, refuse or write the profile."""
    observed = cf.observe(m.probes, m.dilation)
    try:
        choice = cf.choose(observed)
    except ValueError as exc:
        print(f"calibrate: cannot fit: {exc}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    _print_fit(choice, max_error)
    reason = cf.refusal(choice.best, max_error)
    if reason is not None:
        print(f"calibrate: {reason}. Nothing written.", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    text = render(profile_data(choice, m, name))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    b = choice.best
    say(f"calibrate: {b.kind} model, median |err| {100 * b.median_abs:.1f}%, worst "
        f"{100 * b.worst_abs:.1f}% over {len(b.predictions)} cells ({m.requests} requests, "
        f"{m.seconds:.0f} s); wrote {out}")
    return 0


def _fit_context(plan: cp.Plan, info: cp.EndpointInfo, dialect: cp.Dialect) -> cp.Plan:
    """Prompts that do not fit the endpoint's context with the probes' max_tokens are cut to
    the largest that does (and the plan says so)."""
    if info.max_model_len is None:
        return plan
    top = info.max_model_len - dialect.max_tokens - 8
    if top < 16:
        raise cp.EndpointError(f"the endpoint's context ({info.max_model_len} tokens) leaves no "
                               f"room for prompts beside {dialect.max_tokens} output tokens")
    prompts = sorted({min(p.prompt, top) for p in plan.probes})
    if all(p.prompt <= top for p in plan.probes):
        return plan
    levels = sorted({p.concurrency for p in plan.probes})
    new = cp.plan_probes(prompts, levels, plan.seconds / 60, plan.max_requests,
                         max((p.hold for p in plan.probes), default=0))
    cut = sorted({p.prompt for p in plan.probes if p.prompt > top})
    note = (f"prompts {', '.join(map(str, cut))} cut to {top} tokens: the endpoint's context "
            f"is {info.max_model_len} (prompt + {dialect.max_tokens} output tokens must fit)")
    return cp.Plan(new.probes, new.seconds, new.max_requests, new.sizing_requests,
                   plan.dropped + (note,))


async def _run_probes(runner: cp.Runner, plan: cp.Plan, end: float,
                      dilation: float) -> list[cp.ProbeRecord]:
    records: list[cp.ProbeRecord] = []
    for i, planned in enumerate(plan.probes):
        now = time.monotonic()
        label = f"[{i + 1}/{len(plan.probes)}] {cp.probe_name(planned.prompt, planned.concurrency)}"
        if now >= end - 1.0:
            say(f"{label}: skipped, --minutes spent")
            break
        try:
            await asyncio.wait_for(runner.settle(), timeout=end - now)
        except TimeoutError:
            say(f"{label}: skipped: the endpoint did not answer a short request in time")
            break
        deadline = plan.deadline(i, time.monotonic(), end)
        started = time.monotonic()
        rec = await runner.probe(planned, runner.dialect.max_tokens, deadline)
        records.append(rec)
        say(f"{label}: {time.monotonic() - started:.1f} s, {len(rec.streams)} requests; "
            + _probe_summary(rec, dilation))
    return records


def _probe_summary(rec: cp.ProbeRecord, d: float) -> str:
    """What a probe showed at a glance (undilated)."""
    parts = []
    observed = cf.observe([rec], d) if rec.concurrency == 1 else None
    if observed is not None:
        for o in observed.observations:
            parts.append(f"{o.what} {o.measured_s * 1e3:.1f} ms")
    else:
        firsts = [s.first - s.sent for s in rec.streams if s.first is not None]
        if firsts:
            parts.append(f"TTFT median {statistics.median(firsts) / d * 1e3:.1f} ms")
        if rec.limit is not None:
            queued = sum(1 for s in rec.role("bg") if s.first is None)
            parts.append(f"QUEUED: {rec.limit} running, {queued} waiting")
        else:
            running = sum(1 for s in rec.streams if s.first is not None)
            parts.append(f"{running} streams ran at once, none queued")
    errors = [s for s in rec.streams if s.outcome == "error"]
    if errors:
        parts.append(f"{len(errors)} errors ({errors[0].error})")
    if rec.cut_short:
        parts.append(f"cut short: {rec.cut_short}")
    return "; ".join(parts)


def _print_fit(choice: cf.Choice, max_error: float) -> None:
    b, o = choice.best, choice.other
    say("")
    say(f"fit per probe ({b.kind} model; undilated; '!' marks a cell off by more than "
        f"{100 * max_error:g}%):")
    say(f"{'probe':<26}{'cell':<48}{'measured ms':>12}{'predicted':>11}{'error':>9}")
    for p in b.predictions:
        mark = " !" if abs(p.error) > max_error else ""
        say(f"{p.obs.probe:<26}{p.obs.label:<48}{p.obs.measured_s * 1e3:>12.2f}"
            f"{p.predicted_s * 1e3:>11.2f}{100 * p.error:>+8.1f}%{mark}")
    say(f"kind: {_selection(choice)}"
        + (f"; the {o.kind} model's own fit: median |err| {100 * o.median_abs:.1f}%, worst "
           f"{100 * o.worst_abs:.1f}% over {len(o.predictions)} cells" if o else ""))
    say(f"parameters: " + ", ".join(f"{k} {v:g}" for k, v in b.params.items())
        + "".join(f", {k} {v:g} (method term)" for k, v in b.method_terms.items()))
    for line in choice.observed.skipped:
        say(f"  skipped: {line}")


# --- the profile -----------------------------------------------------------------------------


def _engine(meta: Measurement) -> tuple[str, str, str]:
    """(engine name, version, model) as the endpoint describes itself."""
    card = meta.card
    engine = str(card.get("engine") or ("vllm" if card.get("owned_by") == "vllm" else
                                        card.get("owned_by") or "unknown"))
    model = str(card.get("root") or meta.model)
    profile = card.get("profile") if isinstance(card.get("profile"), dict) else None
    if card.get("simulated"):
        what = (f"latency profile {profile.get('name')} ({profile.get('kind')})" if profile
                else "simulated")
        version = f"llm-serving sim engine, {what}"
        model = f"{meta.model} (simulated: no weights; {what})"
    elif meta.version:
        version = meta.version
    else:
        version = "unknown (the endpoint does not say)"
    return engine, version, model


def profile_data(choice: cf.Choice, meta: Measurement, name: str) -> dict[str, Any]:
    b = choice.best
    o = choice.observed
    engine, version, model = _engine(meta)
    limit = min(o.limits.values()) if o.limits else None
    unseen: list[str] = []
    if b.kind == "continuous":
        max_seqs = limit or o.most_running
        if limit is None:
            unseen.append(f"max_num_seqs {max_seqs} is a LOWER BOUND: no request queued up to "
                          f"{o.most_running} streams")
        else:
            unseen.append(f"max_num_seqs {limit}: requests queued behind {limit} running "
                          f"streams ({', '.join(o.limits)}); a KV cache full at that point "
                          "would look the same")
        budget = max(choice.budget, max_seqs)
        blocks = max(1, math.ceil(o.kv_held / cf.BLOCK))
        unseen += [choice.budget_note,
                   f"num_gpu_blocks {blocks} is a LOWER BOUND: {o.kv_held} KV tokens were held "
                   "at once without a preemption or a stall",
                   f"block_size {cf.BLOCK}, enable_chunked_prefill true and "
                   "long_prefill_token_threshold 0 are ASSUMED (vLLM 0.33.0's defaults; not "
                   "observable through the API)",
                   f"enable_prefix_caching {str(o.caching).lower()}: " + _cache_note(o)]
        scheduler: dict[str, Any] = {
            "kind": "continuous", "max_num_seqs": max_seqs, "max_num_batched_tokens": budget,
            "block_size": cf.BLOCK, "num_gpu_blocks": blocks,
            "enable_prefix_caching": o.caching, "enable_chunked_prefill": True,
            "long_prefill_token_threshold": 0}
        cost = {"form": "roofline", "params": b.params}
    else:
        slots = limit or o.most_running
        unseen.append(f"slots {slots}: requests queued behind {slots} running streams"
                      if limit else f"slots {slots} is a LOWER BOUND: no request queued up to "
                                    f"{o.most_running} streams")
        cache = (o.cached_prompt // cf.BLOCK) * cf.BLOCK if o.caching else 0
        unseen.append(f"prefix cache: {_cache_note(o)}"
                      + (f"; prefix_cache_tokens {cache} is a LOWER BOUND (the capacity is "
                         "not observable)" if cache else ""))
        unseen.append("the request overhead (HTTP, tokenizing) is inside prefill_base_ms")
        scheduler = {"kind": "slots", "slots": slots, "prefix_cache_tokens": cache,
                     "prefix_cache_block_tokens": cf.BLOCK}
        cost = {"form": "slots-linear", "params": b.params}
    sched_notes = "; ".join(unseen) + "."
    if b.kind == "continuous":  # a slots scheduler has no notes field: provenance says it
        scheduler["notes"] = sched_notes
    notes = [f"Model selection: {_selection(choice)}.", f"Token counts: {meta.accounting}.",
             f"Time dilation {meta.dilation:g} ({meta.dilation_source}) divided out: the "
             "profile describes the undilated regime."]
    if b.kind == "slots":
        notes.append(f"Scheduler: {sched_notes}")
    notes += [f"{n}." for n in meta.notes]
    notes += [f"Cut short: {r.name}: {r.cut_short}." for r in meta.probes if r.cut_short]
    if meta.not_probed:
        notes.append(f"Not probed (--minutes spent): {', '.join(meta.not_probed)}.")
    notes += [f"Not fitted: {s}." for s in o.skipped] + [f"{n}." for n in b.notes]
    fit_method = (
        "python -m bench calibrate: each probe's observations are engine steps (decode windows, "
        "the step that computed a foreground prompt beside the decodes, times to first token "
        "with the measured wait); "
        + ("roofline step model fitted by Levenberg-Marquardt on log(predicted / measured) "
           "(bench/fit.py); request_overhead_ms is the time a request spends outside the "
           "engine (HTTP, tokenizing), added to TTFT cells only"
           if b.kind == "continuous" else
           "slots-linear model fitted by non-negative least squares on relative errors")
        + ". Residuals per cell below; file names the probe.")
    return {
        "name": name,
        "summary": (f"{engine} endpoint calibrated on {datetime.date.today()}: {b.kind} "
                    f"scheduling; fit median {100 * b.median_abs:.1f}%, worst "
                    f"{100 * b.worst_abs:.1f}% over {len(b.predictions)} cells."),
        "provenance": {
            "source": "measured-endpoint",
            "engine": {"name": engine, "version": version},
            "model": model,
            "hardware": meta.hardware,
            "date": datetime.date.today(),
            "method": (f"python -m bench calibrate against {meta.url}: {len(meta.probes)} probes "
                       f"(prompt length x concurrent streams), {meta.requests} streaming chat "
                       f"completions in {meta.seconds:.0f} s; decode windows of "
                       f"{cp.WINDOW} steps, queueing called after {cp.PLATEAU} steps without "
                       "a new stream starting (bench/calibrate_probe.py)."),
            "notes": " ".join(notes),
        },
        "scheduler": scheduler,
        "cost": cost,
        "fit": {
            "method": fit_method,
            "method_terms": b.method_terms,
            "cells_counted": len(b.predictions),
            "median_abs_error_pct": round(100 * b.median_abs, 2),
            "worst_abs_error_pct": round(100 * b.worst_abs, 2),
            "cells": [c.model_dump(mode="json") for c in b.fit_cells()],
        },
    }


def _selection(choice: cf.Choice) -> str:
    others = [f"{k} {v:.3f}" for k, v in choice.scores.items() if k != choice.kind]
    return (f"{choice.kind} (RMS log error {choice.scores.get(choice.kind, math.nan):.3f}"
            + (f"; {', '.join(others)}" if others else "; no alternative fitted")
            + f", on the {choice.compared} observations both kinds predict)")


def _cache_note(o: cf.Observed) -> str:
    if o.cached_ratio is None:
        return "not probed"
    return (f"a repeated prompt of {o.cached_prompt} tokens took {100 * o.cached_ratio:.0f}% "
            "of a fresh one's TTFT")


HEADER = ("# Written by `python -m bench calibrate` from probes of a live endpoint; residuals per "
          "probe cell under fit.\n")


def render(data: dict[str, Any]) -> str:
    data = dict(data)
    fit = dict(data["fit"])
    cells = fit.pop("cells")
    data["fit"] = fit
    text = HEADER + yaml.safe_dump(data, sort_keys=False, width=100, allow_unicode=True)
    text += "  cells:\n" + "".join(
        "  - " + yaml.safe_dump({k: v for k, v in c.items() if v is not None},
                                default_flow_style=True, width=1 << 20, sort_keys=False)
        for c in cells)
    try:
        parse_profile(yaml.safe_load(text), data["name"])  # what we write must load
    except ProfileError as exc:
        raise AssertionError(f"calibrate built an invalid profile: {exc}") from None
    return text
