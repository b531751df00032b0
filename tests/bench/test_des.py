"""The discrete-event model of the sim engine (bench/des.py)."""

from __future__ import annotations

import random

import pytest

from bench import des
from bench.stats import percentile

P = des.Params(replicas=1, slots=1, prefill_base_s=0.05, prefill_per_token_s=0.001,
               decode_base_s=0.03, decode_per_seq_s=0.001)


def test_one_request_pays_prefill_then_one_step_per_further_token():
    r = des.simulate([des.Job(1.0, 100, 11)], P, "fcfs")
    assert r.ttft[0] == pytest.approx(0.05 + 0.1)
    assert r.e2e[0] == pytest.approx(0.15 + 10 * 0.031)


def test_a_full_replica_queues_until_a_slot_frees():
    jobs = [des.Job(0.0, 0, 5), des.Job(0.0, 0, 5)]
    for dispatcher in des.DISPATCHERS:
        r = des.simulate(jobs, P, dispatcher)
        # The first leaves its slot when the step after its last token starts (here: at once,
        # nothing else decodes); the second then prefills.
        assert r.ttft[1] == pytest.approx(r.e2e[0] + 0.05), dispatcher


def test_decode_steps_slow_down_with_the_batch():
    two = des.Params(replicas=1, slots=2, prefill_base_s=0.0, prefill_per_token_s=0.0,
                     decode_base_s=0.03, decode_per_seq_s=0.01)
    alone = des.simulate([des.Job(0.0, 0, 11)], two, "fcfs").e2e[0]
    together = des.simulate([des.Job(0.0, 0, 11), des.Job(0.0, 0, 11)], two, "fcfs").e2e
    assert alone == pytest.approx(10 * 0.04)
    # The first starts a step alone; the second joins at its end. The first's finished
    # sequence still counts in the step after its last token.
    assert together[0] == pytest.approx(0.04 + 9 * 0.05)
    assert together[1] == pytest.approx(0.04 + 10 * 0.05)


def test_round_robin_cycles_and_least_conn_avoids_the_busy_replica():
    p = des.Params(replicas=3, slots=4, prefill_base_s=0.01, prefill_per_token_s=0.0,
                   decode_base_s=0.03, decode_per_seq_s=0.001)
    jobs = [des.Job(0.0, 0, 1000)] + [des.Job(0.1 * i, 0, 2) for i in range(1, 7)]
    assert des.simulate(jobs, p, "round_robin").replica == [0, 1, 2, 0, 1, 2, 0]
    lc = des.simulate(jobs, p, "least_conn").replica
    assert lc[0] == 0 and 0 not in lc[1:]


def _trace(n: int, rate: float, seed: int) -> list[des.Job]:
    rng = random.Random(seed)
    t, jobs = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        jobs.append(des.Job(t, rng.randint(20, 400), max(1, min(384, round(
            rng.lognormvariate(3.7, 1.4))))))
    return jobs


def test_the_central_queue_beats_per_replica_queues_in_the_tail():
    p = des.Params(replicas=4, slots=8, prefill_base_s=0.05, prefill_per_token_s=0.00025,
                   decode_base_s=0.03, decode_per_seq_s=0.001)
    jobs = _trace(3000, 8.0, 1)
    p99 = {d: percentile(des.simulate(jobs, p, d, seed=1).ttft, 99) for d in des.DISPATCHERS}
    assert p99["fcfs"] <= p99["least_conn"] <= p99["round_robin"]
    assert p99["round_robin"] > 1.5 * p99["fcfs"]


def test_deterministic_and_checks_its_input():
    jobs = _trace(200, 5.0, 2)
    p = des.Params(4, 8, 0.05, 0.00025, 0.03, 0.001)
    a = des.simulate(jobs, p, "random_two_least_conn", seed=3)
    assert a == des.simulate(jobs, p, "random_two_least_conn", seed=3)
    with pytest.raises(ValueError, match="dispatcher must be one of"):
        des.simulate(jobs, p, "fastest")
    with pytest.raises(ValueError, match="sorted"):
        des.simulate(list(reversed(jobs)), p, "fcfs")


def test_model_seeds_reports_every_ratio_per_seed():
    from bench import model_seeds

    out = model_seeds.ratios(seeds=2, duration=20, warmup=2, rate=6.0)
    assert set(out) == set(model_seeds.RATIOS)
    assert all(len(xs) == 2 for xs in out.values())
    # The central queue is the limit: no method beats it by much on any seed.
    assert all(x >= 0.9 for name, xs in out.items() if "limit" in name for x in xs)


def test_model_seeds_prints_the_handoff_row_and_the_share_within_the_bar(capsys):
    from bench import model_seeds

    model_seeds.main(["--seeds", "2", "--duration", "20", "--warmup", "2", "--handoff", "0.5:2"])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("least_conn+handoff / limit: median") for line in lines)
    assert all("seeds <= 1.25x" in line for line in lines if "/ limit" in line)
    with pytest.raises(SystemExit):
        model_seeds.main(["--handoff", "0.5"])
    assert "--handoff must be PATIENCE_SECONDS:HOPS" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        model_seeds.main(["--handoff", "0.5:2:front"])


def test_handoff_moves_a_waiting_request_to_the_replica_that_frees_first():
    # Two replicas of one slot: replica 0 runs a long job, replica 1 a short one. least_conn
    # sends the third job to replica 0 (tie, round robin), where it would wait for the long
    # one; with a handoff after 0.1 s it moves to replica 1, which frees at about 0.1 s.
    p = des.Params(replicas=2, slots=1, prefill_base_s=0.0, prefill_per_token_s=0.0,
                   decode_base_s=0.01, decode_per_seq_s=0.0)
    jobs = [des.Job(0.0, 0, 1000), des.Job(0.0, 0, 10), des.Job(0.001, 0, 5)]
    stay = des.simulate(jobs, p, "least_conn")
    assert stay.replica[2] == 0 and stay.ttft[2] > 9.0
    moved = des.simulate(jobs, p, "least_conn", handoff=des.Handoff(patience_s=0.1, hops=1))
    assert moved.replica[2] == 1
    assert moved.ttft[2] == pytest.approx(0.1 + 0.003 - 0.001, abs=0.005)  # patience + hop
    assert moved.ttft[:2] == stay.ttft[:2]


def test_handoff_without_hops_is_plain_dispatch_and_the_last_replica_keeps_the_request():
    jobs = _trace(400, 7.5, 4)
    p = des.Params(4, 8, 0.05, 0.00025, 0.03, 0.001)
    plain = des.simulate(jobs, p, "least_conn")
    assert des.simulate(jobs, p, "least_conn", handoff=des.Handoff(0.2, hops=0)) == plain
    # However many hops are allowed, every job is served once (none is dropped in a handoff).
    many = des.simulate(jobs, p, "least_conn", handoff=des.Handoff(0.05, hops=10))
    assert all(t == t and t > 0 for t in many.ttft)
    back = des.simulate(jobs, p, "least_conn", handoff=des.Handoff(0.05, 10, keep_place=False))
    assert all(t == t and t > 0 for t in back.ttft)


def test_handoff_is_checked():
    jobs = _trace(10, 5.0, 2)
    p = des.Params(2, 2, 0.05, 0.00025, 0.03, 0.001)
    for bad in (des.Handoff(0.0, 1), des.Handoff(0.1, -1)):
        with pytest.raises(ValueError, match="handoff needs"):
            des.simulate(jobs, p, "least_conn", handoff=bad)
    with pytest.raises(ValueError, match="handoff needs"):
        des.simulate(jobs, p, "fcfs", handoff=des.Handoff(0.1, 1))
