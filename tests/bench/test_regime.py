"""The regime study (bench/regime.py): intervals over seeds, the modelled capacity, and the
report's rows."""

from __future__ import annotations

import pytest

from bench import regime, trace


def test_the_median_interval_is_the_binomial_order_statistics() -> None:
    xs = list(range(1, 21))  # n = 20: P(B <= 5) = 0.021, P(B <= 6) = 0.058
    assert regime.median_interval(xs) == (10.5, 6, 15)
    assert regime.median_interval([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)  # too few: min-max
    assert regime.fmt_interval([1.0, 2.0, 3.0]) == "2.00× (1.00–3.00)"
    assert regime.fmt_interval([]) == "—"


def test_the_modelled_capacity_of_the_cpu_regime_matches_the_live_measurement() -> None:
    # docs/bench-results.md: 9.74 requests/s measured (closed loop, 4 replicas of cpu-sim)
    r = regime.REGIMES["cpu"]
    cap = regime.model_capacity(r.model(), r.replicas, trace.Workload(), 120.0, 30.0)
    assert cap == pytest.approx(9.74, rel=0.03)


def test_sessions_jobs_carry_keys_the_session_and_epp_hashes() -> None:
    tr = trace.generate(2.0, 30, 1, trace.Workload(sessions=True), 16_384)
    jobs = regime.jobs_of(tr)
    turns = [j for j, r in zip(jobs, tr.requests) if r.turn == 1]
    assert turns and all(j.session and j.prefix_keys and j.epp_hashes for j in turns)
    first = {r.session: j for j, r in zip(jobs, tr.requests) if r.turn == 0}
    nxt = next(j for j, r in zip(jobs, tr.requests) if r.turn == 1)
    # the second turn resends the first: both prefixes start the same
    assert nxt.epp_hashes[:3] == first[nxt.session].epp_hashes[:3]
    assert nxt.prefix_keys[:3] == first[nxt.session].prefix_keys[:3]
    plain = regime.jobs_of(trace.generate(2.0, 10, 1, trace.Workload(), 16_384))
    assert all(j.prefix_keys is None and j.epp_hashes is None for j in plain)


def test_a_short_study_prints_every_target_and_the_headline_ratios(capsys, tmp_path) -> None:
    from bench.__main__ import main as bench_main

    assert bench_main(["regime", "--regimes", "cpu", "--seeds", "2", "--duration", "40",
                       "--workloads", "standalone", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = (tmp_path / regime.REPORT).read_text()
    assert "| standalone | 80% | EPP (model) |" in report
    assert "`python -m bench regime --regimes cpu --seeds 2 --duration 40" in report
    for label in ("limit (model)", "least_conn x2 (model)", "EPP (model)",
                  "EPP + flow control (model)"):
        assert f"| standalone | 80% | {label} |" in out
    assert "cpu standalone 80%: round_robin / least_conn p99:" in out
    assert "worst over seeds and the NGINX targets" in out
    assert "worst over seeds and the endpoint picker (" not in out
    assert "worst over seeds and the endpoint picker\n" in out
    assert "worst over seeds and the endpoint picker with flow control" in out
    with pytest.raises(SystemExit):
        regime.main(["--regimes", "tpu"])


def test_the_jobs_block_size_is_the_profiles() -> None:
    from bench.simmodel import SimModel

    for name, field_name in (("cpu-sim", "prefix_cache_block_tokens"),
                             ("h200-llama8b", "block_size")):
        m = SimModel.named(name)
        s = m.profile.scheduler
        bigger = m.__class__(m.profile.model_copy(update={"scheduler": s.model_copy(
            update={field_name: getattr(s, field_name) * 2})}))
        assert bigger.prefix_block_tokens == 2 * m.prefix_block_tokens == 2 * getattr(s, field_name)
