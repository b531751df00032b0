"""The discrete-event model with continuous-batching replicas (bench/des.py, BatchedParams)."""

from __future__ import annotations

import random

import pytest

from bench import des, des_speed
from bench.stats import percentile
from server.engines.scheduler import Scheduler, SchedulerConfig, Seq, block_keys
from server.engines.steps import StepBatch


def cost(batch: StepBatch) -> float:
    return 0.010 + 0.0002 * batch.sequences + 0.00003 * batch.tokens


def params(replicas: int = 1, **kw) -> des.BatchedParams:
    cfg = dict(kv_cache_tokens=65_536, max_model_len=4096, max_num_seqs=4,
               max_num_batched_tokens=256)
    return des.BatchedParams(replicas, SchedulerConfig(**{**cfg, **kw}), cost)


def test_one_replica_is_the_scheduler_stepped_back_to_back():
    jobs = [des.Job(0.0, 300, 5), des.Job(0.0, 40, 8), des.Job(0.05, 100, 3)]
    res = des.simulate(jobs, params(), "fcfs")
    # The same scheduler driven by hand: arrivals join at the first step boundary after them.
    s = Scheduler(params().config)
    seqs = [Seq(j.prompt_tokens, j.max_tokens, data=k) for k, j in enumerate(jobs)]
    s.add(seqs[0])
    s.add(seqs[1])
    t, first, done, pending = 0.0, {}, {}, [2]
    while s.has_work or pending:
        plan = s.plan_step()
        t += cost(plan.batch)
        out = s.finish_step(plan)
        for q in out.emitted:
            first.setdefault(q.data, t)
        for q in out.finished:
            done[q.data] = t
        if pending and jobs[pending[0]].arrival <= t:
            s.add(seqs[pending.pop()])
    assert res.ttft == pytest.approx([first[k] - j.arrival for k, j in enumerate(jobs)])
    assert res.e2e == pytest.approx([done[k] - j.arrival for k, j in enumerate(jobs)])


def test_ttft_is_prefill_chunks_and_itl_one_step_per_token():
    res = des.simulate([des.Job(1.0, 600, 11)], params(), "fcfs")
    # 600 tokens in chunks of 256, 256, 88; then 10 decode steps of one sequence.
    chunks = [cost(StepBatch(prefill=((n, c),))) for n, c in ((256, 0), (256, 256), (88, 512))]
    assert res.ttft[0] == pytest.approx(sum(chunks))
    assert res.e2e[0] - res.ttft[0] == pytest.approx(10 * cost(StepBatch(decode_kv=(600,))))


def test_round_robin_cycles_and_least_conn_counts_requests_in_flight():
    jobs = [des.Job(0.0, 20, 500)] + [des.Job(0.05 * i, 20, 2) for i in range(1, 7)]
    assert des.simulate(jobs, params(3), "round_robin").replica == [0, 1, 2, 0, 1, 2, 0]
    lc = des.simulate(jobs, params(3), "least_conn").replica
    assert lc[0] == 0 and 0 not in lc[1:]


def test_the_central_queue_binds_a_request_to_a_replica_only_when_it_has_a_free_sequence():
    # Two replicas of one sequence each: a long job on one, a short one on the other. The third
    # waits centrally and goes to whichever frees first; least_conn binds it at arrival (a tie,
    # so round robin: the long job's replica) and it waits there.
    p = params(2, max_num_seqs=1)
    jobs = [des.Job(0.0, 20, 400), des.Job(0.0, 20, 10), des.Job(0.01, 20, 5)]
    central = des.simulate(jobs, p, "fcfs")
    bound = des.simulate(jobs, p, "least_conn")
    assert central.replica[2] == central.replica[1] != central.replica[0]
    assert central.ttft[2] < 0.5 < bound.ttft[2]


def test_the_central_queue_is_the_limit_when_requests_queue():
    # Near saturation (~30 requests/s for 4 x 8 sequences), where the tail is queueing. (Well
    # below it, TTFT is the make-up of the steps and the methods are within a few ms.)
    rng = random.Random(3)
    t, jobs = 0.0, []
    for _ in range(3000):
        t += rng.expovariate(30.0)
        jobs.append(des.Job(t, rng.randint(20, 600), max(1, min(300, round(
            rng.lognormvariate(3.5, 1.2))))))
    p = params(4, max_num_seqs=8, max_num_batched_tokens=512)
    p99 = {d: percentile(des.simulate(jobs, p, d, seed=1).ttft, 99) for d in des.DISPATCHERS}
    assert p99["fcfs"] <= p99["least_conn"] <= p99["round_robin"]
    assert p99["round_robin"] > 1.5 * p99["fcfs"]


def test_a_shared_prefix_is_a_prefix_cache_hit():
    ids = list(range(512))
    keys = tuple(block_keys(ids))
    other = tuple(block_keys([9] + ids[1:]))
    hit = des.simulate([des.Job(0.0, 512, 2, keys), des.Job(1.0, 512, 2, keys)], params(),
                       "fcfs")
    miss = des.simulate([des.Job(0.0, 512, 2, keys), des.Job(1.0, 512, 2, other)], params(),
                        "fcfs")
    # 496 of 512 tokens hit (whole blocks, the last token recomputed): one short step.
    assert hit.ttft[1] == pytest.approx(cost(StepBatch(prefill=((16, 496),))))
    assert miss.ttft[1] > 2 * hit.ttft[1]


def test_deterministic_and_checks_its_input():
    jobs = des_speed.jobs(40.0, 20, 2)
    p = params(3)
    assert des.simulate(jobs, p, "random_two_least_conn", seed=3) == des.simulate(
        jobs, p, "random_two_least_conn", seed=3)
    with pytest.raises(ValueError, match="handoff is modelled for slots replicas only"):
        des.simulate(jobs, p, "least_conn", handoff=des.Handoff(0.5, 1))
    with pytest.raises(ValueError, match="sorted"):
        des.simulate(list(reversed(jobs)), p, "fcfs")
    with pytest.raises(ValueError, match="at least one prompt token"):
        des.simulate([des.Job(0.0, 0, 5)], p, "fcfs")


def test_the_speed_benchmark_prints_its_figures(capsys):
    des_speed.main(["--duration", "3", "--rate", "50", "--dispatchers", "fcfs"])
    out = capsys.readouterr().out
    assert "us/step" in out and "fcfs: median" in out
    with pytest.raises(SystemExit):
        des_speed.main(["--dispatchers", "fastest"])
