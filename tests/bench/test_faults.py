"""Fault drills (bench/faults/): counting, bars, verdicts and the report on synthetic data,
plus one tiny end-to-end nginx reload drill on a real local cluster."""

from __future__ import annotations

import math
import time

import pytest

from bench import faults
from bench.faults import (
    Check,
    Counts,
    DrillModel,
    DrillResult,
    FaultRecord,
    LoadRun,
    count,
    crash_checks,
    exit_code,
    failed_after,
    overload_bounds,
    overload_checks,
    splice,
    summary_table,
    zero_failure_checks,
)

MIB = 1024 * 1024


def rec(i: int, *, status: int = 200, done: bool = True, tokens: int = 3, sent: float = 0.0,
        error: str | None = None, responded: float | None = None,
        retry_after: str | None = None, first: float | None = None,
        last: float | None = None) -> FaultRecord:
    r = FaultRecord(i, "t", scheduled=sent, sent=sent, status=status, done=done, error=error,
                    responded=responded, retry_after=retry_after)
    if status == 200 and tokens:
        r.tokens = tokens
        r.first = sent + 0.1 if first is None else first
        r.last = sent + 0.5 if last is None else last
    return r


def ok(i: int, **kw: object) -> FaultRecord:
    return rec(i, **kw)  # type: ignore[arg-type]


def rejected(i: int, latency: float = 0.003, retry_after: str | None = "1") -> FaultRecord:
    return rec(i, status=429, done=False, tokens=0, error="HTTP 429", responded=latency,
               retry_after=retry_after)


# --- counting --------------------------------------------------------------------------------


def test_truncated_stream_and_tokenless_done_are_failures() -> None:
    records = [ok(0), rec(1, done=False, error="stream ended without [DONE]"),
               rec(2, tokens=0), rec(3, status=503, done=False, tokens=0, error="HTTP 503")]
    assert count(records) == Counts(sent=4, succeeded=1, failed=3, rejected=0)


def test_429_is_a_failure_unless_rejections_are_expected() -> None:
    records = [ok(0), rejected(1), rejected(2), rec(3, status=502, done=False, tokens=0)]
    assert count(records) == Counts(4, 1, 3, 2)
    assert count(records, rejections_expected=True) == Counts(4, 1, 1, 2)


def test_failed_after_counts_only_failures_sent_at_or_after_the_kill() -> None:
    records = [rec(0, sent=1.0, done=False, error="x"), ok(1, sent=2.0),
               rec(2, sent=2.0, done=False, error="x"), rec(3, sent=3.0, done=False, error="x")]
    assert failed_after(records, 2.0) == 2
    assert failed_after(records, math.inf) == 0
    unsent = FaultRecord(9, "t", scheduled=5.0)  # never sent: sent is NaN
    unsent.error = "cancelled"
    assert failed_after([unsent], 0.0) == 0


# --- bars ------------------------------------------------------------------------------------


def failing(checks: list[Check]) -> set[str]:
    return {c.name for c in checks if not c.passed}


def test_zero_failure_bar() -> None:
    assert failing(zero_failure_checks(Counts(500, 500, 0, 0), 500, True)) == set()
    assert failing(zero_failure_checks(Counts(499, 499, 0, 0), 500, True)) == {"enough requests"}
    assert failing(zero_failure_checks(Counts(600, 599, 1, 0), 500, True)) == {
        "no failed request"}
    # A restart that did not finish while the load ran proves nothing.
    assert failing(zero_failure_checks(Counts(600, 600, 0, 0), 500, False)) == {
        "fault ran under load"}


def crash(failed: int = 4, inflight: int | None = 4, after: int = 0,
          served: float = 3.0) -> set[str]:
    counts = Counts(300, 300 - failed, failed, 0)
    return failing(crash_checks(counts, inflight, after, served, True, 300))


def test_crash_bar_compares_failures_with_in_flight_at_the_kill() -> None:
    assert crash() == set()
    assert crash(failed=5) == {"failures <= in flight"}
    assert crash(after=1) == {"new requests unaffected"}
    assert crash(served=0.0) == {"restarted replica serves"}
    # Unknown or zero in-flight cannot pass: nothing was at stake.
    assert crash(inflight=None) == {"in-flight measured", "failures <= in flight"}
    assert crash(failed=0, inflight=0) == {"in-flight measured"}


def test_overload_bounds_follow_the_queue_depth() -> None:
    m = DrillModel()
    b = overload_bounds(m, 3)
    assert b.ttft_p99_s == pytest.approx((m.queue / m.slots + 1) * m.service_max_s + 1.0)
    assert b.e2e_p99_s == pytest.approx(b.ttft_p99_s + m.service_max_s)
    deeper = overload_bounds(DrillModel(queue=64), 3)
    assert deeper.ttft_p99_s > b.ttft_p99_s
    assert b.reject_p99_s == 0.050 and b.rss_growth_mib == 50.0


def overload_sample(n_ok: int = 50, n_429: int = 50, **kw: object) -> list[FaultRecord]:
    return [ok(i, first=0.2, last=1.0) for i in range(n_ok)] + [
        rejected(n_ok + i, **kw) for i in range(n_429)]  # type: ignore[arg-type]


FLAT_RSS = {0: [50 * MIB, 52 * MIB, 51 * MIB], 1: [50 * MIB, 50 * MIB]}


def test_overload_passes_on_fast_429s_flat_rss_and_bounded_latency() -> None:
    checks, fig = overload_checks(overload_sample(), FLAT_RSS, overload_bounds(DrillModel(), 3))
    assert failing(checks) == set()
    assert fig["reject_share"] == 0.5
    assert fig["reject_p99"] == pytest.approx(0.003)
    assert fig["rss_growth_max_mib"] == pytest.approx(2.0)  # peak - start, not end - start
    assert fig["ttft_p99"] == pytest.approx(0.2)


@pytest.mark.parametrize("change, missed", [
    ({"records": overload_sample(latency=0.2)}, "429 p99 fast"),
    ({"records": overload_sample()[:-1] + [rejected(999, retry_after=None)]},
     "Retry-After on every 429"),
    ({"records": overload_sample(n_429=0)}, "429s happen"),
    ({"rss": {0: [50 * MIB, 120 * MIB, 60 * MIB]}}, "RSS bounded"),
    ({"records": overload_sample() + [rec(500, done=False, error="stream ended")]},
     "no other failure"),
    ({"records": [ok(i, first=9.0, last=10.0) for i in range(10)] + overload_sample(0, 10)},
     "admitted TTFT p99 bounded"),
])
def test_overload_misses(change: dict, missed: str) -> None:
    records = change.get("records", overload_sample())
    rss = change.get("rss", FLAT_RSS)
    checks, _ = overload_checks(records, rss, overload_bounds(DrillModel(), 3))
    assert missed in failing(checks)


# --- verdicts, table, exit code ----------------------------------------------------------------


def result(name: str, *passed: bool) -> DrillResult:
    return DrillResult(name, Counts(10, 10, 0, 0), "bar",
                       [Check(f"c{i}", p) for i, p in enumerate(passed)])


def test_verdict_and_exit_code() -> None:
    good, bad = result("a", True, True), result("b", True, False, False)
    assert good.verdict == "PASS" and bad.verdict == "FAIL (c1; c2)"
    assert exit_code([good]) == 0
    assert exit_code([good, bad]) == 1
    assert exit_code([]) == 1  # nothing ran is not a pass
    assert exit_code([result("no checks")]) == 1


def test_summary_table_has_one_row_per_drill_with_counts_and_verdict() -> None:
    r = DrillResult("crash", Counts(300, 297, 3, 0), "failed <= 4", [Check("x", True)])
    table = summary_table([r, result("b", False)]).splitlines()
    assert table[0] == "| drill | sent | succeeded | failed | 429 | bar | verdict |"
    assert table[2] == "| crash | 300 | 297 | 3 | 0 | failed <= 4 | PASS |"
    assert table[3].endswith("| FAIL (c0) |") and len(table) == 4


def test_action_done_requires_the_fault_to_end_before_the_load() -> None:
    run = LoadRun([], action_ended=5.0, load_ended=6.0)
    assert run.action_done
    assert not LoadRun([], action_ended=7.0, load_ended=6.0).action_done
    assert not LoadRun([], action_ended=None, load_ended=6.0).action_done
    assert not LoadRun([], action_error=RuntimeError("x"), action_ended=1.0,
                       load_ended=6.0).action_done


# --- docs/reliability.md ---------------------------------------------------------------------


def test_splice_replaces_only_the_results_and_keeps_the_rest() -> None:
    first = splice(None, "TABLE 1")
    assert "## Fuzzing" in first and "TABLE 1" in first
    edited = first.replace("_Placeholder: filled in by the lead._", "fuzz notes") + "\nmore\n"
    second = splice("# Intro prose\n" + edited, "TABLE 2")
    assert "TABLE 2" in second and "TABLE 1" not in second
    assert "# Intro prose" in second and "fuzz notes" in second and second.endswith("more\n")


def test_splice_never_overwrites_a_file_without_markers() -> None:
    out = splice("# hand-written\n\ntext\n", "TABLE")
    assert out.startswith("# hand-written\n\ntext\n") and "TABLE" in out
    assert out.count(faults.BEGIN) == 1 and out.count(faults.END) == 1


# --- CLI -------------------------------------------------------------------------------------


def test_bench_cli_dispatches_faults_and_keeps_its_own_options(capsys) -> None:
    from bench.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["faults", "--drills", "bogus"])  # rejected by the faults parser, before a cluster
    assert exc.value.code == 2
    assert "python -m bench faults" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--policies" in capsys.readouterr().out  # the benchmark's own CLI, unchanged


# --- one tiny end-to-end drill ---------------------------------------------------------------


def test_reload_drill_end_to_end_loses_no_request() -> None:
    """2 -> 3 replicas under ~50 streaming requests through the real nginx: 0 failed."""
    from local import LocalCluster
    from local.procs import LocalModeError, find_nginx
    from tests.local.support import assert_gone, free_port_range

    try:
        find_nginx()
    except LocalModeError:
        pytest.skip("nginx is not installed")
    model = DrillModel(tokens_low=5, tokens_high=10)
    plan = faults.Plan(rate=12.0, min_requests=50, crash_requests=0, overload_seconds=0)
    base = free_port_range(4)
    t0 = time.monotonic()
    cluster = LocalCluster(2, port=base, first_replica_port=base + 1, server_env=model.env(),
                           max_output_tokens=64)
    try:
        cluster.start(timeout=30)
        res = faults.drill_reload(cluster, model, plan, seed=3)
    finally:
        pids = [cluster.nginx_pid, *cluster.replica_pids]
        cluster.stop()
        assert_gone([p for p in pids if p is not None])
    assert res.counts.sent >= 50
    assert res.counts.failed == 0, res.notes
    assert res.passed, res.verdict
    assert cluster.replicas == 3
    assert any("new replica 3 served" in n and "served 0 " not in n for n in res.notes)
    assert time.monotonic() - t0 < 30


# --- client disconnect drill -----------------------------------------------------------------


def _phase(name: str, admitted: int = 4, freed: float | None = 0.3) -> faults.PhaseResult:
    return faults.PhaseResult(name, 4, admitted, freed)


def test_disconnect_bar_needs_every_client_generating_and_slots_back_in_time() -> None:
    bounds = faults.DisconnectBounds()
    good = [_phase("non-streaming"), _phase("streaming")]
    assert all(c.passed for c in faults.disconnect_checks(good, 10.0, 4, 4, bounds))
    # the finding: non-streaming generations held their slots until they ended
    held = [_phase("non-streaming", freed=11.8), _phase("streaming")]
    missed = [c.name for c in faults.disconnect_checks(held, 12.0, 4, 4, bounds) if not c.passed]
    assert missed == ["non-streaming: slots free within 2 s"]
    never = [_phase("non-streaming", freed=None), _phase("streaming", admitted=3)]
    missed = [c.name for c in faults.disconnect_checks(never, 12.0, 3, 4, bounds) if not c.passed]
    assert missed == ["non-streaming: slots free within 2 s",
                      "streaming: every client generating", "capacity back"]
    # a generation shorter than twice the bar would free its slot anyway: proves nothing
    short = faults.disconnect_checks(good, 3.0, 4, 4, bounds)
    assert [c.name for c in short if not c.passed] == ["generations outlast the bar"]


def test_disconnect_drill_end_to_end_frees_slots_within_2_s() -> None:
    """4 clients fill both replicas' slots through the real nginx, then hang up."""
    from local import LocalCluster
    from local.procs import LocalModeError, find_nginx
    from tests.local.support import assert_gone, free_port_range

    try:
        find_nginx()
    except LocalModeError:
        pytest.skip("nginx is not installed")
    model = DrillModel(slots=2, queue=2, disconnect_tokens=200)
    assert model.disconnect_generation_s > 5
    base = free_port_range(3)
    cluster = LocalCluster(2, port=base, first_replica_port=base + 1, server_env=model.env(),
                           max_output_tokens=200)
    try:
        cluster.start(timeout=30)
        res = faults.drill_disconnect(cluster, model)
    finally:
        pids = [cluster.nginx_pid, *cluster.replica_pids]
        cluster.stop()
        assert_gone([p for p in pids if p is not None])
    assert res.passed, res.notes
    assert any(n.startswith("non-streaming: 4 generating") for n in res.notes), res.notes


# --- connection flood drill ------------------------------------------------------------------


def test_flood_bar_wants_every_connection_answered_and_slow_bodies_cut() -> None:
    from collections import Counter

    good = faults.flood_checks(Counter({"200": 90, "429": 410}), 0, 10.1, 10)
    assert all(c.passed for c in good)
    # the finding: resets instead of answers
    reset = faults.flood_checks(Counter({"200": 479, "ConnectionResetError": 21}), 0, 10.1, 10)
    assert [c.name for c in reset if not c.passed] == ["every connection answered"]
    slow = faults.flood_checks(Counter({"200": 500}), 0, 75.0, 10)
    assert [c.name for c in slow if not c.passed] == ["slow body cut off"]
    bare = faults.flood_checks(Counter({"200": 10, "429": 5}), 2, 1.0, 10)
    assert [c.name for c in bare if not c.passed] == ["Retry-After on every 429"]
