"""The autoscaling model against live runs: ``python -m bench autoscale-validate``.

Runs settings of the autoscaling benchmark live (``bench.autoscale.run_one``: local mode's
replicas, nginx, a real Prometheus and the local autoscaler) and replays each run's very trace
through the discrete-event autoscaling model (bench/des_autoscale.py) on the run's own clock:
the trace and the policy compressed by ``--factor``, the replicas' steps dilated by
``--time-dilation``, and a replica process's start (which does not compress) taken from the
runs themselves. Prints, per run, the live and modelled SLO share, replica-seconds, time from
the surge to the first added replica serving, and the most replicas.

``--model-only --capacity C`` skips the live runs and models the settings for a trace built
with capacity ``C`` (a documented live run's), with ``--start-s`` as the process start.

Settings: ``static:N`` or ``W:R[:A[:WINDOW[:MIN]]]`` (targetWaitingPerReplica,
targetRunningPerReplica, runningAverageSeconds (default 60), scale-down window (default 300),
minReplicas (default 1)); times in trace seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import des, des_autoscale
from bench.autoscale_report import Setting
from bench.autoscale_trace import SHAPES, build
from bench.command import shown
from bench.simmodel import DEFAULT_PROFILE, SimModel
from server.engines.sim import sim_tokenize

SLO_SECONDS = 2.0


def parse_setting(text: str) -> Setting:
    """``static:N`` or ``W:R[:A[:WINDOW[:MIN]]]`` (see the module's docstring)."""
    try:
        if text.startswith("static:"):
            n = int(text.split(":", 1)[1])
            if n < 1:
                raise ValueError
            return Setting(f"static-{n}", replicas=n)
        parts = [float(x) for x in text.split(":")]
        if not 2 <= len(parts) <= 5:
            raise ValueError
        w, r, a, window, low = (parts + [60.0, 300.0, 1.0][len(parts) - 2:])[:5]
        if w < 1 or r < 1 or a < 0 or window < 0 or low < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a setting is static:N or WAITING:RUNNING[:AVERAGE_S[:WINDOW_S[:MIN]]] with "
            f"positive numbers, e.g. 1:6:60:300; got {text!r}") from None
    return Setting(f"auto-w{w:g}-r{r:g}-a{a:g}-{window:g}s-min{low:g}", None, int(w), int(r),
                   window, int(low), running_average_s=a)


def model_for(profile: str, dilation: float, max_num_seqs: int | None) -> SimModel:
    """The benchmark's replicas: `profile` dilated, with `max_num_seqs` when given (the
    server's LLM_MAX_CONCURRENCY, vLLM's --max-num-seqs)."""
    model = SimModel.named(profile, dilation)
    if max_num_seqs is None:
        return model
    prof = model.profile
    if prof.kind != "continuous":
        raise ValueError(f"--max-num-seqs needs a continuous profile; {prof.name} has slots")
    sched = prof.scheduler.model_copy(update={"max_num_seqs": max_num_seqs})
    return SimModel(prof.model_copy(update={"scheduler": sched}))


@dataclass
class Figures:
    slo: float
    replica_s: float
    """Trace seconds."""
    lag_s: float | None
    """Trace seconds from the surge to the first added replica serving."""
    max_replicas: int
    failed: int
    requests: int


PHASES = 8
"""The model runs each live run at this many phases of the poll and scrape clocks (a live
run's autoscaler and Prometheus start anywhere in their intervals, independently): its range
is the model's band for that run."""


def phases(k: int) -> tuple[float, float]:
    """The k-th (poll, scrape) phase pair: both clocks stratified over [0, 1), not aligned."""
    return k / PHASES, ((3 * k + 1) % PHASES + 0.5) / PHASES


def modelled(setting: Setting, shape_name: str, factor: float, capacity: float, seed: int,
             load_s: float, start_s: float, model: SimModel, slo_s: float, title: str = "",
             phase: tuple[float, float] = (0.0, 0.5)) -> tuple[Figures, des_autoscale.Outcome]:
    """The model of one live run (same trace, same clocks)."""
    from bench.autoscale import MAX_REPLICAS, policy_for

    shape = SHAPES[shape_name]
    trace = build(shape, factor, capacity, seed, texts=False)
    salt = len(sim_tokenize(title)) if title else 0  # the client prefixes the run's title
    jobs = [des.Job(r.arrival, r.prompt_tokens + salt, r.max_tokens) for r in trace.requests]
    timing = des_autoscale.live_timing(load_s, factor, start_s, phases=phase)
    params = model.des_params(1)
    if setting.autoscaled:
        policy = policy_for(setting, factor)
        assert policy.max_replicas == MAX_REPLICAS
        out = des_autoscale.simulate(jobs, params, policy, timing, end=trace.wall_seconds)
    else:
        out = des_autoscale.simulate(jobs, params, None, timing, initial=setting.replicas,
                                     end=trace.wall_seconds)
    lag = out.scaler.first_added_serving(trace.phase_start(shape.phases[1].name))
    return Figures(out.slo_share(slo_s * model.profile.time_dilation),
                   out.replica_seconds() * factor, None if lag is None else lag * factor,
                   out.scaler.max_replicas_seen(), out.lost, len(jobs)), out


def live_figures(run: object, slo_s: float) -> Figures:
    shape = run.trace.shape  # type: ignore[attr-defined]
    lag = run.first_added_serving(shape.phases[1].name) if run.setting.autoscaled else None  # type: ignore[attr-defined]
    return Figures(run.slo_share(slo_s), run.replica_seconds(), lag,  # type: ignore[attr-defined]
                   run.max_replicas_seen(), run.failed, len(run.records))  # type: ignore[attr-defined]


def start_overheads(run: object, load_wall_s: float) -> list[tuple[float, int]]:
    """(wall seconds from an added replica's start to its serving less the model load,
    replicas loading when it was added, itself included), per added replica that served."""
    events = run.events  # type: ignore[attr-defined]
    spans = []
    for t, kind, index in events:
        if kind != "added":
            continue
        later = [u for u, k, i in events if k in ("serving", "retired") and i == index and u >= t]
        spans.append((t, later[0] if later else math.inf, later and [
            k for u, k, i in events if u == later[0] and i == index][0] == "serving"))
    out = []
    for t, end, served in spans:
        if served:
            loading = sum(1 for a, b, _ in spans if a <= t < b)
            out.append((end - t - load_wall_s, loading))
    return out


def model_band(setting: Setting, shape_name: str, factor: float, capacity: float, seed: int,
               load_s: float, start_s: float, model: SimModel, slo_s: float, title: str = ""
               ) -> list[Figures]:
    """The model of one live run at `PHASES` phases of the poll and scrape clocks."""
    return [modelled(setting, shape_name, factor, capacity, seed, load_s, start_s, model, slo_s,
                     title, phases(k))[0] for k in range(PHASES)]


def _row(name: str, fig: Figures) -> str:
    lag = "—" if fig.lag_s is None else f"{fig.lag_s:.0f}"
    return (f"| {name} | {fig.requests} | {fig.slo * 100:.1f}% | {fig.replica_s:,.0f} | "
            f"{lag} | {fig.max_replicas} | {fig.failed} |")


def _span(xs: list[float], fmt: str, live: float | None = None) -> str:
    lo, mid, hi = min(xs), statistics.median(xs), max(xs)
    text = f"{fmt.format(mid)} ({fmt.format(lo)}–{fmt.format(hi)})"
    if live is not None:
        text += " ✓" if lo <= live <= hi else " ✗"
    return text


def _band_row(name: str, band: list[Figures], live: Figures | None = None) -> str:
    lags = [f.lag_s for f in band if f.lag_s is not None]
    return " | ".join([
        f"| {name}", str(band[0].requests),
        _span([f.slo * 100 for f in band], "{:.1f}%", None if live is None else live.slo * 100),
        _span([f.replica_s for f in band], "{:,.0f}", None if live is None else live.replica_s),
        _span(lags, "{:.0f}", None if live is None else live.lag_s) if lags else "—",
        f"{min(f.max_replicas for f in band)}–{max(f.max_replicas for f in band)}",
        f"{max(f.failed for f in band)} |"])


HEAD = ("| run | requests | TTFT ≤ objective | replica-s | surge → added serving, s | "
        "max replicas | failed |\n|---|---|---|---|---|---|---|")


def peak_event_rate(run: object, window_s: float = 10.0) -> float:
    """Most streamed tokens per wall second over `window_s` windows (each request's tokens
    spread evenly between its first and last), what the machine had to deliver."""
    records = [r for r in run.records if r.first is not None and r.last is not None]  # type: ignore[attr-defined]
    if not records:
        return 0.0
    t0 = min(r.first for r in records)
    bins: dict[int, float] = {}
    for r in records:
        span = max(r.last - r.first, 1e-9)
        a, b = r.first - t0, r.last - t0
        k = int(a // window_s)
        while k * window_s <= b:
            lo, hi = max(a, k * window_s), min(b, (k + 1) * window_s)
            bins[k] = bins.get(k, 0.0) + r.tokens * max(0.0, hi - lo) / span
            k += 1
    return max(bins.values()) / window_s


def live_record(args: argparse.Namespace, command: str, model: SimModel) -> dict:
    """Run every setting live; the record the model is then compared with."""
    from bench.autoscale import measure_capacity, run_one

    shape = SHAPES[args.trace]
    cap = measure_capacity(model, 10.0, args.seed)
    record: dict = {"command": command, "capacity": cap, "factor": args.factor,
                    "seed": args.seed, "trace": args.trace, "profile": args.profile,
                    "time_dilation": args.time_dilation, "max_num_seqs": args.max_num_seqs,
                    "load_s": args.load, "slo": args.slo, "runs": []}
    overheads = []
    for i, setting in enumerate(args.settings, 1):
        title = f"{i}/{len(args.settings)} {shape.name} {setting.name} load {args.load:g}s"
        print(f"run {title}: {shape.seconds / args.factor:.0f} s wall", flush=True)
        run = run_one(setting, shape, args.load, args.factor, cap, model, args.seed, title)
        fig = live_figures(run, args.slo * args.time_dilation)
        peak = peak_event_rate(run)
        print(f"  live: {_row(setting.name, fig)}; 429s {run.rejected_429}; peak "
              f"{peak:,.0f} tokens/s wall", flush=True)
        overheads += start_overheads(run, args.load / args.factor)
        record["runs"].append({
            "setting": setting.name, "spec": args.spec[i - 1], "title": title,
            "live": fig.__dict__, "rejected_429": run.rejected_429, "peak_tokens_per_s": peak,
            "live_events": [(round(t * args.factor, 1), k, i) for t, k, i in run.events],
            "live_ttft": [r.ttft if r.ok else None for r in run.records]})
    record["start_overheads"] = overheads
    return record


def model_record(record: dict, start_s: float | None) -> tuple[list[str], dict]:
    """Model every run of a live record; the comparison table's rows."""
    overheads = record.get("start_overheads", [])
    start = start_s if start_s is not None else (
        statistics.median(x / k for x, k in overheads) if overheads else 0.0)
    print(f"replica process start (added -> serving, less the load; replicas loading), wall "
          f"s: {', '.join(f'{x:.2f} ({k})' for x, k in overheads) or 'none'}; the model uses "
          f"{start:.2f} per replica loading", flush=True)
    record["start_s"] = start
    model = model_for(record["profile"], record["time_dilation"], record["max_num_seqs"])
    lines = []
    for run in record["runs"]:
        setting = parse_setting(run["spec"])
        live = Figures(**run["live"])
        args = (setting, record["trace"], record["factor"], record["capacity"], record["seed"],
                record["load_s"], start, model, record["slo"], run["title"])
        band = model_band(*args)
        _, out = modelled(*args)
        run["model"] = [f.__dict__ for f in band]
        run["model_events"] = [(round(t * record["factor"], 1), k, i)
                               for t, k, i in out.scaler.events]
        run["model_ttft"] = [None if math.isnan(x) else x for x in out.result.ttft]
        lines += [_row(f"live {setting.name}", live),
                  _band_row(f"model {setting.name}", band, live)]
    return lines, record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench autoscale-validate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="*",
                    help="static:N or WAITING:RUNNING[:AVERAGE_S[:WINDOW_S[:MIN]]]")
    ap.add_argument("--trace", choices=sorted(SHAPES), default="surge",
                    help="trace shape (bench/autoscale_trace.py)")
    ap.add_argument("--factor", type=float, default=10.0,
                    help="time compression of the trace and the policy")
    ap.add_argument("--seed", type=int, default=7, help="trace seed")
    ap.add_argument("--load", type=float, default=30.0, help="model load time, trace seconds")
    ap.add_argument("--profile", default=DEFAULT_PROFILE, help="latency profile of the replicas")
    ap.add_argument("--time-dilation", type=float, default=1.0,
                    help="every engine step this many times the profile's")
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="continuous profiles: the replicas' max_num_seqs")
    ap.add_argument("--slo", type=float, default=SLO_SECONDS,
                    help="TTFT objective in the regime's seconds (x the dilation on the wall)")
    ap.add_argument("--model-only", action="store_true",
                    help="no live runs: model the settings for --capacity and --start-s")
    ap.add_argument("--capacity", type=float, default=None,
                    help="with --model-only: the live run's measured capacity (requests/s wall)")
    ap.add_argument("--start-s", type=float, default=None,
                    help="a replica process's start in wall seconds (default: measured in the "
                         "live runs; required with --model-only)")
    ap.add_argument("--live-only", action="store_true",
                    help="run live and save the record; model it later with --from")
    ap.add_argument("--from", dest="source", type=Path, default=None,
                    help="model the runs of a record saved by --live-only")
    ap.add_argument("--out", type=Path, default=Path("build") / "autoscale-validate",
                    help="folder for the live records (default build/autoscale-validate)")
    args = ap.parse_args(argv)
    command = shown("python -m bench autoscale-validate", sys.argv[1:] if argv is None else argv)
    args.spec = args.settings
    try:
        args.settings = [parse_setting(x) for x in args.settings]
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    if args.source is None and not args.settings:
        ap.error("name the settings to run (or --from a saved record)")
    if args.model_only and (args.capacity is None or args.start_s is None):
        ap.error("--model-only needs --capacity and --start-s")
    try:
        model = model_for(args.profile, args.time_dilation, args.max_num_seqs)
    except ValueError as exc:
        ap.error(str(exc))
    print(command, flush=True)
    if args.model_only:
        lines = [HEAD]
        for setting in args.settings:
            band = model_band(setting, args.trace, args.factor, args.capacity, args.seed,
                              args.load, args.start_s, model, args.slo)
            lines.append(_band_row(f"model {setting.name}", band))
        print("\n".join(lines))
        return 0
    started = time.monotonic()
    if args.source is not None:
        record = json.loads(args.source.read_text())
        path = args.source
    else:
        print(f"replicas: {model.describe()}; compressed {args.factor:g}x", flush=True)
        record = live_record(args, command, model)
        args.out.mkdir(parents=True, exist_ok=True)
        name = (f"{args.profile}-x{args.factor:g}-d{args.time_dilation:g}-seed{args.seed}-"
                + "-".join(s.name for s in args.settings))
        path = args.out / f"{name}.json"
        path.write_text(json.dumps(record))
        print(f"wrote {path} ({time.monotonic() - started:.0f} s)", flush=True)
        if args.live_only:
            return 0
    lines, record = model_record(record, args.start_s)
    path.write_text(json.dumps(record))
    print(f"\n`{record['command']}`: capacity {record['capacity']:.3f} requests/s wall\n"
          + "\n".join([HEAD, *lines]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
