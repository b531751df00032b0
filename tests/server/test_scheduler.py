"""The continuous-batching scheduler (server/engines/scheduler.py): vLLM 0.33.0's step rules."""

from __future__ import annotations

import random

import pytest

from server.engines.scheduler import (
    PREEMPTED,
    RUNNING,
    Scheduler,
    SchedulerConfig,
    Seq,
    StepOutput,
    block_keys,
)


def config(**kw) -> SchedulerConfig:
    base = dict(kv_cache_tokens=1024, max_model_len=512, max_num_seqs=8,
                max_num_batched_tokens=64)
    return SchedulerConfig(**{**base, **kw})


def step(s: Scheduler) -> tuple:
    """Plan and finish one step; return (plan, output)."""
    plan = s.plan_step()
    return plan, s.finish_step(plan)


def names(seqs) -> list:
    return [q.data for q in seqs]


def test_a_long_prompt_is_prefilled_in_chunks_of_the_token_budget():
    s = Scheduler(config(max_num_batched_tokens=32))
    a = Seq(100, 3, data="a")
    s.add(a)
    chunks = []
    while a.num_output == 0:
        plan, out = step(s)
        chunks.append(plan.batch.prefill)
    # 32 + 32 + 32 + 4: the first token comes at the end of the step of the last chunk.
    assert chunks == [((32, 0),), ((32, 32),), ((32, 64),), ((4, 96),)]
    plan, out = step(s)
    assert plan.batch.decode_kv == (100,) and plan.batch.prefill == ()
    plan, out = step(s)
    assert names(out.finished) == ["a"] and a.num_output == 3


def test_decodes_and_a_prefill_chunk_share_a_step_under_the_budget():
    s = Scheduler(config(max_num_batched_tokens=40))
    a, b = Seq(10, 50, data="a"), Seq(10, 50, data="b")
    s.add(a)
    s.add(b)
    plan, out = step(s)
    assert plan.batch.prefill == ((10, 0), (10, 0)) and names(out.emitted) == ["a", "b"]
    c = Seq(200, 5, data="c")
    s.add(c)
    plan, _ = step(s)
    # Two decodes (one token each) first, then c's first chunk takes the rest of the budget.
    assert plan.batch.decode_kv == (10, 10)
    assert plan.batch.prefill == ((38, 0),)
    assert plan.batch.tokens == 40


def test_running_requests_go_first_and_a_waiting_one_gets_what_they_leave():
    s = Scheduler(config(max_num_batched_tokens=64))
    long, short = Seq(400, 5, data="long"), Seq(4, 5, data="short")
    s.add(long)
    step(s)  # long: first chunk of 64 tokens, the whole budget
    s.add(short)
    for _ in range(5):  # long's chunks take the whole budget: short is not admitted
        plan, _ = step(s)
        assert plan.batch.prefill == ((64, plan.batch.prefill[0][1]),) and names(plan.seqs) == ["long"]
    plan, out = step(s)  # long's last chunk (16 of 400) leaves 48: short is admitted
    assert plan.batch.prefill == ((16, 384), (4, 0)) and names(out.emitted) == ["long", "short"]


def test_long_prefill_threshold_caps_chunks_only_when_others_are_eligible():
    s = Scheduler(config(max_num_batched_tokens=64, long_prefill_token_threshold=16))
    a = Seq(100, 2, data="a")
    s.add(a)
    plan, _ = step(s)
    assert plan.batch.prefill == ((64, 0),)  # alone: nobody to starve, no cap
    s.add(Seq(100, 2, data="b"))
    plan, _ = step(s)
    assert plan.batch.prefill == ((16, 64), (16, 0))


def test_at_most_max_num_seqs_run_and_the_rest_wait_in_arrival_order():
    s = Scheduler(config(max_num_seqs=2))
    seqs = [Seq(5, 3, data=i) for i in range(4)]
    for q in seqs:
        s.add(q)
    plan, _ = step(s)
    assert names(plan.seqs) == [0, 1] and names(s.waiting) == [2, 3]
    step(s)
    plan, out = step(s)
    assert names(out.finished) == [0, 1]
    plan, _ = step(s)  # their places go to the next in line
    assert names(plan.seqs) == [2, 3]


def test_kv_exhaustion_preempts_the_newest_running_request_which_recomputes():
    # 8 blocks of 16 tokens. a and b both fit at admission; decoding past their blocks runs out.
    s = Scheduler(config(kv_cache_tokens=128, max_model_len=128, max_num_seqs=4,
                         enable_prefix_caching=False))
    a, b = Seq(48, 40, data="a"), Seq(48, 40, data="b")
    s.add(a)
    s.add(b)
    step(s)  # both prefill: 3 blocks each, 2 free
    preempted = []
    for _ in range(40):
        plan, out = step(s)
        preempted += plan.preempted
        if preempted:
            break
    assert names(preempted) == ["b"]  # the newest running request
    assert b.status == PREEMPTED and b.num_computed == 0 and b.blocks == []
    assert list(s.waiting) == [b]  # at the front of the waiting queue
    assert names(plan.seqs) == ["a"]  # no admission in a step that preempted
    produced = b.num_output
    # b comes back when a finishes, and prefills its prompt and its own tokens again.
    while b.status != RUNNING:
        plan, out = step(s)
    assert plan.batch.prefill == ((48 + produced, 0),)
    assert names(out.emitted)[-1] == "b" and b.num_output == produced + 1


def test_a_waiting_request_is_admitted_only_if_its_whole_prompt_fits_and_blocks_the_line():
    # 10 blocks. a holds 6; c's whole prompt (5 blocks) does not fit although its first chunk
    # (1 block) would; d behind it (1 block) would fit but waits: FCFS, head of line.
    s = Scheduler(config(kv_cache_tokens=160, max_model_len=160, max_num_batched_tokens=16,
                         max_num_seqs=4))
    a = Seq(96, 40, data="a")
    s.add(a)
    while a.num_output == 0:
        step(s)
    c, d = Seq(80, 2, data="c"), Seq(10, 2, data="d")
    s.add(c)
    s.add(d)
    plan, _ = step(s)
    assert names(plan.seqs) == ["a"] and names(s.waiting) == ["c", "d"]
    # Without the full-sequence reservation the first chunk alone would be admitted.
    s2 = Scheduler(config(kv_cache_tokens=160, max_model_len=160, max_num_batched_tokens=16,
                          max_num_seqs=4, reserve_full_isl=False))
    a2 = Seq(96, 40, data="a")
    s2.add(a2)
    while a2.num_output == 0:
        step(s2)
    s2.add(Seq(80, 2, data="c"))
    plan, _ = step(s2)
    assert names(plan.seqs) == ["a", "c"]


def test_prefix_cache_hits_are_whole_blocks_and_leave_the_last_token_to_compute():
    s = Scheduler(config(block_size=16))
    shared = list(range(40))
    a = Seq(40, 1, block_keys(shared, 16), data="a")
    s.add(a)
    step(s)
    assert s.cached_tokens == 32  # two full blocks of a's prompt (its third is partial)
    # Same first 35 tokens, then different: the hit is the two whole blocks, 32 tokens.
    b_ids = shared[:35] + [999] * 10
    b = Seq(45, 1, block_keys(b_ids, 16), data="b")
    s.add(b)
    plan, _ = step(s)
    assert plan.batch.prefill == ((45 - 32, 32),)
    # The identical 32-token prompt: at most 31 tokens may hit, so one block (16), not two.
    c = Seq(32, 1, block_keys(shared[:32], 16), data="c")
    s.add(c)
    plan, _ = step(s)
    assert plan.batch.prefill == ((16, 16),)
    assert s.stats()["hit_tokens"] == 32 + 16 and s.stats()["lookup_tokens"] == 40 + 45 + 32


def test_a_shared_prefix_hits_only_after_the_same_prefix():
    s = Scheduler(config())
    s.add(Seq(48, 1, block_keys(list(range(48))), data="a"))
    step(s)
    # The same second block after a different first one is no hit (keys chain).
    other = [7] * 16 + list(range(16, 48))
    b = Seq(48, 1, block_keys(other), data="b")
    s.add(b)
    plan, _ = step(s)
    assert plan.batch.prefill == ((48, 0),)


def test_freed_blocks_stay_cached_least_recently_used_first_tail_before_head():
    # 6 blocks. a finishes: its 2 full blocks stay cached, its partial third (unhashed) goes to
    # the front of the free queue. b takes that one and 2 never used; c then needs 3 blocks:
    # the last never used one, then the least recently used cached ones, a's tail before its head.
    s = Scheduler(config(kv_cache_tokens=96, max_model_len=96, max_num_seqs=4))
    a_ids = list(range(48))
    s.add(Seq(47, 1, block_keys(a_ids[:47]), data="a"))
    step(s)
    s.add(Seq(47, 1, block_keys([5000 + i for i in range(47)]), data="b"))
    step(s)
    assert s.cached_tokens == 4 * 16  # a's 2 full blocks, b's 2 (partial third blocks unhashed)
    s.add(Seq(40, 1, block_keys([9000 + i for i in range(40)]), data="c"))
    step(s)
    d = Seq(40, 1, block_keys(a_ids[:40]), data="d")  # a's first 2 blocks would hit
    s.add(d)
    plan, _ = step(s)
    # Of a's cached blocks the tail went first: the head (16 tokens) still hits.
    assert plan.batch.prefill == ((24, 16),)


def test_generated_tokens_enter_the_prefix_cache_once_their_block_is_full():
    s = Scheduler(config())
    ids = list(range(100, 110)) + list(range(20))  # 10 prompt tokens, then 20 generated
    a = Seq(10, 20, block_keys(ids), data="a")
    s.add(a)
    while not a.finished:
        step(s)
    # The next turn resends the prompt and the answer: its first block (prompt and 6 generated
    # tokens) hits.
    b = Seq(30, 1, block_keys(ids), data="b")
    s.add(b)
    plan, _ = step(s)
    assert plan.batch.prefill == ((14, 16),)


def test_a_request_finishes_at_max_tokens_or_at_the_context_limit():
    s = Scheduler(config(max_model_len=32, kv_cache_tokens=64))
    a = Seq(30, 10, data="a")
    s.add(a)
    outs: list[StepOutput] = []
    while not a.finished:
        outs.append(step(s)[1])
    assert a.num_output == 2 and a.num_tokens == 32  # stopped by max_model_len
    assert s.free_blocks == 4


def test_abort_frees_the_blocks_and_a_step_in_flight_skips_the_request():
    s = Scheduler(config())
    a, b = Seq(40, 10, data="a"), Seq(40, 10, data="b")
    s.add(a)
    s.add(b)
    step(s)
    plan = s.plan_step()
    s.abort(a)
    out = s.finish_step(plan)
    assert names(out.emitted) == ["b"] and a.finished and a.blocks == []
    assert names(s.running) == ["b"]
    s.abort(a)  # idempotent
    c = Seq(5, 5, data="c")
    s.add(c)
    s.abort(c)  # a waiting one leaves the queue
    assert not s.waiting


def test_watermark_keeps_blocks_free_when_admitting_beside_running_requests():
    s = Scheduler(config(kv_cache_tokens=160, max_model_len=160, watermark=0.3))  # 3 blocks
    a = Seq(64, 30, data="a")
    s.add(a)
    step(s)  # alone: no watermark, 4 blocks taken, 6 free
    s.add(Seq(64, 2, data="b"))  # 4 blocks + 3 held back > 6 free
    plan, _ = step(s)
    assert names(plan.seqs) == ["a"]


def test_without_chunked_prefill_a_prompt_over_the_budget_left_waits():
    s = Scheduler(config(max_num_batched_tokens=512, enable_chunked_prefill=False))
    s.add(Seq(500, 5, data="a"))
    step(s)
    s.add(Seq(100, 5, data="b"))
    s.add(Seq(10, 5, data="c"))
    plan, _ = step(s)
    assert names(plan.seqs) == ["a", "b", "c"]
    s.add(Seq(500, 5, data="d"))
    plan, _ = step(s)
    assert "d" not in names(plan.seqs)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="max_num_batched_tokens .* must be >= max_num_seqs"):
        config(max_num_seqs=100, max_num_batched_tokens=64)
    with pytest.raises(ValueError, match="kv_cache_tokens .* must hold one request"):
        config(kv_cache_tokens=256, max_model_len=512)
    with pytest.raises(ValueError, match="watermark"):
        config(watermark=1.0)
    with pytest.raises(ValueError, match="max_model_len"):
        config(enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="prompt"):
        Seq(0, 5)
    with pytest.raises(ValueError, match="does not fit max_model_len"):
        Scheduler(config()).add(Seq(512, 1))


def test_invariants_hold_under_a_random_load():
    """Blocks are conserved, budgets and limits respected, every request ends with max_tokens."""
    rng = random.Random(7)
    c = config(kv_cache_tokens=2048, max_model_len=512, max_num_seqs=16,
               max_num_batched_tokens=128, long_prefill_token_threshold=48)
    s = Scheduler(c)
    prefixes = [[rng.randrange(50) for _ in range(64)] for _ in range(3)]
    seqs = []
    for k in range(400):
        if rng.random() < 0.3 and len(seqs) < 120:
            p = rng.choice(prefixes) + [rng.randrange(10_000) for _ in range(rng.randint(1, 200))]
            q = Seq(len(p), rng.randint(1, 60), block_keys(p, c.block_size), data=len(seqs))
            seqs.append(q)
            s.add(q)
        if rng.random() < 0.02 and s.running:
            s.abort(rng.choice(s.running))
        plan = s.plan_step()
        assert plan.batch.tokens <= c.max_num_batched_tokens
        assert len(s.running) <= c.max_num_seqs
        s.finish_step(plan)
        held = sum(len(q.blocks) for q in s.running)
        shared = len({b for q in s.running for b in q.blocks})
        assert s.free_blocks + shared == c.num_blocks and held >= shared
        for q in s.running:
            assert len(q.blocks) == -(-q.num_computed // c.block_size)
    while s.has_work:
        s.finish_step(s.plan_step())
    assert s.free_blocks == c.num_blocks
    assert all(q.num_output == q.max_tokens for q in seqs if q.status != 4)
    assert s.preemptions > 0 and s.hit_tokens > 0  # the load exercised both


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_all_decoding_shortcut_plans_exactly_what_the_general_rules_plan(seed):
    """Same arrivals and aborts into two schedulers, one without the shortcut: every step's
    batch, tokens, finishes and preemptions are the same (KV tight enough to preempt)."""
    rng = random.Random(seed)
    c = config(kv_cache_tokens=640, max_model_len=512, max_num_seqs=12,
               max_num_batched_tokens=96)
    fast, slow = Scheduler(c), Scheduler(c)
    slow.fast = False
    pairs: list[tuple[Seq, Seq]] = []
    shortcut_steps = 0
    for _ in range(1500):
        if rng.random() < 0.15:
            n, m = rng.randint(1, 200), rng.randint(1, 150)
            ids = [rng.randrange(3) for _ in range(16)] + [rng.randrange(10**6) for _ in range(n)]
            keys = block_keys(ids)
            pair = (Seq(len(ids), m, keys, data=len(pairs)), Seq(len(ids), m, keys, data=len(pairs)))
            pairs.append(pair)
            fast.add(pair[0])
            slow.add(pair[1])
        if rng.random() < 0.01 and fast.running:
            k = rng.randrange(len(fast.running))
            a = fast.running[k]
            fast.abort(a)
            slow.abort(pairs[a.data][1])
        pf, ps = fast.plan_step(), slow.plan_step()
        shortcut_steps += pf.decoding > 0
        assert pf.batch == ps.batch and names(pf.seqs) == names(ps.seqs)
        assert names(pf.preempted) == names(ps.preempted)
        if rng.random() < 0.01 and pf.seqs:  # an abort while the step runs
            a = rng.choice(pf.seqs)
            if a.status == RUNNING:
                fast.abort(a)
                slow.abort(pairs[a.data][1])
        of, os_ = fast.finish_step(pf), slow.finish_step(ps)
        assert names(of.emitted) == names(os_.emitted)
        assert names(of.finished) == names(os_.finished)
        assert fast.free_blocks == slow.free_blocks
    assert shortcut_steps > 100 and fast.preemptions > 0
