"""``python -m bench profile ...``: latency profiles (server/profiles/, docs/latency-profiles.md).

    python -m bench profile list
    python -m bench profile show PROFILE
    python -m bench profile check PROFILE --against FILE [--model KEY] [--max-worst PCT]
    python -m bench profile fit [--check]
    python -m bench profile compare A B [--prompts 128,512,2048] [--concurrency 1,8,32,128]

``check`` predicts every decode step and prefill of a measurement file in the shared GPU format
(decode-prefill or step-vs-tokens, see bench/fit.py) with the profile's own timing API, prints
measured against predicted per cell, and ends with
``profile check: median |err| <X>%, worst <Y>% over <N> cells``.
``fit`` rewrites the fitted profiles from their measurement files (``--check``: only say whether
the shipped files are current; exit 1 if not).
``compare`` predicts TTFT and inter-token latency on a grid of (prompt length, concurrency)
under both profiles (undilated; :func:`steady_latency` says how) and ends with
``profile compare: median |diff| <X>%, worst <Y>%`` (differences of A relative to B).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from server.engines.profile import Profile, ProfileError, load_profile, profile_names
from server.engines.steps import StepBatch


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the shipped profiles")
    show = sub.add_parser("show", help="one profile's summary, provenance and fit")
    show.add_argument("profile", help="shipped name or path to a .yaml file")
    check = sub.add_parser("check", help="a profile's predictions against a measurement file")
    check.add_argument("profile", help="shipped name or path to a .yaml file")
    check.add_argument("--against", type=Path, required=True,
                       help="measurement file (JSON, the shared GPU format)")
    check.add_argument("--model", default=None,
                       help="the model's key in the file (default: the one the profile names, "
                            "or the file's only model)")
    check.add_argument("--max-worst", type=float, default=None,
                       help="exit 1 when the worst |error| exceeds this many percent")
    compare = sub.add_parser("compare", help="predicted TTFT and inter-token latency of two "
                                             "profiles on one grid")
    compare.add_argument("a", help="profile A (name or path)")
    compare.add_argument("b", help="profile B, the reference")
    compare.add_argument("--prompts", default="128,512,2048", help="prompt tokens per request")
    compare.add_argument("--concurrency", default="1,8,32,128", help="concurrent streams")
    compare.add_argument("--output-tokens", type=int, default=OUTPUT_TOKENS,
                         help=f"tokens generated per request (default {OUTPUT_TOKENS})")
    fit = sub.add_parser("fit", help="rewrite the fitted profiles from their measurements")
    fit.add_argument("--check", action="store_true",
                     help="only check that the shipped files are what the fit writes")
    args = ap.parse_args(argv)
    try:
        if args.command == "list":
            for name in profile_names():
                print(f"{name:16} {load_profile(name).describe()}")
            return 0
        if args.command == "show":
            return _show(load_profile(args.profile))
        if args.command == "check":
            return _check(load_profile(args.profile), args.against, args.model, args.max_worst)
        if args.command == "compare":
            return _compare(load_profile(args.a), load_profile(args.b), _ints(args.prompts),
                            _ints(args.concurrency), args.output_tokens)
        return _fit(args.check)
    except (ProfileError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _show(p: Profile) -> int:
    print(p.describe())
    print(f"  {p.summary}")
    v = p.provenance
    print(f"  source {v.source}: {v.engine.name} {v.engine.version}; {v.model}; {v.hardware}; "
          f"{v.date}")
    if p.fit is not None:
        print(f"  fit: median |err| {p.fit.median_abs_error_pct:g}%, worst "
              f"{p.fit.worst_abs_error_pct:g}% over {p.fit.cells_counted} cells")
    return 0


# --- check ---------------------------------------------------------------------------------------


def check_rows(profile: Profile, path: Path, model: str | None = None
               ) -> list[tuple[str, float, float]]:
    """(cell, measured s, predicted s) for every decode step and prefill in ``path``."""
    data = json.loads(path.read_text())
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict) or not models:
        raise ValueError(f"{path}: no 'models' mapping: not a measurement file of the shared "
                         "format")
    key = model or _model_key(profile, path, models)
    if key not in models:
        raise ValueError(f"{path}: no model {key!r} (models: {', '.join(sorted(models))})")
    entry = models[key]
    rows: list[tuple[str, float, float]] = []
    if isinstance(entry, dict):
        for r in entry.get("decode_ms", []):
            b, kv = int(r["batch"]), int(r["kv"])
            rows.append((f"decode batch {b} kv {kv}", r["ms"] / 1e3,
                         profile.decode_step_seconds(b, kv)))
        for tokens, ms in entry.get("prefill_ms", {}).items():
            rows.append((f"prefill {int(tokens)} tokens", ms / 1e3,
                         profile.prefill_seconds(int(tokens))))
    elif isinstance(entry, list):
        for r in entry:
            t = int(r["tokens"])
            rows.append((f"step {t} tokens", r["ms"] / 1e3, profile.prefill_seconds(t)))
    if not rows:
        raise ValueError(f"{path}: model {key!r} has no decode or prefill cells")
    return rows


def _model_key(profile: Profile, path: Path, models: dict) -> str:
    if len(models) == 1:
        return next(iter(models))
    named = [d.model for d in profile.provenance.data if d.model in models]
    if named:
        return named[0]
    raise ValueError(f"{path} holds several models ({', '.join(sorted(models))}) and profile "
                     f"{profile.name} names none of them: pass --model")


def summary_line(rows: list[tuple[str, float, float]]) -> str:
    errs = [abs(p / m - 1) * 100 for _, m, p in rows]
    return (f"profile check: median |err| {statistics.median(errs):.1f}%, worst "
            f"{max(errs):.1f}% over {len(errs)} cells")


def _check(profile: Profile, path: Path, model: str | None, max_worst: float | None) -> int:
    rows = check_rows(profile, path, model)
    print(f"{profile.describe()}\nagainst {path}")
    print(f"{'cell':<26}{'measured ms':>13}{'predicted ms':>14}{'error':>9}")
    for cell, m, p in rows:
        print(f"{cell:<26}{m * 1e3:>13.3f}{p * 1e3:>14.3f}{(p / m - 1) * 100:>+8.1f}%")
    print(summary_line(rows))
    worst = max(abs(p / m - 1) * 100 for _, m, p in rows)
    return 1 if max_worst is not None and worst > max_worst else 0


# --- compare -------------------------------------------------------------------------------------

OUTPUT_TOKENS = 128


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"expected comma-separated positive integers, got {text!r}")
    return values


def steady_latency(profile: Profile, prompt: int, concurrency: int,
                   output_tokens: int = OUTPUT_TOKENS) -> tuple[float, float]:
    """(TTFT, inter-token time) in seconds for ``concurrency`` closed-loop streams of requests
    with ``prompt`` tokens (no shared prefix) and ``output_tokens`` each, at steady state.

    The ``concurrency - 1`` other sequences hold ``prompt + output_tokens / 2`` KV tokens on
    average. Inter-token time: one decode step of the running batch. TTFT: a slots profile
    prefills alone (its engine prefills beside the decode loop); a continuous profile waits
    half a decode step for the running step to end, then runs its prompt in chunks under the
    per-step token budget, each chunk in a step with the other decodes. Streams beyond the
    batch limit (slots, max_num_seqs, or what the KV cache holds) wait for a place: in a
    saturated closed loop a request then waits (C / S - 1) request lengths (Little's law).
    The profile's own time dilation is ignored: this is the undilated regime.
    """
    p = profile.dilated(1.0)
    s = p.scheduler
    kv = prompt + output_tokens // 2
    if p.kind == "slots":
        batch = min(concurrency, s.admission_slots)
        itl = p.decode_step_seconds(batch)
        ttft = p.prefill_seconds(prompt)
    else:
        fit_kv = max(1, s.kv_cache_tokens // (prompt + output_tokens))
        batch = min(concurrency, s.max_num_seqs, fit_kv)
        itl = p.decode_step_seconds(batch, kv)
        others = (kv,) * (batch - 1)
        budget = max(1, s.max_num_batched_tokens - len(others))
        if s.long_prefill_token_threshold:
            budget = min(budget, s.long_prefill_token_threshold)
        if not s.enable_chunked_prefill:
            budget = max(budget, prompt)
        ttft = p.decode_step_seconds(batch - 1, kv) / 2 if batch > 1 else 0.0
        done = 0
        while done < prompt:
            chunk = min(budget, prompt - done)
            ttft += p.step_seconds(StepBatch(decode_kv=others, prefill=((chunk, done),)))
            done += chunk
    if concurrency > batch:
        ttft += (concurrency / batch - 1) * (ttft + (output_tokens - 1) * itl)
    return ttft, itl


def _compare(a: Profile, b: Profile, prompts: list[int], concurrency: list[int],
             output_tokens: int) -> int:
    print(f"A: {a.describe()}\nB: {b.describe()}")
    print(f"{output_tokens} output tokens per request; differences are A relative to B")
    print(f"{'prompt':>7}{'streams':>8}{'TTFT A ms':>12}{'TTFT B ms':>12}{'diff':>8}"
          f"{'ITL A ms':>11}{'ITL B ms':>11}{'diff':>8}")
    diffs = []
    for prompt in prompts:
        for c in concurrency:
            ta, ia = steady_latency(a, prompt, c, output_tokens)
            tb, ib = steady_latency(b, prompt, c, output_tokens)
            dt, di = (ta / tb - 1) * 100, (ia / ib - 1) * 100
            diffs += [abs(dt), abs(di)]
            print(f"{prompt:>7}{c:>8}{ta * 1e3:>12.1f}{tb * 1e3:>12.1f}{dt:>+7.1f}%"
                  f"{ia * 1e3:>11.2f}{ib * 1e3:>11.2f}{di:>+7.1f}%")
    print(f"profile compare: median |diff| {statistics.median(diffs):.1f}%, worst "
          f"{max(diffs):.1f}%")
    return 0


# --- fit -----------------------------------------------------------------------------------------


def _fit(check_only: bool) -> int:
    from bench import profile_build

    if check_only:
        stale = profile_build.stale()
        for name, problems in stale.items():
            print(f"{name}: differs from a fresh fit ({'; '.join(problems[:5])}); run "
                  "`python -m bench profile fit`")
        if not stale:
            print(f"fitted profiles current: {', '.join(s.name for s in profile_build.SPECS)}")
        return 1 if stale else 0
    for spec in profile_build.SPECS:
        r = profile_build.fitted(spec)
        print(f"{spec.name}: median |err| {100 * r.median_abs_error:.2f}%, worst "
              f"{100 * r.worst_abs_error:.2f}% over {len(r.counted)} cells; "
              f"method terms {r.method_terms}")
    changed = profile_build.write()
    print("wrote " + (", ".join(map(str, changed)) if changed else "nothing (all current)"))
    return 0
