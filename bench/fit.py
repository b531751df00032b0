"""Fit a profile's step model to measured cells: the machinery behind the shipped GPU profiles
(``python -m bench profile fit``) and, with other cells, behind an endpoint calibration.

A :class:`Cell` is one measured time: the :class:`~server.engines.steps.StepBatch` the
measurement ran, the seconds it took, and the *method* that timed it. The step model is the
``roofline`` form of server/engines/profile.py; :func:`fit_roofline` finds its parameters by
least squares on the log of predicted/measured (a relative error, so a 7 ms step counts as much
as a 340 ms one), Levenberg-Marquardt from a few deterministic starts.

Methods. A microbenchmark is not an engine: two of the shared H200 files' ways of timing differ
from a serving engine's in ways the data show, so each gets one *method term*, fitted with the
rest and reported, but not part of the engine's model (``Profile.step_seconds`` ignores it):

* ``engine``: a CUDA-graph replay of a decode step: what a serving engine runs.
* ``eager``: a forward run eagerly from Python. Its wall time cannot go below the time the CPU
  needs to launch its kernels (``eager_launch_floor_ms``): a 1,024-token prefill of the 1B shape
  measured 10.3 ms eagerly and 6.6 ms replayed from a graph. Above the floor it is the engine's
  prefill, whose attention is FlashAttention's (is_causal, no mask), as in a serving engine.
* ``graph_prefill``: a graph-replayed forward of T new tokens. Under graph capture the model's
  attention runs a slower kernel than the eager path's: at 8,192 tokens the 8B shape takes
  341 ms replayed and 257 ms eagerly, the 1B shape 77 and 49 ms, while at 1,024 tokens (little
  attention) both agree. ``graph_capture_attention_factor`` scales the prefill attention of
  these cells; their dense part (the roofline of the matrix multiplies) is the engine's.
* ``endpoint_ttft``: a time to first token measured through an API (``bench calibrate``): the
  step that computed the prompt plus what the request costs outside the engine (HTTP,
  tokenizing, the first chunk's way back), ``request_overhead_ms``.

A cell may also carry ``offset_s``, a measured time added to its prediction (a calibration
knows how long a request waited for the step that computed its prompt).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.engines.profile import Fit, FitCell, RooflineParams
from server.engines.steps import StepBatch

METHODS = ("engine", "eager", "graph_prefill", "endpoint_ttft")
METHOD_TERMS = {"eager": "eager_launch_floor_ms",
                "graph_prefill": "graph_capture_attention_factor",
                "endpoint_ttft": "request_overhead_ms"}
ROOFLINE = tuple(RooflineParams.model_fields)
SIGNIFICANT = 4
"""Significant digits a fitted parameter is stored with; residuals use the stored values."""


@dataclass(frozen=True)
class Cell:
    file: str
    label: str
    batch: StepBatch
    measured_s: float
    method: str = "engine"
    offset_s: float = 0.0
    """Measured time added to the prediction (e.g. a wait before the step)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"cell {self.label}: method {self.method!r} is not one of "
                             f"{', '.join(METHODS)}")
        if not self.measured_s > 0:
            raise ValueError(f"cell {self.label}: measured time must be positive")


@dataclass(frozen=True)
class Residual:
    cell: Cell
    predicted_s: float
    bound: str | None = None
    """The method term that alone sets this cell's prediction (it is then not counted)."""

    @property
    def error(self) -> float:
        return self.predicted_s / self.cell.measured_s - 1


@dataclass(frozen=True)
class FitResult:
    params: RooflineParams
    method_terms: dict[str, float]
    residuals: tuple[Residual, ...]

    @property
    def counted(self) -> list[Residual]:
        return [r for r in self.residuals if r.bound is None]

    @property
    def median_abs_error(self) -> float:
        return statistics.median(abs(r.error) for r in self.counted)

    @property
    def worst_abs_error(self) -> float:
        return max(abs(r.error) for r in self.counted)

    def section(self, method: str) -> Fit:
        """The profile's ``fit`` section."""
        cells = tuple(FitCell(
            file=r.cell.file, cell=r.cell.label, measured_ms=round(r.cell.measured_s * 1e3, 3),
            predicted_ms=round(r.predicted_s * 1e3, 3), error_pct=round(100 * r.error, 2),
            method=r.cell.method, note=f"set by {r.bound} alone, not counted" if r.bound else None)
            for r in self.residuals)
        return Fit(method=method, method_terms=dict(self.method_terms), cells=cells,
                   cells_counted=len(self.counted),
                   median_abs_error_pct=round(100 * self.median_abs_error, 2),
                   worst_abs_error_pct=round(100 * self.worst_abs_error, 2))


# --- prediction ---------------------------------------------------------------------------------


def predict(params: RooflineParams, terms: dict[str, float], cell: Cell) -> Residual:
    """The model's time for ``cell`` under its method."""
    dense, decode, prefill, per_seq = params.parts(cell.batch)
    if cell.method == "graph_prefill":
        prefill *= terms["graph_capture_attention_factor"]
    predicted = math.fsum((dense, decode, prefill, per_seq, cell.offset_s))
    if cell.method == "endpoint_ttft":
        predicted += terms["request_overhead_ms"] / 1e3
    if cell.method == "eager":
        floor = terms["eager_launch_floor_ms"] / 1e3
        if floor >= predicted:
            return Residual(cell, floor, bound="eager_launch_floor_ms")
    return Residual(cell, predicted)


def residuals(params: RooflineParams, terms: dict[str, float],
              cells: Sequence[Cell]) -> tuple[Residual, ...]:
    return tuple(predict(params, terms, c) for c in cells)


# --- fitting ------------------------------------------------------------------------------------

# Parameters live in a transformed space so that any real vector is valid: log for positive
# quantities, log(x - 1) for those at least 1.
_AT_LEAST_ONE = {"roofline_sharpness", "attention_parallel_seqs"}


def _to_x(name: str, value: float) -> float:
    return math.log(value - 1) if name in _AT_LEAST_ONE else math.log(value)


def _from_x(name: str, x: float) -> float:
    x = min(max(x, -60.0), 60.0)
    return 1 + math.exp(x) if name in _AT_LEAST_ONE else math.exp(x)


def _start(cells: Sequence[Cell], scale: float) -> dict[str, float]:
    """A start read off the data: the floor from the fastest cell, compute per token from the
    cell with the most new tokens; the terms no single cell shows start in proportion to those
    (ratios typical of a GPU), times ``scale``."""
    fastest = min(c.measured_s for c in cells) * 1e3
    most = max(cells, key=lambda c: c.batch.tokens)
    per_token_us = most.measured_s * 1e6 / max(1, most.batch.tokens)
    return {
        "weights_ms": fastest, "single_token_discount_ms": 0.05 * fastest,
        "compute_us_per_token": 0.8 * per_token_us, "roofline_sharpness": 1.5,
        "attention_base_ms": 0.01 * fastest * scale,
        "kv_read_ns_per_token": 1.7 * per_token_us * scale,
        "attention_parallel_seqs": 16.0, "per_sequence_us": 0.2 * per_token_us * scale,
        "prefill_attention_ns_per_pair": 0.05 * per_token_us * scale,
    }


def fit_roofline(cells: Sequence[Cell], fixed: dict[str, float] | None = None,
                 starts: Sequence[float] = (1.0, 0.3, 3.0)) -> FitResult:
    """Least-squares fit of the roofline parameters (and the method terms the cells need).

    ``fixed`` pins parameters (a calibration whose probes cannot see a term pins it).
    Deterministic: the same cells give the same parameters. The result's parameters are
    rounded to ``SIGNIFICANT`` digits, and its residuals computed from the rounded values.
    """
    if not cells:
        raise ValueError("no cells to fit")
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(ROOFLINE) - set(METHOD_TERMS.values())
    if unknown:
        raise ValueError(f"unknown fixed parameters: {', '.join(sorted(unknown))}")
    terms_needed = sorted({METHOD_TERMS[c.method] for c in cells if c.method in METHOD_TERMS})
    names = [n for n in (*ROOFLINE, *terms_needed) if n not in fixed]
    measured = np.array([c.measured_s for c in cells])

    def unpack(x: np.ndarray) -> tuple[RooflineParams, dict[str, float]]:
        values = dict(fixed)
        values.update({n: _from_x(n, float(v)) for n, v in zip(names, x, strict=True)})
        values["single_token_discount_ms"] = min(values["single_token_discount_ms"],
                                                 0.9 * values["weights_ms"])
        params = RooflineParams.model_construct(**{n: values[n] for n in ROOFLINE})
        return params, {t: values[t] for t in terms_needed}

    def f(x: np.ndarray) -> np.ndarray:
        params, terms = unpack(x)
        try:
            predicted = np.array([r.predicted_s for r in residuals(params, terms, cells)])
        except OverflowError:  # a far step (a huge roofline_sharpness): reject it
            return np.full(len(cells), np.inf)
        return np.log(predicted / measured)

    best: tuple[float, np.ndarray] | None = None
    for scale in starts:
        start = _start(cells, scale)
        start.update(graph_capture_attention_factor=2.0, eager_launch_floor_ms=min(
            (c.measured_s * 1e3 for c in cells if c.method == "eager"), default=1.0),
            request_overhead_ms=0.5)
        x = levenberg_marquardt(f, np.array([_to_x(n, start[n]) for n in names]))
        cost = float(np.sum(f(x) ** 2))
        if best is None or cost < best[0] - 1e-12:
            best = (cost, x)
    assert best is not None
    params, terms = unpack(best[1])
    rounded = {n: _round(getattr(params, n)) for n in ROOFLINE}
    rounded["single_token_discount_ms"] = min(rounded["single_token_discount_ms"],
                                              _round(0.9 * rounded["weights_ms"]))
    params = RooflineParams(**rounded)
    terms = {t: _round(v) for t, v in terms.items()}
    return FitResult(params, terms, residuals(params, terms, cells))


def _round(value: float) -> float:
    if value == 0:
        return 0.0
    return float(f"{value:.{SIGNIFICANT}g}")


def levenberg_marquardt(f: Callable[[np.ndarray], np.ndarray], x0: np.ndarray,
                        max_iter: int = 400, tol: float = 1e-12) -> np.ndarray:
    """Minimise ``sum(f(x)**2)``: Levenberg-Marquardt with a forward-difference Jacobian and
    Marquardt's diagonal scaling. Small and dependency-free (numpy only)."""
    x = np.asarray(x0, dtype=float)
    r = f(x)
    cost = float(r @ r)
    lam = 1e-3
    eps = 1e-7
    for _ in range(max_iter):
        jac = np.empty((r.size, x.size))
        for j in range(x.size):
            step = np.zeros_like(x)
            step[j] = eps
            jac[:, j] = (f(x + step) - r) / eps
        a = jac.T @ jac
        g = jac.T @ r
        improved = False
        while lam < 1e10:
            try:
                dx = np.linalg.solve(a + lam * (np.diag(np.diag(a)) + 1e-12 * np.eye(x.size)),
                                     -g)
            except np.linalg.LinAlgError:
                lam *= 10
                continue
            r_new = f(x + dx)
            cost_new = float(r_new @ r_new)
            if math.isfinite(cost_new) and cost_new < cost:
                done = cost - cost_new < tol * max(cost, 1e-30)
                x, r, cost = x + dx, r_new, cost_new
                lam = max(lam / 3, 1e-12)
                improved = True
                break
            lam *= 4
        if not improved or done:
            break
    return x


# --- the shared measurement formats -------------------------------------------------------------


def read_cells(path: Path, model: str, name: str | None = None) -> list[Cell]:
    """The cells of ``model`` in one measurement file. Two formats:

    * decode-prefill (``models.<m>.decode_ms: [{batch, kv, ms}]``, ``models.<m>.prefill_ms:
      {tokens: ms}``): graph-replayed decode steps (method ``engine``) and eager batch-1
      prefills (``eager``);
    * step-vs-tokens (``models.<m>: [{tokens, ms}]``): graph-replayed forwards of T new tokens
      in one sequence (``graph_prefill``).
    """
    name = name or path.name
    data = json.loads(path.read_text())
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict) or model not in models:
        have = ", ".join(sorted(models)) if isinstance(models, dict) else "none"
        raise ValueError(f"{name}: no model {model!r} (models: {have})")
    entry = models[model]
    cells: list[Cell] = []
    if isinstance(entry, dict) and "decode_ms" in entry:
        for row in entry["decode_ms"]:
            b, kv = int(row["batch"]), int(row["kv"])
            cells.append(Cell(name, f"decode batch {b} kv {kv}",
                              StepBatch(decode_kv=(kv,) * b), row["ms"] / 1e3))
        for tokens, ms in entry.get("prefill_ms", {}).items():
            t = int(tokens)
            cells.append(Cell(name, f"prefill {t} tokens", StepBatch(prefill=((t, 0),)),
                              ms / 1e3, "eager"))
    elif isinstance(entry, list):
        for row in entry:
            t = int(row["tokens"])
            cells.append(Cell(name, f"step {t} tokens", StepBatch(prefill=((t, 0),)),
                              row["ms"] / 1e3, "graph_prefill"))
    else:
        raise ValueError(f"{name}: model {model!r} is in neither the decode-prefill nor the "
                         "step-vs-tokens format")
    return cells
