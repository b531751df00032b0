"""The shipped GPU profiles, rebuilt from their measurement files: ``python -m bench profile fit``.

``h200-llama8b`` and ``h200-llama1b`` are written by this module, never by hand: the fitted
parameters and the residual of every cell come from bench/fit.py run on the files in
server/profiles/measurements/, and the scheduler block from vLLM 0.33.0's defaults plus the
KV-cache arithmetic below. ``--check`` says whether the shipped files are what this module
writes, to the tolerance of a re-fit on another machine (tests/bench/test_profiles.py checks
the same).
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.fit import FitResult, fit_roofline, read_cells, residuals
from server.engines.profile import PROFILE_DIR, RooflineCost, parse_profile, profile_path

MEASUREMENTS = PROFILE_DIR / "measurements"
FILES = ("h200-decode-prefill-2026-12-04.json", "h200-step-vs-tokens-2026-12-04.json")
GIB = 1 << 30

# vLLM 0.33.0's defaults for `vllm serve` on an H200 (read in the released wheel, whose paths
# are the repository's: vllm-project/vllm@v0.33.0:<path>:<line>).
VLLM_DEFAULTS = {
    "max_num_seqs": 1024,
    "max_num_batched_tokens": 8192,
    "block_size": 16,
    "enable_prefix_caching": True,
    "enable_chunked_prefill": True,
    "long_prefill_token_threshold": 0,
}
VLLM_SOURCES = (
    "vLLM 0.33.0 defaults for `vllm serve` on a GPU of 70-160 GiB that is not an A100 "
    "(an H200): max_num_seqs 1024 and max_num_batched_tokens 8192 "
    "(vllm/engine/arg_utils.py:2983-2996, get_batch_defaults, OPENAI_API_SERVER); block_size "
    "16 (vllm/config/cache.py:185, kept by FlashAttention for a bf16 KV cache, "
    "vllm/v1/attention/backends/flash_attn.py:372-379); enable_prefix_caching true "
    "(vllm/config/cache.py:257); enable_chunked_prefill true (vllm/config/scheduler.py:134); "
    "long_prefill_token_threshold 0 (vllm/config/scheduler.py:79). ")
GPU_MEMORY_UTILIZATION = 0.92
"""vLLM 0.33.0's default --gpu-memory-utilization (vllm/config/cache.py:215)."""
GPU_MEMORY_GIB = 140.0
"""An H200's 141 GB as the driver reports it, rounded (assumed, not read from the files)."""
RESERVE_GIB = 3.0
"""Activations of a full-budget step and CUDA graphs (assumed)."""


@dataclass(frozen=True)
class Shape:
    layers: int
    kv_heads: int
    head_dim: int
    describe: str

    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * 2  # K and V, bf16


@dataclass(frozen=True)
class Spec:
    name: str
    key: str
    """The model's key in the measurement files."""
    shape: Shape
    summary: str


SPECS = (
    Spec("h200-llama8b", "llama-8b-shape",
         Shape(32, 8, 128, "Llama-3-8B shape (hidden 4096, 32 layers, 32 heads, 8 KV heads, "
                           "MLP 14336, vocab 128256), random weights, bf16"),
         "An 8B Llama-shaped model on one NVIDIA H200, served by a vLLM-style continuous-"
         "batching engine: decode steps of ~8 ms at batch 1 that grow with the KV tokens read, "
         "not with a slot count; prefill ~31 us per token."),
    Spec("h200-llama1b", "llama-1b-shape",
         Shape(16, 8, 64, "1B Llama shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, "
                          "MLP 8192, vocab 128256), random weights, bf16"),
         "A 1B Llama-shaped model on one NVIDIA H200, served by a vLLM-style continuous-"
         "batching engine: decode steps of ~2.5 ms at batch 1, 6 ms at batch 256."),
)

HEADER = ("# Written by `python -m bench profile fit` from the measurement files it names; do not "
          "edit by hand\n# (tests/bench/test_profiles.py re-fits them). Units are in the key "
          "names.\n")
FIT_METHOD = (
    "Least squares on log(predicted / measured) over every cell of the data files "
    "(Levenberg-Marquardt, bench/fit.py; parameters stored with 4 significant digits and the "
    "residuals computed from the stored values). Decode cells are CUDA-graph replays of a step "
    "(the engine's own cost). Two terms belong to the measurement method, not the engine, and "
    "step_seconds does not use them: eager_launch_floor_ms, the CPU launch time below which an "
    "eager prefill cannot go (a cell it alone sets is listed but not counted), and "
    "graph_capture_attention_factor, how much slower the attention kernel chosen under graph "
    "capture is than the eager path's FlashAttention in the step-vs-tokens cells.")


def cells(spec: Spec) -> list:
    return [c for f in FILES for c in read_cells(MEASUREMENTS / f, spec.key,
                                                  name=f"measurements/{f}")]


def fitted(spec: Spec) -> FitResult:
    return fit_roofline(cells(spec))


def params_b(spec: Spec) -> float:
    data = json.loads((MEASUREMENTS / FILES[0]).read_text())
    return float(data["models"][spec.key]["params_b"])


def num_gpu_blocks(spec: Spec) -> tuple[int, str]:
    weights = params_b(spec) * 1e9 * 2
    free = GPU_MEMORY_UTILIZATION * GPU_MEMORY_GIB * GIB - weights - RESERVE_GIB * GIB
    per_block = spec.shape.kv_bytes_per_token() * VLLM_DEFAULTS["block_size"]
    blocks = int(free // per_block)
    note = (f"num_gpu_blocks is derived, not measured: ({GPU_MEMORY_UTILIZATION} x "
            f"{GPU_MEMORY_GIB:g} GiB - {weights / GIB:.2f} GiB of weights - {RESERVE_GIB:g} GiB "
            f"for activations and CUDA graphs (assumed)) / ({spec.shape.kv_bytes_per_token()} "
            f"bytes of KV per token x {VLLM_DEFAULTS['block_size']}) = {blocks} blocks "
            f"({blocks * VLLM_DEFAULTS['block_size']} tokens); vLLM logs the real figure at "
            "startup as 'GPU KV cache size'.")
    return blocks, note


def build(spec: Spec, result: FitResult | None = None) -> dict[str, Any]:
    result = result or fitted(spec)
    blocks, blocks_note = num_gpu_blocks(spec)
    fit = result.section(FIT_METHOD).model_dump(mode="json")
    fit["cells"] = [{k: v for k, v in c.items() if v is not None
                     and not (k == "method" and v == "engine")} for c in fit["cells"]]
    return {
        "name": spec.name,
        "summary": spec.summary,
        "provenance": {
            "source": "microbenchmark",
            "engine": {"name": "transformers",
                       "version": "5.24.0 with torch 2.11.0+cu130, bf16, SDPA attention; "
                                  "decode steps replayed as CUDA graphs"},
            "model": spec.shape.describe,
            "hardware": "1x NVIDIA H200 141 GB (driver 580.159.04, CUDA 13.0, Ubuntu 24.04)",
            "date": datetime.date(2026, 12, 4),
            "method": (
                "Decode steps replayed as CUDA graphs (one new token for every sequence of a "
                "batch whose static KV cache already holds `kv` tokens each; median of 10 "
                "replays) over batch x KV length; batch-1 prefill run eagerly (median of 3); "
                "graph-replayed forwards of T new tokens in one sequence (median of 10). "
                "Random weights: the text is noise, the compute is real."),
            "data": [{"file": f"measurements/{f}", "what": what, "model": spec.key}
                     for f, what in zip(FILES, (
                         "decode step over batch x KV tokens (CUDA graphs) and batch-1 eager "
                         "prefill", "forward time vs new tokens in one step (CUDA graphs)"),
                         strict=True)],
            "notes": (
                "The GPU's cost of a step, measured without a serving engine: vLLM runs the "
                "same matrix multiplies, but its attention kernels differ (split-KV decoding "
                "makes batch-1 attention at long context faster than measured here). The "
                "scheduler block is vLLM's, not measured."),
        },
        "scheduler": {"kind": "continuous", **VLLM_DEFAULTS, "num_gpu_blocks": blocks,
                      "notes": VLLM_SOURCES + blocks_note},
        "cost": {"form": "roofline", "params": result.params.model_dump()},
        "fit": fit,
    }


def render(spec: Spec, result: FitResult | None = None) -> str:
    data = build(spec, result)
    cells = data["fit"].pop("cells")  # last key of the file: one line per cell
    text = HEADER + yaml.safe_dump(data, sort_keys=False, width=100, allow_unicode=True)
    text += "  cells:\n" + "".join(
        "  - " + yaml.safe_dump(c, default_flow_style=True, width=1 << 20, sort_keys=False)
        for c in cells)
    parse_profile(yaml.safe_load(text), spec.name)  # what we write must load
    return text


def write(specs: tuple[Spec, ...] = SPECS) -> list[Path]:
    """Rewrite the profiles whose text changed; return their paths."""
    changed = []
    for spec in specs:
        path, text = profile_path(spec.name), render(spec)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    return changed


TOLERANCE = 2e-3
"""How far a re-fit may land from the shipped file and still count as the same fit: the
optimum is flat in some directions (a fixed attention cost trades against a per-sequence one),
so a different machine's arithmetic may move a parameter's fourth digit. What must agree is
every cell's prediction and every method term, to this relative tolerance."""


def differences(spec: Spec) -> list[str]:
    """How the shipped profile differs from a fresh fit (empty: it is current)."""
    path = profile_path(spec.name)
    if not path.is_file():
        return [f"{path} is missing"]
    shipped = yaml.safe_load(path.read_text())
    fresh = yaml.safe_load(render(spec))
    problems = [f"{key} differs" for key in fresh
                if key not in ("cost", "fit") and shipped.get(key) != fresh[key]]
    old_fit, new_fit = shipped.get("fit") or {}, fresh["fit"]
    old_cells = {(c["file"], c["cell"]): c for c in old_fit.get("cells", [])}
    for c in new_fit["cells"]:
        old = old_cells.pop((c["file"], c["cell"]), None)
        if old is None:
            problems.append(f"cell {c['cell']} of {c['file']} is missing")
        elif not math.isclose(old["predicted_ms"], c["predicted_ms"], rel_tol=TOLERANCE):
            problems.append(f"{c['cell']}: {old['predicted_ms']} ms shipped, a re-fit "
                            f"predicts {c['predicted_ms']} ms")
    problems += [f"cell {cell} of {file} is not measured" for file, cell in old_cells]
    # and the shipped cells are what the shipped parameters predict (nobody edited one alone)
    profile = parse_profile(shipped, str(path))
    if isinstance(profile.cost, RooflineCost) and profile.fit is not None:
        own = residuals(profile.cost.params, profile.fit.method_terms, cells(spec))
        for r, c in zip(own, profile.fit.cells, strict=False):
            if abs(r.predicted_s * 1e3 - c.predicted_ms) > 1.5e-3:
                problems.append(f"{c.cell}: the file says {c.predicted_ms} ms, its own "
                                f"parameters predict {r.predicted_s * 1e3:.3f} ms")
    for name, value in new_fit["method_terms"].items():
        old = old_fit.get("method_terms", {}).get(name)
        if old is None or not math.isclose(old, value, rel_tol=TOLERANCE):
            problems.append(f"method term {name}: {old} shipped, {value} re-fitted")
    return problems


def stale(specs: tuple[Spec, ...] = SPECS) -> dict[str, list[str]]:
    """The shipped profiles that differ from a fresh fit, with how."""
    return {s.name: d for s in specs if (d := differences(s))}
