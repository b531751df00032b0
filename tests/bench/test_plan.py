"""The capacity planner (bench/plan.py): lengths without text, the interval over seeds, the
replica choice, the autoscaling targets and the stack snippet."""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench import des, plan, plan_report, plan_workload, trace
from components.config.parse import parse_stack_config
from components.policies.scaling import HPA_TOLERANCE, replicas_for_metric

REPO = Path(__file__).resolve().parents[2]


# --- lengths without text -------------------------------------------------------------------


@pytest.mark.parametrize("workload", [trace.Workload(), trace.Workload(sessions=True),
                                      trace.Workload(prompt=trace.LogNormal(600, 0.3, 50, 3000),
                                                     output=trace.LogNormal(5, 0.1, 1, 9))])
@pytest.mark.parametrize("seed", [1, 7])
def test_jobs_draw_exactly_what_the_trace_draws(workload: trace.Workload, seed: int) -> None:
    tr = trace.generate(15, 40, seed, workload, max_model_len=2048)
    jobs = plan_workload.jobs(15, 40, seed, workload, max_model_len=2048)
    assert len(jobs) == len(tr.requests) > 100
    assert [(j.arrival, j.prompt_tokens, j.max_tokens) for j in jobs] == \
        [(r.arrival, r.prompt_tokens, r.max_tokens) for r in tr.requests]


def test_session_turns_share_their_prefix_blocks_and_nothing_else() -> None:
    jobs = plan_workload.jobs(20, 60, 3, trace.Workload(sessions=True), block_size=16)
    by_session: dict[int, list[des.Job]] = {}
    for j in jobs:
        assert j.prefix_keys is not None and len(j.prefix_keys) == j.prompt_tokens // 16
        by_session.setdefault(j.prefix_keys[0], []).append(j)
    multi = [turns for turns in by_session.values() if len(turns) > 1]
    assert len(multi) > 5
    for turns in multi:
        for a, b in zip(turns, turns[1:]):
            assert b.prompt_tokens > a.prompt_tokens
            assert list(b.prefix_keys[:len(a.prefix_keys)]) == list(a.prefix_keys)
    firsts = [turns[0].prefix_keys for turns in by_session.values()]
    assert len({k for keys in firsts for k in keys}) == sum(len(k) for k in firsts)
    assert plan_workload.jobs(20, 10, 3, trace.Workload())[0].prefix_keys is None


def test_workload_yaml_and_flags(tmp_path: Path) -> None:
    f = tmp_path / "chat.yaml"
    f.write_text("sessions: true\nprompt: {median: 300}\noutput: {median: 120, high: 1024}\n"
                 "turns_mean: 3\n")
    label, w = plan_workload.named(str(f))
    assert label == "chat" and w.sessions and w.turns_mean == 3
    assert w.output == trace.LogNormal(120, trace.Workload().output.sigma, 1, 1024)
    assert w.prompt.median == 300 and w.context == trace.Workload().context
    w2 = plan_workload.with_lengths(w, plan_workload.parse_length_flag("sigma=0.2,low=3", "--x"))
    assert w2.prompt == trace.LogNormal(300, 0.2, 3, 1024)


@pytest.mark.parametrize("text, message", [
    ("prompt: {median: 0}", "chat.yaml.prompt.median: Input should be greater than 0"),
    ("output: {low: 50, high: 10}", "chat.yaml.output: low (50) must not exceed high (10)"),
    ("output: {mean: 5}", "chat.yaml.output.mean: unknown key; allowed: median, sigma, low, high"),
    ("turns: 3", "chat.yaml.turns: unknown key; allowed: sessions, prompt"),
])
def test_a_bad_workload_file_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "chat.yaml"
    f.write_text(text)
    with pytest.raises(plan_workload.WorkloadError) as err:
        plan_workload.named(str(f))
    assert message in str(err.value)
    with pytest.raises(plan_workload.WorkloadError, match="--prompt-tokens: 'mediam=3'"):
        plan_workload.parse_length_flag("mediam=3", "--prompt-tokens")


# --- the interval ---------------------------------------------------------------------------


def test_the_interval_over_seeds_on_a_known_case() -> None:
    iv = plan.seeds_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) x sd / sqrt(k)
    assert (iv.value, iv.lo, iv.hi) == pytest.approx((3.0, 3.0 - half, 3.0 + half))
    assert plan.t975(1) == 12.706 and plan.t975(30) == 2.042
    assert plan.t975(60) == pytest.approx(2.000, abs=1e-3)
    assert plan.t975(120) == pytest.approx(1.980, abs=1e-3)
    with pytest.raises(ValueError):
        plan.seeds_interval([1.0])


def test_the_interval_covers_the_true_mean_95_percent_of_the_time() -> None:
    rng = random.Random(5)
    for k in (3, 5, 8):
        hits = sum(plan.seeds_interval([rng.gauss(10, 2) for _ in range(k)]).contains(10)
                   for _ in range(4000))
        assert 0.94 < hits / 4000 < 0.96, k  # a normal quantile instead of t: 88 % at k = 3


# --- the choice -----------------------------------------------------------------------------


def cpu_setup(**kw) -> plan.Setup:
    return plan.Setup("cpu-sim", trace.Workload(output=trace.LogNormal(24, 1.3, 1, 128)),
                      seeds=(1, 2, 3), duration=150.0, warmup=10.0, **kw)


def test_the_replica_choice_is_monotone_in_rate_and_objective() -> None:
    setup = cpu_setup()
    by_rate = [plan.make_plan(setup, rate, 1.0, methods=["least_conn"]).replicas
               for rate in (2.0, 4.0, 6.0, 8.0, 10.0)]
    assert None not in by_rate
    assert by_rate == sorted(by_rate) and by_rate[0] < by_rate[-1], by_rate
    by_slo = [plan.make_plan(setup, 8.0, slo, methods=["least_conn"]).replicas
              for slo in (0.3, 0.6, 1.5, 4.0)]
    assert None not in by_slo
    assert by_slo == sorted(by_slo, reverse=True) and by_slo[0] > by_slo[-1], by_slo


def test_the_choice_is_the_fewest_replicas_whose_upper_end_meets_the_objective() -> None:
    p = plan.make_plan(cpu_setup(), 6.0, 0.8)
    for m, n in p.peak.needed.items():
        assert n is not None
        assert p.peak.rows[n][m].p99.hi <= 0.8
        if n - 1 in p.peak.rows:
            assert p.peak.rows[n - 1][m].p99.hi > 0.8
        else:
            assert n == p.peak.first
    assert p.replicas == min(p.peak.needed.values())
    assert p.peak.needed[p.method] == p.replicas  # type: ignore[index]


def test_an_objective_below_a_lone_request_is_refused() -> None:
    p = plan.make_plan(cpu_setup(), 4.0, 0.05)
    assert p.method is None and "alone on a replica" in p.peak.stop
    assert "no replica count" in plan_report.render(p, "standalone", [])


# --- autoscaling and the snippet ------------------------------------------------------------


def test_autoscaling_targets_follow_the_model() -> None:
    p = plan.make_plan(cpu_setup(), 8.0, 1.0, peak_to_base=2.0)
    t, chosen = p.targets, p.chosen
    assert t is not None and chosen is not None and p.base is not None
    assert t.max_replicas == p.replicas
    assert t.min_replicas == p.base.needed[p.method] < t.max_replicas
    assert t.running == math.ceil(chosen.running)
    # The HPA holds maxReplicas at the peak's running sequences ...
    assert replicas_for_metric(chosen.running * t.max_replicas, t.running, t.max_replicas,
                               HPA_TOLERANCE) == t.max_replicas
    # ... and the waiting target is the queue the objective tolerates, inside the tolerance.
    tolerated = (1.0 - chosen.p99.hi) * p.capacity
    assert t.waiting == max(1, math.floor(tolerated / (1 + HPA_TOLERANCE)))
    # Running sequences follow Little's law: arrivals x time in a slot, per replica.
    assert 0 < chosen.running <= p.setup.slots()


def test_a_gpu_plan_keeps_two_replicas() -> None:
    setup = plan.Setup("h200-llama1b", seeds=(1, 2), duration=12.0, warmup=2.0)
    p = plan.make_plan(setup, 40.0, 0.5, peak_to_base=2.0, methods=["least_conn"])
    assert p.replicas == 1 and p.targets is not None
    assert (p.targets.min_replicas, p.targets.max_replicas) == (2, 2)
    assert "at least 2 on GPUs" in plan_report.render(p, "standalone", [])


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _stack(name: str) -> dict:
    doc = yaml.safe_load((REPO / f"Pulumi.{name}.yaml").read_text())["config"]
    return {k.removeprefix("llm-serving:"): v for k, v in doc.items()
            if k.startswith("llm-serving:")}


@pytest.mark.parametrize("profile, rate, stacks", [
    ("cpu-sim", 6.0, ["dev"]), ("h200-llama1b", 60.0, ["prod", "dev"])])
@pytest.mark.parametrize("peak_to_base", [1.0, 3.0])
def test_the_snippet_parses_into_a_stack_with_the_planned_values(
        profile: str, rate: float, stacks: list[str], peak_to_base: float) -> None:
    setup = plan.Setup(profile, seeds=(1, 2), duration=60.0 if profile == "cpu-sim" else 12.0,
                       warmup=2.0)
    p = plan.make_plan(setup, rate, 2.0, peak_to_base=peak_to_base)
    text = plan_report.snippet(p, "prod", "python -m bench plan ...")
    keys = yaml.safe_load(text)["config"]
    assert all(k.startswith("llm-serving:") for k in keys)
    values = {k.removeprefix("llm-serving:"): v for k, v in keys.items()}
    assert values == plan_report.snippet_values(p)
    t = p.targets
    assert t is not None
    for name in [*stacks, None]:
        base = _stack(name) if name else {"model": {"id": "org/model"}}
        cfg = parse_stack_config(_merge(base, values))
        assert cfg.load_balancing.method == p.method
        assert cfg.model.max_concurrency == setup.slots()
        assert cfg.autoscaling.enabled == (peak_to_base > 1)
        if peak_to_base > 1:
            a = cfg.autoscaling
            assert (a.min_replicas, a.max_replicas) == (t.min_replicas, t.max_replicas)
            assert (a.target_running_per_replica, a.target_waiting_per_replica) == \
                (t.running, t.waiting)
            assert "replicas" not in values
        else:
            assert cfg.replicas == t.max_replicas
        if name:  # the rest of the stack is untouched
            assert cfg.model.id == base["model"]["id"]


def test_the_command_prints_the_table_the_choice_and_the_snippet(capsys) -> None:
    from bench.__main__ import main

    rc = main(["plan", "--profile", "cpu-sim", "--rate", "5", "--slo-ttft-p99", "1",
               "--peak-to-base", "2", "--seeds", "2", "--duration", "80", "--jobs", "1",
               "--output-tokens", "median=24,high=128"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "every figure modelled" in out and "95 % interval = mean +- t(0.975, 1)" in out
    assert "targetRunningPerReplica" in out and "llm-serving:autoscaling:" in out
    snippet = yaml.safe_load(out[out.index("config:"):out.index("modelled in")])
    assert snippet["config"]["llm-serving:autoscaling"]["enabled"] is True


@pytest.mark.parametrize("argv, message", [
    (["--rate", "5", "--slo-ttft-p99", "1"], "--profile is required"),
    (["--profile", "nope", "--rate", "5", "--slo-ttft-p99", "1"], "--profile nope"),
    (["--profile", "cpu-sim", "--rate", "-5", "--slo-ttft-p99", "1"], "--rate"),
    (["--profile", "cpu-sim", "--rate", "5", "--slo-ttft-p99", "1", "--seeds", "1"],
     "--seeds must be at least 2"),
    (["--profile", "cpu-sim", "--rate", "5", "--slo-ttft-p99", "1", "--workload", "x"],
     "--workload: 'x' is neither standalone nor sessions"),
    (["--profile", "cpu-sim", "--rate", "5", "--slo-ttft-p99", "1", "--peak-to-base", "0.5"],
     "--peak-to-base must be at least 1"),
])
def test_bad_flags_are_refused_naming_the_flag(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        plan.main(argv)
    assert message in capsys.readouterr().err


def test_running_sequences_match_littles_law_at_light_load() -> None:
    # Slots at light load: no queue, so running per replica = rate x time in a slot / replicas.
    setup = cpu_setup()
    run = plan.run_seed(setup, 1.0, 2, "least_conn", 1)
    jobs = [j for j in plan._jobs(setup, 1.0, 1) if j.arrival >= setup.warmup]
    assert run.waiting == pytest.approx(0, abs=0.01)
    res = des.simulate(plan._jobs(setup, 1.0, 1), setup.params(2), "least_conn", seed=1)
    e2e = [e for e, j in zip(res.e2e, plan._jobs(setup, 1.0, 1)) if j.arrival >= setup.warmup]
    assert run.running == pytest.approx(sum(e2e) / (150 - 10) / 2, rel=1e-6)
    assert len(jobs) == run.requests
    assert statistics.fmean(e2e) > 0


def test_the_validation_dilation_bounds_events_and_requests() -> None:
    from bench import plan_validate

    gpu = plan.Setup("h200-llama8b")
    d, why = plan_validate.dilation_for(gpu, 3, 240.0)
    assert d == 24 and "local mode's dilation for 3 replicas is 7.2" in why
    assert plan_validate.dilation_for(gpu, 3, 50.0)[0] == 7.2  # the event rate binds
    assert plan_validate.dilation_for(plan.Setup("cpu-sim"), 4, 8.0)[0] == 1.0


def test_the_validation_predicts_the_mean_of_jittered_replays() -> None:
    from bench import plan_validate

    setup = plan.Setup("h200-llama8b",
                       trace.Workload(output=trace.LogNormal(24, 1.4, 1, 128)), time_dilation=24)
    tr = trace.generate(5.0, 30, 101, setup.workload, setup.max_model_len)
    measured = sum(r.arrival >= 5 for r in tr.requests)
    exact = plan_validate.model_ttft(tr, setup, 2, "round_robin", 5.0)
    jittered = plan_validate.model_ttft(tr, setup, 2, "round_robin", 5.0, jitter=3)
    assert len(exact) == len(jittered) == measured > 100
    # A few ms late moves requests across step boundaries: some TTFTs change, by under a step
    # either way plus what the changed batches cost.
    moved = [abs(a - b) for a, b in zip(exact, jittered)]
    assert sum(m > 1e-9 for m in moved) > measured // 4 and statistics.median(moved) < 0.3
    assert jittered == plan_validate.model_ttft(tr, setup, 2, "round_robin", 5.0, jitter=3)
    e = plan_validate.model_expected(tr, setup, 2, "round_robin", 5.0, replays=6)
    runs = [plan_validate.model_ttft(tr, setup, 2, "round_robin", 5.0, jitter=k)
            for k in range(1, 7)]
    assert e.p99 == pytest.approx(statistics.fmean(float(np.percentile(r, 99)) for r in runs))
    assert e.p99_sd > 0 and e.exact_p99 == pytest.approx(float(np.percentile(exact, 99)))
    assert e.ttft == exact


def test_bench_help_names_the_plan_subcommand(capsys) -> None:
    from bench.__main__ import main
    from bench.command import OUT

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert any(ln.strip().startswith("plan ") and "docs/capacity-planning.md" in ln
               for ln in out.splitlines())
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m bench plan") and "--slo-ttft-p99" in out
    assert "--validate" in out and "--out" in out
    assert plan.parser().get_default("out") == str(OUT)  # ignored by git


def test_the_docs_example_snippet_parses_into_the_prod_stack() -> None:
    # docs/capacity-planning.md shows a snippet a newcomer will paste: it must stay valid.
    doc = (REPO / "docs" / "capacity-planning.md").read_text()
    block = doc[doc.index("\nconfig:\n") + 1:doc.index("\nmodelled in ")]
    values = {k.removeprefix("llm-serving:"): v
              for k, v in yaml.safe_load(block)["config"].items()}
    cfg = parse_stack_config(_merge(_stack("prod"), values))
    a = cfg.autoscaling
    assert a.enabled and (a.min_replicas, a.max_replicas) == (2, 3)
    assert cfg.load_balancing.method in plan.METHODS
    assert "plan validate: <k> of 2 points inside the live 95% CI" in doc
