"""What ``python -m bench plan`` prints: the modelled p99 table, the choice, the autoscaling
derivation with its figures, and the ``Pulumi.<stack>.yaml`` snippet (see bench/plan.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import yaml

from bench import plan_workload
from bench.command import shown
from bench.plan import SESSION_METHODS, Cell, Plan, Search, t975
from components.policies.scaling import HPA_TOLERANCE

NAMESPACE = "llm-serving"


def _ms(x: float) -> str:
    return f"{x * 1e3:.0f}" if x < 10 else f"{x:.0f} s"


def _cell(c: Cell, slo: float) -> str:
    mark = "*" if c.meets(slo) else " "
    return f"{_ms(c.p99.value)} ({_ms(max(0.0, c.p99.lo))}-{_ms(c.p99.hi)}){mark}"


def table(s: Search, methods: Sequence[str], slo: float) -> list[str]:
    """One row per replica count: each method's p99 (interval), * where it meets ``slo``."""
    if not s.rows:
        return []
    cols = [[_cell(row[m], slo) if m in row else "-" for m in methods] for row in s.rows.values()]
    width = [max(len(m), *(len(c[i]) for c in cols)) for i, m in enumerate(methods)]
    head = "replicas  " + "  ".join(m.ljust(w) for m, w in zip(methods, width))
    lines = [head]
    for n, col in zip(s.rows, cols):
        lines.append(f"{n:>8}  " + "  ".join(c.ljust(w) for c, w in zip(col, width)))
    return lines


def snippet_values(plan: Plan) -> dict[str, Any]:
    """The stack keys the plan sets (without the ``llm-serving:`` prefix)."""
    t = plan.targets
    if t is None or plan.method is None:
        return {}
    out: dict[str, Any] = {}
    if not plan.autoscaling:
        out["replicas"] = t.max_replicas
    out["loadBalancing"] = {"method": plan.method}
    out["model"] = {"maxConcurrency": plan.setup.slots()}
    if plan.autoscaling:
        out["autoscaling"] = {"enabled": True, "minReplicas": t.min_replicas,
                              "maxReplicas": t.max_replicas,
                              "targetRunningPerReplica": t.running,
                              "targetWaitingPerReplica": t.waiting}
    else:
        out["autoscaling"] = {"enabled": False}
    return out


def snippet(plan: Plan, stack: str, command: str) -> str:
    values = snippet_values(plan)
    body = yaml.safe_dump({"config": {f"{NAMESPACE}:{k}": v for k, v in values.items()}},
                          sort_keys=False, default_flow_style=False)
    head = [f"# {command}",
            "# Modelled by the discrete-event model (docs/capacity-planning.md), not measured.",
            f"# Merge into Pulumi.{stack}.yaml: each key below goes into the section of that name"
            " (model.id and the rest stay).",
            "# With a `models` list, the model keys go into each entry the plan is for."]
    if not plan.autoscaling:
        head.append("# Fixed replicas: autoscaling off, so `replicas` is what runs.")
    return "\n".join(head) + "\n" + body


def render(plan: Plan, workload_label: str, argv: Sequence[str], stack: str = "prod") -> str:
    setup, slo = plan.setup, plan.slo
    command = shown("python -m bench plan", argv)
    k = len(setup.seeds)
    gpu = setup.gpu
    lines = [
        f"plan (every figure modelled, none measured): {command}",
        f"  regime: {setup.model().profile.describe()}; "
        f"{'max_num_seqs' if gpu else 'slots'} {setup.slots()} per replica",
        f"  workload {workload_label}: {plan_workload.describe(setup.workload)}",
        f"  objective: TTFT p99 <= {_ms(slo)} ms at {plan.rate:g} requests/s"
        + (f" (peak; base {plan.base_rate:g} requests/s, peak-to-base {plan.peak_to_base:g})"
           if plan.autoscaling else ""),
        f"  model: the discrete-event model (bench/des.py: "
        + ("vLLM 0.33.0's scheduler stepped per replica" if gpu else "slots replicas")
        + f"), {k} seeds x {setup.seconds(plan.rate):.3g} simulated s per cell, the first "
          f"{setup.warmup:g} s not counted; p99 = mean of the {k} seeds' p99s, 95 % interval = "
          f"mean +- t(0.975, {k - 1}) = {t975(k - 1):.3f} x their sd / sqrt({k})",
        f"  capacity: {plan.capacity:.1f} requests/s per saturated replica, so at least "
        f"{plan.peak.first} replica{'s' * (plan.peak.first > 1)} for {plan.rate:g} requests/s",
        "",
        f"TTFT p99 at {plan.rate:g} requests/s, ms, modelled (95 % interval); "
        f"* = meets {_ms(slo)} ms by the upper end",
        *table(plan.peak, plan.methods, slo),
        f"  search: {plan.peak.stop}",
        "  fewest replicas meeting the objective: "
        + ", ".join(f"{m} {n if n is not None else 'none'}" for m, n in plan.peak.needed.items()),
    ]
    if setup.workload.sessions:
        lines.append(f"  {', '.join(SESSION_METHODS)}: not modelled (the discrete-event model "
                     "has no session-affine dispatcher); the model's methods see the prefix "
                     "cache of each replica")
    chosen = plan.chosen
    if chosen is None or plan.targets is None:
        lines += ["", f"plan: no replica count up to the search's end meets {_ms(slo)} ms"]
        return "\n".join(lines)
    t = plan.targets
    lines += [
        f"  chosen: {plan.method} on {plan.replicas} replica{'s' * (plan.replicas != 1)}: "
        f"p99 {_ms(chosen.p99.value)} ms ({_ms(chosen.p99.lo)}-{_ms(chosen.p99.hi)}), "
        f"p50 {_ms(chosen.p50)} ms, {chosen.running:.1f} running and {chosen.waiting:.2f} "
        f"waiting per replica (modelled)"]
    if gpu and t.max_replicas > (plan.replicas or 0):
        lines.append(f"  {t.max_replicas} replicas, not {plan.replicas}: a GPU stack keeps at "
                     f"least 2, since a rollout replaces pods one at a time")
    lines.append("")
    if plan.autoscaling:
        base = plan.base
        lines.append(f"autoscaling (modelled), base {plan.base_rate:g} requests/s:")
        if base is not None and base.rows:
            lines += ["  " + row for row in table(base, [plan.method], slo)]  # type: ignore[list-item]
        needed_base = base.needed.get(plan.method) if base else None  # type: ignore[arg-type]
        lines += [
            f"  minReplicas {t.min_replicas}: the fewest meeting the objective at the base rate "
            f"({needed_base if needed_base is not None else t.max_replicas})"
            + (f", at least {plan.floor} on GPUs" if plan.floor > 1 else ""),
            f"  maxReplicas {t.max_replicas}: the fewest meeting it at the peak rate",
            f"  targetRunningPerReplica {t.running}: sequences running per replica at the peak on "
            f"{plan.replicas} replicas, {t.running_modelled:.1f} (time average, modelled), rounded "
            f"up; the HPA asks ceil(total running / {t.running}) replicas: "
            f"{math.ceil(t.running_modelled * plan.replicas / t.running - 1e-9)} at the peak, "
            f"fewer as the rate falls",
            f"  targetWaitingPerReplica {t.waiting}: the queue the objective tolerates: "
            f"({_ms(slo)} - {_ms(chosen.p99.hi)} ms, the p99's upper end) x "
            f"{plan.capacity:.1f} requests/s a saturated replica admits = "
            f"{t.waiting_tolerated:.1f} waiting per replica; / {1 + HPA_TOLERANCE:g} (the HPA "
            f"acts beyond its tolerance), at least 1",
            ""]
    lines += [f"Pulumi.{stack}.yaml snippet:", snippet(plan, stack, command).rstrip(),
              "", f"modelled in {plan.seconds:.0f} s ({plan.simulated} simulated traces)"]
    return "\n".join(lines)
