"""From probe records to a latency profile: ``python -m bench calibrate``'s analysis (pure).

1. **Observations** (:func:`observe`). Each probe (bench/calibrate_probe.py) yields times that
   are one kind of engine step each, divided by the endpoint's time dilation:

   * ``decode``: a window of steps in which the same streams all decode: time per token, with
     each stream's KV length at the middle of the window;
   * ``mixed``: the background streams' step that ended at the foreground request's first
     token (for an engine that batches prefill with decodes, the step that computed the
     foreground's prompt beside theirs);
   * ``ttft alone``: the time to first token of a request alone on the endpoint (median of
     three); ``ttft cached``: the same prompt again (prefix cache);
   * ``ttft beside``: the foreground's time to first token, with the measured wait for the
     step it joined (``offset``).

2. **Two scheduler kinds, fitted and compared** (model selection). *slots*: prefill runs beside
   a shared decode loop, a decode step costs ``base + per_seq x running``, a prefill
   ``base + per_token x uncached (+ per_cached x cached)`` and the foreground's TTFT is its
   prefill, whatever the others do (non-negative least squares on relative errors).
   *continuous*: every observation is one step of the ``roofline`` form (server/engines/
   profile.py) over the batch it ran: decodes at their KV lengths, the foreground's prompt
   beside them, a TTFT adding ``request_overhead_ms`` (bench/fit.py). The kind whose fit has
   the smaller RMS log error over the same observations is chosen; both are reported.

3. **The scheduler block.** What the probes saw, and lower bounds where they could not see:
   the batch limit where requests queued (else: at least the most streams seen running), the
   per-step token budget from the first-token staircase of the bursts (else: at least the
   largest prefill seen in one step), the KV cache (at least the tokens seen held at once),
   prefix caching (a repeated prompt's TTFT). The profile's notes say which is which.

4. **Refusal**: a fit whose worst cell misses by more than ``max_error`` is refused, naming the
   probes that disagree.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from bench.calibrate_probe import ProbeRecord, StreamRecord
from bench.fit import Cell, FitResult, fit_roofline
from server.engines.profile import FitCell, RooflineParams
from server.engines.steps import StepBatch

BLOCK = 16
"""KV-cache block size in tokens: not observable through the API; vLLM's default (and ours)."""
CACHED_RATIO = 0.8
"""A repeated prompt whose TTFT is below this share of a fresh one's: the prefix cache is on."""
SLOTS_PARAMS = ("prefill_base_ms", "prefill_ms_per_token", "prefill_ms_per_cached_token",
                "decode_base_ms", "decode_ms_per_seq")


@dataclass(frozen=True)
class Observation:
    probe: str
    what: str
    """``decode``, ``mixed``, ``ttft alone``, ``ttft cached``, ``ttft beside``."""
    label: str
    measured_s: float
    """Undilated seconds."""
    decode_kv: tuple[int, ...] = ()
    """The sequences decoding in the step: each one's KV tokens before it."""
    prompt: int = 0
    """Prompt tokens computed (TTFT and mixed observations)."""
    repeat: bool = False
    """The prompt was sent before (a prefix-cache hit if the cache is on)."""
    offset_s: float = 0.0
    """Measured wait before the step that computed the prompt (``ttft beside``)."""

    @property
    def is_ttft(self) -> bool:
        return self.what.startswith("ttft")


@dataclass
class Observed:
    """Everything the probes showed, undilated."""

    observations: list[Observation] = field(default_factory=list)
    limits: dict[str, int] = field(default_factory=dict)
    """Probe name -> streams running when requests queued."""
    most_running: int = 0
    kv_held: int = 0
    """Most KV tokens (whole blocks) seen held at once by running streams."""
    largest_step_prefill: int = 0
    """Most new tokens seen computed in one step (a foreground prompt beside the decodes)."""
    budget: tuple[float, float] | None = None
    """Per-step token budget (lower, upper) from the bursts' first-token staircases."""
    cached_ratio: float | None = None
    """TTFT of a repeated prompt / of a fresh one, at the largest prompt probed."""
    cached_prompt: int = 0
    """The prompt length ``cached_ratio`` was measured at."""
    skipped: list[str] = field(default_factory=list)

    @property
    def caching(self) -> bool:
        return self.cached_ratio is not None and self.cached_ratio < CACHED_RATIO


# --- observations ----------------------------------------------------------------------------


BUNCHED = 0.25
"""A token gap below this share of the window's time per token is a bunched event."""
MAX_BUNCHED = 0.15
"""A window where more of a stream's gaps are bunched than this is not timed: the endpoint or
the client fell behind the engine (events late and sent together)."""


def _window(streams: Iterable[StreamRecord], start: float, end: float
            ) -> tuple[float, list[int], float] | None:
    """Seconds per token over ``[start, end]`` (median over the streams that got at least two
    tokens in it), each such stream's mean KV length over the window, and the median share of
    bunched gaps."""
    rates: list[float] = []
    kvs: list[int] = []
    bunched: list[float] = []
    for s in streams:
        # From each stream's second token in the window: a stream that just got its first
        # token joins a slots engine's decode loop at the next step, not at once.
        inside = [(t, n) for t, n in s.tokens if start <= t <= end][1:]
        if len(inside) < 2 or inside[-1][1] - inside[0][1] < 2:
            continue
        (ta, na), (tb, nb) = inside[0], inside[-1]
        rate = (tb - ta) / (nb - na)
        rates.append(rate)
        gaps = [(t2 - t1) / (n2 - n1) for (t1, n1), (t2, n2) in zip(inside, inside[1:],
                                                                   strict=False)]
        bunched.append(sum(g < BUNCHED * rate for g in gaps) / len(gaps))
        # The step that yields token n+1 reads prompt + n - 1 tokens of KV.
        kvs.append(round(s.prompt_tokens + (na + nb - 3) / 2))
    if not rates:
        return None
    return statistics.median(rates), sorted(kvs), statistics.median(bunched)


def _running_through(streams: Iterable[StreamRecord], start: float, end: float
                     ) -> list[StreamRecord]:
    return [s for s in streams if s.first is not None and s.first <= start
            and (s.ended is None or s.ended >= end)]


def _blocks(tokens: int) -> int:
    return -(-tokens // BLOCK) * BLOCK


def observe(probes: Sequence[ProbeRecord], dilation: float = 1.0) -> Observed:
    out = Observed()
    d = dilation
    lone_step = None
    for rec in probes:
        if rec.concurrency == 1:
            lone_step = _observe_alone(rec, d, out) or lone_step
    for rec in probes:
        if rec.concurrency > 1:
            _observe_burst(rec, d, out, lone_step)
    return out


def _observe_alone(rec: ProbeRecord, d: float, out: Observed) -> float | None:
    alone = [s for s in rec.role("alone") if s.first is not None]
    if not alone:
        out.skipped.append(f"{rec.name}: no request got a token")
        return None
    prompt = round(statistics.median(s.prompt_tokens for s in alone))
    ttft = statistics.median(s.first - s.sent for s in alone)  # type: ignore[operator]
    out.observations.append(Observation(rec.name, "ttft alone",
                                        f"ttft alone, prompt {prompt}", ttft / d, prompt=prompt))
    rates, kvs = [], []
    for s in alone:
        w = _window([s], s.first, s.tokens[-1][0])  # type: ignore[arg-type]
        if w is not None:
            rates.append(w[0])
            kvs += w[1]
    step = None
    if rates:
        step = statistics.median(rates)
        kv = round(statistics.median(kvs))
        out.observations.append(Observation(rec.name, "decode", f"decode 1 seq, kv {kv}",
                                            step / d, decode_kv=(kv,)))
    out.most_running = max(out.most_running, 1)
    cached = [s for s in rec.role("cached") if s.first is not None]
    if cached:
        c = cached[0]
        t = (c.first - c.sent) / d  # type: ignore[operator]
        out.observations.append(Observation(rec.name, "ttft cached",
                                            f"ttft of a repeated prompt {c.prompt_tokens}", t,
                                            prompt=c.prompt_tokens, repeat=True))
        if out.cached_ratio is None or prompt >= out.cached_prompt:
            out.cached_ratio = t / (ttft / d)
            out.cached_prompt = prompt
    return step


def _observe_burst(rec: ProbeRecord, d: float, out: Observed, lone_step: float | None) -> None:
    m = rec.marks
    bg, fg = rec.role("bg"), rec.role("fg")
    streams = rec.streams
    # Most streams running at once, and the KV they held (at the probe's end, the most).
    end = m.get("end", max((s.ended or 0.0) for s in streams) if streams else 0.0)
    live = [s for s in streams if s.first is not None and s.first <= end
            and (s.ended is None or s.ended >= end - 1e-9)]
    out.most_running = max(out.most_running, len(live))
    out.kv_held = max(out.kv_held, sum(_blocks(s.prompt_tokens + s.count_at(end)) for s in live))
    if rec.limit is not None:
        out.limits[rec.name] = rec.limit
    windows: list[tuple[str, float, float]] = []
    if "capped" in m and "last_start" in m:
        windows.append(("queued", m["last_start"], m["capped"]))
    if "steady1" in m and "fg_sent" in m:
        windows.append(("before", m["steady1"], m["fg_sent"]))
    if "steady2" in m:
        windows.append(("after", m["steady2"], end))
    rates: dict[str, float] = {}
    for name, a, b in windows:
        w = _window(_running_through(streams, a, b), a, b)
        if w is None:
            continue
        step, kvs, bunched = w
        n = len(kvs)
        label = f"decode {n} seqs, kv ~{round(statistics.mean(kvs))}"
        if bunched > MAX_BUNCHED:
            out.skipped.append(f"{rec.name}: {label}: {100 * bunched:.0f}% of the token gaps "
                               "came bunched (the endpoint or this client fell behind the "
                               "engine); not timed")
            continue
        rates[name] = step
        out.observations.append(Observation(rec.name, "decode", label, step / d,
                                            decode_kv=tuple(kvs)))
    if fg and fg[0].first is not None and "before" in rates and "after" in rates:
        _observe_mixed(rec, fg[0], d, rates["before"], rates["after"], out)
    _staircase(rec, bg, lone_step, out)


SPAN = 2
"""Steps on each side of the mixed step in the span that times it."""


def _observe_mixed(rec: ProbeRecord, f: StreamRecord, d: float, before: float, after: float,
                   out: Observed) -> None:
    """The step that computed the foreground's prompt, timed on every background stream.

    An engine writes a step's events one stream after another, the newest (the foreground)
    last; under load the spread is tens of milliseconds. So each background stream's share of
    that step is its last token at or before the foreground's first, and the step is timed by a
    span of ``SPAN`` steps on each side, less those decode steps (timed before and after): one
    late event at the step's start does not shorten it.
    """
    tf = f.first
    assert tf is not None
    spans, starts, ends, kvs = [], [], [], []
    for s in rec.role("bg"):
        if s.first is None or s.first >= tf or (s.ended is not None and s.ended <= tf):
            continue
        tokens = s.tokens
        j = bisect.bisect_right(tokens, tf, key=lambda x: x[0]) - 1
        lo, hi = j - 1 - SPAN, j + SPAN
        if lo < 0 or hi >= len(tokens) or tokens[hi][1] - tokens[lo][1] != 2 * SPAN + 1:
            continue  # not enough single-token steps around it
        spans.append(tokens[hi][0] - tokens[lo][0] - SPAN * before - SPAN * after)
        starts.append(tokens[j - 1][0])
        ends.append(tokens[j][0])
        kvs.append(s.prompt_tokens + tokens[j - 1][1] - 1)
    if not spans:
        return
    step = statistics.median(spans)
    # The foreground's TTFT: the wait until the step it joined began (as the first-written
    # stream saw it: the least delayed), that step, then the time the endpoint took to write
    # the step's events up to the foreground's own (written last).
    wait = max(0.0, min(starts) - f.sent) + max(0.0, tf - min(ends))
    ttft = tf - f.sent
    kv = tuple(sorted(kvs))
    out.largest_step_prefill = max(out.largest_step_prefill, f.prompt_tokens + len(kv))
    out.observations.append(Observation(
        rec.name, "mixed", f"step with a prompt of {f.prompt_tokens} beside {len(kv)} decodes",
        step / d, decode_kv=kv, prompt=f.prompt_tokens))
    out.observations.append(Observation(
        rec.name, "ttft beside", f"ttft of a prompt {f.prompt_tokens} beside {len(kv)} streams",
        ttft / d, decode_kv=kv, prompt=f.prompt_tokens, offset_s=min(wait, ttft) / d))


def _staircase(rec: ProbeRecord, bg: list[StreamRecord], lone_step: float | None,
               out: Observed) -> None:
    """Bound the per-step token budget from when the burst's prompts got their first token.

    An engine that batches prefills under a budget ``B`` computes about ``B - decodes`` prompt
    tokens per step while prompts wait, so the first tokens come in groups, one group per step.
    The first step is skipped (the burst may still be arriving when it is planned); from the
    end of group 1 to the end of group k, ``k - 1`` steps computed the prompts completed in
    groups 2..k, give or take one prompt at each end.
    """
    if rec.limit is not None or lone_step is None:
        return
    firsts = sorted(s.first for s in bg if s.first is not None)
    if len(firsts) < 3:
        return
    prompt = statistics.median(s.prompt_tokens for s in bg)
    # One group per step: a step's first tokens are written together (tens of milliseconds
    # apart under load), steps of a staircase are prefill-long and about equal.
    gaps = [b - a for a, b in zip(firsts, firsts[1:], strict=False)]
    tol = max(0.5 * lone_step, 0.4 * max(gaps))
    times, sizes = [firsts[0]], [1]
    for a, b in zip(firsts, firsts[1:], strict=False):
        if b - a > tol:
            times.append(b)
            sizes.append(1)
        else:
            sizes[-1] += 1
    # Count only steps planned after the whole burst was sent (a step planned while requests
    # still arrive is not limited by the budget).
    last_sent = max(s.sent for s in bg)
    start = next((i for i, t in enumerate(times) if t > last_sent + tol), None)
    if start is None or len(sizes) - start < 3:
        return
    lo, hi = 0.0, math.inf
    done = sum(sizes[:start + 1])
    base = done
    decodes = 0
    for k, size in enumerate(sizes[start + 1:], start=1):
        decodes += done  # every completed prompt decodes one token per later step
        done += size
        new = done - base
        lo = max(lo, ((new - 1) * prompt + decodes) / k)
        hi = min(hi, ((new + 1) * prompt + decodes) / k)
    if lo >= hi:
        out.skipped.append(f"{rec.name}: first-token groups fit no single token budget")
        return
    if out.budget is None:
        out.budget = (lo, hi)
    else:
        a, b = max(out.budget[0], lo), min(out.budget[1], hi)
        if a < b:
            out.budget = (a, b)
        else:
            out.skipped.append(f"{rec.name}: its token-budget interval [{lo:.0f}, {hi:.0f}) "
                               f"misses the others' [{out.budget[0]:.0f}, "
                               f"{out.budget[1]:.0f})")


# --- the two kinds -------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    obs: Observation
    predicted_s: float

    @property
    def error(self) -> float:
        return self.predicted_s / self.obs.measured_s - 1


@dataclass
class KindFit:
    kind: str
    params: dict[str, float]
    method_terms: dict[str, float]
    predictions: list[Prediction]
    notes: list[str] = field(default_factory=list)
    unfitted: list[Prediction] = field(default_factory=list)
    """Predictions of observations the fit left out, for choosing between kinds only."""

    @property
    def rms_log(self) -> float:
        return self.rms_log_on({id(p.obs) for p in self.predictions})

    def rms_log_on(self, observations: set[int]) -> float:
        """RMS of log(predicted / measured) over the given observations (by id), fitted or
        not."""
        errs = [math.log(max(p.predicted_s, 1e-12) / p.obs.measured_s)
                for p in self.predictions + self.unfitted if id(p.obs) in observations]
        return math.sqrt(statistics.fmean(e * e for e in errs)) if errs else math.inf

    @property
    def median_abs(self) -> float:
        return statistics.median(abs(p.error) for p in self.predictions)

    @property
    def worst_abs(self) -> float:
        return max(abs(p.error) for p in self.predictions)

    def fit_cells(self) -> tuple[FitCell, ...]:
        return tuple(FitCell(
            file=p.obs.probe, cell=p.obs.label, measured_ms=round(p.obs.measured_s * 1e3, 3),
            predicted_ms=round(p.predicted_s * 1e3, 3), error_pct=round(100 * p.error, 2),
            method=_method(p.obs))
            for p in self.predictions)


def _cached_tokens(obs: Observation, caching: bool, kind: str) -> int:
    """Prompt tokens a repeated prompt finds cached: whole blocks (vLLM: at most prompt - 1,
    its last token is always computed)."""
    if not (obs.repeat and caching):
        return 0
    return ((obs.prompt - 1) // BLOCK) * BLOCK if kind == "continuous" else \
        (obs.prompt // BLOCK) * BLOCK


def fit_slots(observed: Observed) -> KindFit:
    """Non-negative least squares of the slots-linear model on relative errors."""
    # A slots engine prefills beside its decode loop: the background step around the
    # foreground's first token is a decode step whose count of sequences depends on where that
    # prefill happened to end (the foreground joins at the next step, so the span reads n or
    # n - 1 sequences). It says nothing the decode windows do not, so the slots fit leaves the
    # mixed observations out; for choosing the kind they are predicted as a decode step of
    # n - 1/2 (an engine that batches prefills makes that step far longer).
    obs = [o for o in observed.observations if o.what != "mixed"]
    mixed = [o for o in observed.observations if o.what == "mixed"]
    rows = []
    for o in obs:
        if o.is_ttft:
            c = _cached_tokens(o, observed.caching, "slots")
            rows.append([1.0, o.prompt - c, c, 0.0, 0.0])
        else:
            rows.append([0.0, 0.0, 0.0, 1.0, float(len(o.decode_kv))])
    a = np.array(rows)
    m = np.array([o.measured_s * 1e3 for o in obs])
    x = nnls(a / m[:, None], np.ones(len(obs)))
    params = dict(zip(SLOTS_PARAMS, (_sig(v) for v in x), strict=True))
    if params["decode_base_ms"] <= 0:  # the profile needs a positive step
        params["decode_base_ms"] = 1e-3
    pred = a @ np.array([params[k] for k in SLOTS_PARAMS]) / 1e3
    notes = []
    if not observed.caching:
        notes.append("no prefix-cache hit seen: prefill_ms_per_cached_token unobserved (0)")
    unfitted = [Prediction(o, (params["decode_base_ms"] + params["decode_ms_per_seq"]
                               * (len(o.decode_kv) - 0.5)) / 1e3) for o in mixed]
    return KindFit("slots", params, {}, [Prediction(o, float(p)) for o, p in zip(
        obs, pred, strict=True)], notes, unfitted)


def nnls(a: np.ndarray, b: np.ndarray, iterations: int = 100) -> np.ndarray:
    """min ||a x - b|| subject to x >= 0 (Lawson-Hanson active set; small problems)."""
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    for _ in range(iterations):
        w = a.T @ (b - a @ x)
        if passive.all() or not (w[~passive] > 1e-12).any():
            break
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg] + 1e-300))
            x = x + alpha * (z - x)
            passive &= x > 1e-12
    return x


def continuous_cells(observed: Observed, budget: int) -> tuple[list[Cell], list[Observation]]:
    """One step cell per observation (a prompt longer than the budget left beside the decodes
    is computed in chunks: its last chunk is the step observed)."""
    cells, used = [], []
    for o in observed.observations:
        prefill: tuple[tuple[int, int], ...] = ()
        if o.prompt:
            cached = _cached_tokens(o, observed.caching, "continuous")
            new = o.prompt - cached
            room = max(1, budget - len(o.decode_kv))
            if o.what == "ttft alone" or o.what == "ttft cached":
                if new > room:
                    observed.skipped.append(f"{o.probe}: {o.label}: the prompt takes several "
                                            "steps (longer than the token budget); not fitted")
                    continue
            while new > room:  # earlier chunks ran in earlier steps
                cached += room
                new -= room
            prefill = ((new, cached),)
        batch = StepBatch(decode_kv=o.decode_kv, prefill=prefill)
        cells.append(Cell(o.probe, o.label, batch, o.measured_s, _method(o), o.offset_s))
        used.append(o)
    return cells, used


def _method(o: Observation) -> str:
    """A TTFT measured from the send carries the request's way to the engine and back
    (``endpoint_ttft``); one measured from the background tokens that mark the step's start
    (``ttft beside``: its wait is the offset) carries the same way back at both ends."""
    return "endpoint_ttft" if o.what in ("ttft alone", "ttft cached") else "engine"


PINNED = {"attention_base_ms": 0.0}
"""Roofline terms a calibration cannot separate, pinned. Through an API a step of prefill alone
is only seen inside a TTFT (with the request's way in and out) and ``attention_base_ms`` only
in steps with decodes, so ``weights_ms - x``, ``attention_base_ms + x``,
``request_overhead_ms + x`` fit every cell alike; the fixed cost is given to the weights (the
microbenchmark fits put attention_base_ms at 0.10 ms for the 8B shape, 0.05 ms for 1B)."""


def fit_continuous(observed: Observed, budget: int) -> KindFit:
    cells, used = continuous_cells(observed, budget)
    if not cells:
        raise ValueError("no observation to fit")
    result: FitResult = fit_roofline(cells, fixed=PINNED)
    preds = [Prediction(o, r.predicted_s) for o, r in zip(used, result.residuals, strict=True)]
    notes = [f"{k} pinned at {v:g}: not separable from weights_ms and the request overhead "
             "through an API" for k, v in PINNED.items()]
    if len(cells) < len(RooflineParams.model_fields) + 1:
        notes.append(f"only {len(cells)} cells for {len(RooflineParams.model_fields) + 1} "
                     "parameters: the step model is underdetermined")
    return KindFit("continuous", result.params.model_dump(), dict(result.method_terms), preds,
                   notes)


def _sig(value: float) -> float:
    return 0.0 if abs(value) < 1e-9 else float(f"{value:.4g}")


# --- choosing, refusing ----------------------------------------------------------------------


@dataclass
class Choice:
    best: KindFit
    other: KindFit | None
    observed: Observed
    budget: int
    budget_note: str
    scores: dict[str, float] = field(default_factory=dict)
    """Kind -> RMS log error on the observations both kinds predict."""
    compared: int = 0
    """How many observations that is."""

    @property
    def kind(self) -> str:
        return self.best.kind


def budget_estimate(observed: Observed) -> tuple[int, str]:
    """The per-step token budget to model with, and how it was found."""
    seen = observed.largest_step_prefill
    if observed.budget is not None:
        lo, hi = observed.budget
        if math.isfinite(hi):
            value = round((lo + hi) / 2)
            return max(value, seen), (f"max_num_batched_tokens {value}: the bursts' first "
                                      f"tokens came in groups that fit a budget of "
                                      f"{lo:.0f} to {hi:.0f} tokens per step")
    lower = max(seen, round(observed.budget[0]) if observed.budget else 0, 1)
    return lower, (f"max_num_batched_tokens not observed: at least {lower} (the most new "
                   "tokens seen in one step); the bursts never had to wait for budget")


def choose(observed: Observed) -> Choice:
    if not observed.observations:
        raise ValueError("the probes gave no observation to fit (see the skipped list)")
    budget, note = budget_estimate(observed)
    fits = [fit_slots(observed)]
    try:
        fits.append(fit_continuous(observed, budget))
    except ValueError as exc:
        observed.skipped.append(f"continuous fit: {exc}")
    # Compared on the observations every kind predicts.
    common = set.intersection(*({id(p.obs) for p in f.predictions + f.unfitted}
                                for f in fits))
    fits.sort(key=lambda f: f.rms_log_on(common))
    return Choice(fits[0], fits[1] if len(fits) > 1 else None, observed, budget, note,
                  {f.kind: f.rms_log_on(common) for f in fits}, len(common))


def disagreeing(fit: KindFit, max_error: float) -> dict[str, list[Prediction]]:
    """Probe name -> its cells off by more than ``max_error`` (a fraction)."""
    out: dict[str, list[Prediction]] = {}
    for p in fit.predictions:
        if abs(p.error) > max_error:
            out.setdefault(p.obs.probe, []).append(p)
    return out


def refusal(fit: KindFit, max_error: float) -> str | None:
    bad = disagreeing(fit, max_error)
    if not bad:
        return None
    parts = []
    for probe, preds in bad.items():
        worst = max(preds, key=lambda p: abs(p.error))
        parts.append(f"{probe} ({len(preds)} cell{'s' * (len(preds) > 1)}; worst: "
                     f"{worst.obs.label}, measured {worst.obs.measured_s * 1e3:.2f} ms, "
                     f"predicted {worst.predicted_s * 1e3:.2f} ms, {100 * worst.error:+.1f}%)")
    return (f"refusing the fit: the {fit.kind} model misses {sum(map(len, bad.values()))} "
            f"cells by more than {100 * max_error:g}% (worst {100 * fit.worst_abs:.1f}%); "
            f"the probes that disagree: " + "; ".join(parts))
