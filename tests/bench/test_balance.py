"""The balancing benchmark's plan, targets and reports (no cluster: synthetic cells), and the
K-instance NGINX pool against fake replicas."""

from __future__ import annotations

import random

import pytest

from bench import balance, balance_report
from bench.stats import Summary


def test_targets_name_a_method_a_body_key_and_a_bound():
    p = balance.parse_target("session_hash_bounded@body*1.5")
    assert (p.method, p.session_key, p.bound_factor) == ("session_hash_bounded", "body", 1.5)
    assert balance.parse_target("direct") is None
    assert balance.parse_target("least_conn").method == "least_conn"
    for bad, hint in (("fastest", "method must be one of"), ("least_conn@body", "@body"),
                      ("session_hash*2", "*factor"), ("session_hash_bounded*x", "not a number"),
                      ("session_hash@cookie", "@body")):
        with pytest.raises(ValueError, match=hint.replace("*", r"\*")):
            balance.parse_target(bad)


def test_full_plan_measures_every_method_at_one_nginx_and_the_pod_counts_at_80():
    cells = balance.Plan().cells("standalone")
    at80 = {(k, t) for load, k, t, _ in cells if load == 0.8}
    assert {(1, m) for m in ("round_robin", "least_conn", "random_two_least_conn",
                             "session_hash_bounded")} <= at80
    assert {(k, "least_conn") for k in (2, 4)} <= at80
    assert ("direct" in {t for _, _, t, _ in cells})
    assert any(load > 1 and t == "session_hash_bounded" for load, _, t, _ in cells)
    sessions = balance.Plan().cells("sessions")
    assert {t for _, _, t, _ in sessions} >= {"session_hash", "session_hash_bounded",
                                              "least_conn", "session_hash_bounded@body"}
    quick = balance.QUICK
    assert sum(d for *_, d in quick.cells("standalone") + quick.cells("sessions")) <= 120


def _summary(n: int, errors: int = 0) -> Summary:
    nan = float("nan")
    return Summary(n, errors, nan, nan, nan, nan, 1.0, nan, 0, 0.0, {})


def _cell(workload, target, ttft, pods=1, load=0.8, hit=None, spilled=0):
    return balance.Cell(workload, load, pods, target, _summary(len(ttft)), ttft, 1.0, hit,
                        spilled)


def test_reports_print_intervals_the_limit_and_the_two_closing_lines():
    rng = random.Random(1)
    base = [rng.expovariate(10) for _ in range(600)]
    cells = [
        _cell("standalone", "round_robin", [3 * x for x in base]),
        _cell("standalone", "least_conn", base),
        _cell("standalone", "session_hash_bounded", [1.1 * x for x in base]),
        _cell("sessions", "least_conn", base, hit=0.25),
        _cell("sessions", "session_hash", [0.5 * x for x in base], hit=0.6),
        _cell("sessions", "session_hash_bounded", [0.55 * x for x in base], hit=0.57),
        _cell("standalone", "session_hash_bounded", base, load=1.2, spilled=7),
    ]
    modelled = {("standalone", 0.8): {d: [0.9 * x for x in base]
                                      for d in ("fcfs", "round_robin", "random_two_least_conn")}}
    modelled[("standalone", 0.8)]["least_conn"] = list(base)
    table = balance_report.table(cells, modelled)
    assert "limit: central FCFS (model)" in table
    assert "1.11× (1.11–1.11)" in table  # least_conn / limit, paired: exactly 1/0.9
    affinity, rr = balance_report.last_lines(cells)
    assert affinity == "affinity: hit 95% of session_hash, p99 0.55x least_conn"
    assert rr == "round_robin/default p99 TTFT: 3.00x (95% CI 3.00-3.00)"
    bars = "\n".join(balance_report.bars(cells, modelled))
    assert "target ≤ 1.25×: reached" in bars  # 1.11x the limit
    assert "≥ 90%: reached" in bars
    assert "0 of 600 requests lost, 7 found every replica at its bound" in bars
    assert balance_report.conclusion(cells, modelled, quick=False) == (
        f"Conclusion: at 80% load, the slowest 1% of first tokens through the default "
        f"{balance.DEFAULT_METHOD} took 1.11x as long as through the best possible balancer "
        "(a modelled central queue), within the 1.25x target; round_robin's took 3.00x the "
        "default's; session_hash_bounded kept 95% of session_hash's prefix-cache hits; above "
        "capacity no request was lost.")
    assert balance_report.lost_in_overload(cells) == 0
    cells[-1].summary = _summary(600, errors=3)
    assert balance_report.lost_in_overload(cells) == 3
    assert "3 requests were lost (bar: none)" in balance_report.conclusion(cells, modelled,
                                                                          quick=True)
    assert balance_report.conclusion(cells, modelled, quick=True).startswith(
        "Conclusion (quick run: a smoke test")
    checks = balance_report.model_check(cells, modelled)
    assert any("least_conn p99" in c and "inside" in c for c in checks)
    assert any("round_robin p99" in c and "OUTSIDE" in c for c in checks)  # 0.9x vs 3x


def test_seeds_pool_into_one_cell_per_target_with_their_runs_as_strata():
    from bench.stats import Record

    def run(seed, n, scale):
        rng = random.Random(seed)
        base = [scale * rng.expovariate(10) for _ in range(n)]
        cells = []
        for target, f, hit in (("least_conn", 1.0, 0.2), ("session_hash_bounded", 1.2, 0.5)):
            ttft = [f * x for x in base]
            recs = [Record(i, "x", 0.0, sent=0.0, first=t, last=t + 1, tokens=2, status=200,
                           done=True) for i, t in enumerate(ttft)]
            c = _cell("sessions", target, ttft, hit=hit, spilled=seed)
            c.records = recs
            cells.append(c)
        return cells

    cells = balance.pooled([run(1, 300, 1.0), run(2, 500, 3.0)])
    assert [c.target for c in cells] == ["least_conn", "session_hash_bounded"]
    lc, bd = cells
    assert lc.strata == (300, 500) and len(lc.ttft) == 800 and lc.summary.requests == 800
    assert bd.spilled == 3 and bd.hit == pytest.approx(0.5)
    # The paired ratio keeps each seed's blocks together: exactly 1.2x on every resample.
    r = balance_report._ratio(bd, lc, 99)
    assert r.lo == pytest.approx(1.2) and r.hi == pytest.approx(1.2)
    assert balance.pooled([run(1, 10, 1.0)])[0].strata == ()
    models = balance.pooled_models([
        {"capacity": {"standalone": 9.7}, ("standalone", 0.8): {"fcfs": [1.0] * 3}},
        {"capacity": {"standalone": 9.7}, ("standalone", 0.8): {"fcfs": [2.0] * 4}}])
    assert models[("standalone", 0.8)]["fcfs"] == [1.0] * 3 + [2.0] * 4
    assert models["strata"][("standalone", 0.8)] == (3, 4)


def test_pool_spreads_requests_over_instances_with_their_own_counts(tmp_path):
    from bench.ingress_pool import NginxPool
    from components.policies.balancing import LoadBalancingConfig
    from tests.infra.nginx_support import NGINX, Upstream, free_port, request

    if NGINX is None:
        pytest.skip("nginx is not installed")
    ups = [Upstream(f"r{i}").start() for i in range(2)]
    base = free_port()
    try:
        with NginxPool([u.address for u in ups], 2, base, max_output_tokens=64,
                       replica_slots=1, admission_limit=64) as pool:
            pool.start(LoadBalancingConfig(method="round_robin"))
            # Each instance deals round robin on its own: both send their first to r0.
            first = {request(port, "POST", "/v1/x", body=b"{}")[2] for port in pool.ports}
            assert first == {b"r0"}
            pick = pool.picker(seed=3)
            chosen = {pick(None) for _ in range(50)}
            assert chosen == {f"{e}/chat/completions" for e in pool.endpoints}
            assert pool.spill_count() == 0
    finally:
        for u in ups:
            u.stop()


def test_pool_moves_to_free_ports_when_one_is_taken():
    import socket

    from bench.ingress_pool import NginxPool
    from components.policies.balancing import LoadBalancingConfig
    from tests.infra.nginx_support import NGINX, Upstream, free_port, request

    if NGINX is None:
        pytest.skip("nginx is not installed")
    up = Upstream("r0").start()
    squatter = socket.socket()
    try:
        with NginxPool([up.address], 1, free_port(), max_output_tokens=64, replica_slots=1,
                       admission_limit=64) as pool:
            squatter.bind(("127.0.0.1", pool.ports[0]))
            squatter.listen()
            taken = pool.ports[0]
            pool.start(LoadBalancingConfig())
            assert pool.ports[0] != taken
            assert request(pool.ports[0], "POST", "/v1/x", body=b"{}")[2] == b"r0"
    finally:
        squatter.close()
        up.stop()
