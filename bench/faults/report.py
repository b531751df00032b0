"""Fault drills: the Markdown report and its place between markers in docs/reliability.md."""

from __future__ import annotations

import os
from collections.abc import Sequence

from bench.faults.drills import Plan
from bench.faults.model import DrillModel, DrillResult, summary_table




def markdown(results: Sequence[DrillResult], command: str, elapsed: float, model: DrillModel,
             capacity_rps: float, plan: Plan, replicas: int) -> str:
    lines = ["### Latest fault-drill run", "",
             (f"`{command}` - {elapsed:.0f} s on {os.cpu_count()} cores, {replicas} sim "
             "replicas behind nginx (local mode, default `LoadBalancingConfig`)."), "",
             f"- {model.describe()}.",
             (f"- Measured capacity {capacity_rps:.1f} requests/s; steady load "
             f"{plan.rate:g} requests/s (open loop, Poisson, streaming)."), "",
             summary_table(results), ""]
    for r in results:
        lines.append(f"**{r.drill}**")
        lines.append("")
        lines += [f"- {n}" for n in r.notes]
        lines.append("")
    return "\n".join(lines)


BEGIN = "<!-- fault-drills:begin (written by python -m bench faults) -->"
END = "<!-- fault-drills:end -->"
_SKELETON = f"""# Reliability

{BEGIN}
{END}

## Fuzzing

_Placeholder: filled in by the lead._
"""


def splice(existing: str | None, results: str) -> str:
    """`existing` (docs/reliability.md) with the text between the markers replaced by
    `results`; everything else (the prose, the Fuzzing section) is kept. A file without the
    markers gets them appended rather than being overwritten."""
    text = existing if existing is not None else _SKELETON
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{results.strip()}\n{END}{tail}"
