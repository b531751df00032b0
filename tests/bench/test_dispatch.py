"""The dispatchers of the discrete-event model beyond one NGINX (bench/dispatch.py): the endpoint
picker's rules on small hand-checkable cases, nginx's consistent hash with its bound, K NGINX
instances, and the slots replicas' prefix cache."""

from __future__ import annotations

import math
import zlib
from collections import Counter
from dataclasses import dataclass, field

import pytest

from bench import des
from bench.dispatch import (
    Epp,
    EppConfig,
    EppRouter,
    Nginx,
    NginxRouter,
    chash_ring,
    epp_block_hashes,
    epp_prompt_text,
)


@dataclass
class FakeView:
    """What a dispatcher reads of the replicas, set by hand."""

    replicas: int
    capacity: int = 8
    q: list[int] = field(default_factory=list)
    kv: list[float] = field(default_factory=list)
    flight: list[int] = field(default_factory=list)
    cache_blocks: int | None = None
    block_size: int | None = None

    def __post_init__(self) -> None:
        n = self.replicas
        self.q = self.q or [0] * n
        self.kv = self.kv or [0.0] * n
        self.flight = self.flight or [0] * n

    def in_flight(self, r: int) -> int:
        return self.flight[r]

    def waiting(self, r: int) -> int:
        return self.q[r]

    def kv_usage(self, r: int) -> float:
        return self.kv[r]


@dataclass(frozen=True)
class J:
    arrival: float = 0.0
    session: str | None = None
    epp_hashes: tuple[int, ...] | None = None


def epp(view: FakeView, jobs=(), spec: Epp = Epp(), phases=None, seed: int = 1) -> EppRouter:
    return EppRouter(spec, list(jobs) or [J()] * 1000, view, seed,
                     phases=phases or [0.01 * (i + 1) for i in range(view.replicas)])


def scrape_all(r: EppRouter) -> float:
    """Run the router's scrapes until every replica was scraped once; the time reached."""
    seen: set[int] = set()
    t = 0.0
    while len(seen) < r.n:
        t = r.next_time()
        i = r._polls[0][1]
        r.at(t)
        seen.add(i)
    return t


# --- scorers ---------------------------------------------------------------------------------


def test_queue_scorer_is_min_max_normalised_and_one_when_all_equal() -> None:
    view = FakeView(3, q=[0, 2, 4])
    r = epp(view)
    scrape_all(r)
    # queue (1, 0.5, 0) x 2, KV use 0 everywhere (1 x 2), no prefix
    assert r.scores(()) == [4.0, 3.0, 2.0]
    view.q[:] = [3, 3, 3]
    scrape_all(r)
    assert r.scores(()) == [4.0, 4.0, 4.0]


def test_kv_scorer_is_one_minus_usage_weighted_two() -> None:
    r = epp(FakeView(2, kv=[0.25, 0.75]))
    scrape_all(r)
    assert r.scores(()) == [2 + 2 * 0.75, 2 + 2 * 0.25]


def test_prefix_scorer_counts_leading_blocks_until_no_replica_holds_one() -> None:
    r = epp(FakeView(3))
    r._record(0, (11, 12))
    r._record(1, (11, 12, 13))
    r._record(2, (14,))  # holds the 4th block but none before it
    # request 11, 12, 13, 14: replica 0 matches 2 of 4, replica 1 3 of 4, and replica 2 1 of
    # 4: the walk goes on while *some* replica holds each hash, and counts every holder
    assert r.scores((11, 12, 13, 14)) == [4 + 3 * 0.5, 4 + 3 * 0.75, 4 + 3 * 0.25]
    # a hash nobody holds ends the walk: 99 first means no match at all
    assert r.scores((99, 11, 12)) == [4.0, 4.0, 4.0]
    # a prompt shorter than a block has no hashes: prefix score 0 everywhere
    assert r.scores(()) == [4.0, 4.0, 4.0]


def test_weights_add_up_scorer_by_scorer() -> None:
    view = FakeView(2, q=[0, 1], kv=[0.5, 0.0])
    r = epp(view)
    scrape_all(r)
    r._record(0, (7,))
    # replica 0: queue 1 x 2 + (1 - 0.5) x 2 + 1 x 3 = 6; replica 1: 0 + 2 + 0 = 2
    assert r.scores((7,)) == [6.0, 2.0]
    heavy = epp(view, spec=Epp(EppConfig(queue_weight=10.0)))
    scrape_all(heavy)
    assert heavy.scores(()) == [10 + 1.0, 0 + 2.0]


def test_decisions_between_two_scrapes_see_the_same_numbers() -> None:
    view = FakeView(2, q=[0, 0], kv=[0.1, 0.5])
    r = epp(view, phases=[0.01, 0.03])
    scrape_all(r)  # both scraped by t = 0.03
    # the replicas change, the EPP does not see it until each one's next scrape
    view.kv[:] = [0.9, 0.0]
    picks = [r.arrive(j, 0.04)[0][1] for j in range(5)]
    assert picks == [0] * 5  # herding on the stale numbers
    assert r.next_time() == pytest.approx(0.06)  # replica 0's next scrape, 50 ms after its first
    r.at(r.next_time())
    assert r.arrive(5, 0.07) == [(5, 1)]  # replica 0 now reads 0.9


def test_ties_are_broken_uniformly_at_random() -> None:
    r = epp(FakeView(3), seed=7)
    scrape_all(r)
    picks = Counter(r.arrive(j, 0.05)[0][1] for j in range(900))
    assert set(picks) == {0, 1, 2}
    assert all(250 <= c <= 350 for c in picks.values()), picks


def test_the_prefix_index_is_an_lru_per_replica_sized_by_num_gpu_blocks() -> None:
    r = epp(FakeView(2, cache_blocks=2))
    r._record(0, (1, 2))
    r._record(0, (3,))  # evicts 1, the least recently added
    assert r.index == {2: 1, 3: 1}
    r._record(0, (2, 4))  # 2 refreshed, 3 evicted
    assert r.index == {2: 1, 4: 1}
    r._record(1, (2,))
    assert r.index[2] == 0b11
    assert epp(FakeView(2)).lru_capacity == 31250  # no vllm:cache_config_info: the default


def test_the_chosen_replica_records_the_request_and_wins_the_next_turn() -> None:
    hashes = tuple(range(10))
    jobs = [J(epp_hashes=hashes), J(epp_hashes=hashes + (10, 11))]
    view = FakeView(2, kv=[0.0, 0.2])
    r = epp(view, jobs)
    scrape_all(r)
    first = r.arrive(0, 0.05)[0][1]
    assert first == 0  # lower KV use
    view.kv[:] = [0.6, 0.0]
    scrape_all(r)
    # prefix 10 of 12 on replica 0: 2 x 1 + 2 x 0.4 + 3 x 10/12 = 5.3 > replica 1's 4
    assert r.arrive(1, 0.2)[0][1] == 0


def test_prompt_hashing_blocks_chain_and_model_seed() -> None:
    c = EppConfig()
    a = b"x" * 64 + b"y" * 64 + b"z" * 10
    b = b"x" * 64 + b"w" * 64
    ha, hb = epp_block_hashes(a, "m", c), epp_block_hashes(b, "m", c)
    assert len(ha) == 2 and len(hb) == 2  # 64-character blocks; the 10-byte tail is no block
    assert ha[0] == hb[0] and ha[1] != hb[1]
    assert epp_block_hashes(b"x" * 128, "m", c)[1] != epp_block_hashes(b"y" * 64 + b"x" * 64,
                                                                        "m", c)[1]  # chained
    assert epp_block_hashes(a, "other", c)[0] != ha[0]
    assert epp_block_hashes(b"x" * 63, "m", c) == ()
    assert len(epp_block_hashes(b"x" * (64 * 300), "m", c)) == 256
    assert epp_prompt_text([{"role": "user", "content": "hi"}]) == \
        b'[{"role":"user","content":"hi"}]'


# --- flow control ----------------------------------------------------------------------------


def test_saturation_is_the_mean_of_each_replicas_worst_ratio_and_stale_counts_one() -> None:
    view = FakeView(2, q=[5, 0], kv=[0.0, 0.4])
    r = epp(view, spec=Epp(flow_control=True))
    t = scrape_all(r)
    assert r.saturation(t) == pytest.approx((max(5 / 5, 0) + max(0, 0.4 / 0.8)) / 2)
    r.scraped[1] = t - 0.25  # older than 200 ms
    assert r.saturation(t) == pytest.approx((1.0 + 1.0) / 2)


def test_flow_control_holds_while_saturated_then_sends_one_per_millisecond() -> None:
    view = FakeView(2, q=[5, 5])
    r = epp(view, spec=Epp(flow_control=True), phases=[0.01, 0.02])
    scrape_all(r)  # saturation 1.0: hold
    assert r.arrive(0, 0.021) == [] and r.arrive(1, 0.022) == [] and r.arrive(2, 0.0225) == []
    assert r.busy() and r.next_time() == pytest.approx(0.06)  # only the next scrape matters
    view.q[:] = [0, 0]
    r.at(0.06)  # replica 0 now reads 0: saturation (0 + 1) / 2 = 0.5
    assert r.next_time() == pytest.approx(0.061)  # the next tick of the 1 ms ticker
    sent = r.at(0.061)
    assert [j for j, _ in sent] == [0]
    assert r.next_time() == pytest.approx(0.062)
    assert [j for j, _ in r.at(0.062)] == [1]
    # an arrival runs a cycle of its own: it sends the head (job 2), the newcomer waits
    assert [j for j, _ in r.arrive(3, 0.0625)] == [2]
    assert [j for j, _ in r.at(r.next_time())] == [3]
    assert not r.busy()


def test_without_the_path_header_every_request_takes_ngfs_random_two_least_conn() -> None:
    jobs = [des.Job(0.01 * i, 50, 20) for i in range(200)]
    p = des.Params(3, 4, 0.01, 0.0, 0.02, 0.001)
    fallback = des.simulate(jobs, p, Epp(path_header=False), seed=3)
    direct = des.simulate(jobs, p, Nginx("random_two_least_conn", 2), seed=3)
    assert fallback.replica == direct.replica


# --- NGINX: consistent hash, bound, K instances ------------------------------------------------


def test_the_ring_has_160_crc32_points_per_server_as_nginx_builds_it() -> None:
    hashes, owners = chash_ring(["10.0.0.1:8000", "10.0.0.2:8000"])
    assert len(hashes) == 320 and hashes == sorted(hashes)
    assert Counter(owners) == {0: 160, 1: 160}
    base = zlib.crc32(b"10.0.0.1\x008000")
    first = zlib.crc32((0).to_bytes(4, "little"), base)
    assert owners[hashes.index(first)] == 0


def test_a_session_sticks_and_the_bound_moves_it_along_the_ring() -> None:
    jobs = [J(session="chat-1")] * 10
    view = FakeView(3, capacity=2)
    r = NginxRouter(Nginx("session_hash_bounded", 1, 1.0), jobs, view, seed=1)
    home = r.arrive(0, 0.0)[0][1]
    assert r.arrive(1, 0.0)[0][1] == home  # bound 2: the home replica takes two
    third = r.arrive(2, 0.0)[0][1]
    assert third != home  # full: the next replica on the ring
    r.done(0, home)
    assert r.arrive(3, 0.0)[0][1] == home  # room again: back home
    unbounded = NginxRouter(Nginx("session_hash"), jobs, view, seed=1)
    assert {unbounded.arrive(j, 0.0)[0][1] for j in range(10)} == {home}


def test_every_replica_full_spills_to_least_conn_or_is_lost() -> None:
    jobs = [J(session=f"s{i}") for i in range(5)]
    view = FakeView(2, capacity=1)
    r = NginxRouter(Nginx("session_hash_bounded", 1, 1.0), jobs, view, seed=1)
    placed = [r.arrive(j, 0.0)[0][1] for j in range(4)]
    assert sorted(placed[:2]) == [0, 1]  # bound 1 each
    assert r.all_full == 2 and sorted(placed[2:]) == [0, 1]  # spilled, least_conn
    lost = NginxRouter(Nginx("session_hash_bounded", 1, 1.0, spill=False), jobs, view, seed=1)
    for j in range(2):
        lost.arrive(j, 0.0)
    assert lost.arrive(2, 0.0) == [] and lost.all_full == 1


def test_no_session_key_is_round_robin_skipping_full_replicas() -> None:
    jobs = [J()] * 10
    r = NginxRouter(Nginx("session_hash_bounded", 1, 1.0), jobs, FakeView(3, capacity=2), 1)
    assert [r.arrive(j, 0.0)[0][1] for j in range(5)] == [0, 1, 2, 0, 1]  # bound 2
    r.done(4, 1)
    assert r.arrive(5, 0.0)[0][1] == 2  # now 0 and 2 are full
    assert r.arrive(6, 0.0)[0][1] == 1  # the only one with room
    assert r.arrive(7, 0.0) and r.all_full == 1  # every replica full: spilled


def test_k_instances_count_only_their_own_requests_and_share_the_bound() -> None:
    spec = Nginx("session_hash_bounded", 2, 1.25)
    r = NginxRouter(spec, [J(session="a")] * 40, FakeView(2, capacity=8), seed=5)
    assert r.bound == math.ceil(1.25 * 8 / 2)
    for j in range(40):
        r.arrive(j, 0.0)
    per_instance = [inst.counts for inst in r.instances]
    assert all(sum(c) > 0 for c in per_instance)
    assert sum(map(sum, per_instance)) + sum(sum(i.spill_counts) for i in r.instances) == 40
    assert all(max(c) <= r.bound for c in per_instance)
    lc = NginxRouter(Nginx("least_conn", 4), [J()] * 8, FakeView(2), seed=2)
    for j in range(8):
        lc.arrive(j, 0.0)
    assert sum(map(sum, (i.counts for i in lc.instances))) == 8


def test_one_instance_of_a_plain_method_is_the_model_by_name() -> None:
    jobs = [des.Job(0.05 * i, 40, 30) for i in range(100)]
    p = des.Params(3, 2, 0.01, 0.0001, 0.02, 0.001)
    for m in ("round_robin", "least_conn", "random_two_least_conn"):
        assert des.simulate(jobs, p, Nginx(m), seed=4) == des.simulate(jobs, p, m, seed=4)


def test_the_slots_replicas_prefix_cache_shortens_a_shared_prefill() -> None:
    keys = tuple(range(8))  # 8 blocks of 16 tokens
    p = des.Params(1, 2, 0.01, 0.001, 0.02, 0.001, prefix_cache_tokens=1024)
    jobs = [des.Job(0.0, 130, 2, keys), des.Job(1.0, 130, 2, keys)]
    r = des.simulate(jobs, p, "fcfs")
    assert r.ttft[0] == pytest.approx(0.01 + 0.130)
    assert r.ttft[1] == pytest.approx(0.01 + 0.001 * (130 - 128))
    assert (r.hit_tokens, r.lookup_tokens) == (128, 260)
    off = des.simulate(jobs, des.Params(1, 2, 0.01, 0.001, 0.02, 0.001), "fcfs")
    assert off.ttft[1] == pytest.approx(0.140) and off.lookup_tokens == 0


def test_the_epp_in_the_model_sends_a_session_back_where_its_prefix_is() -> None:
    hashes = tuple(range(20))
    jobs = [des.Job(0.0, 320, 3, tuple(range(20)), "s", hashes),
            des.Job(2.0, 336, 3, tuple(range(21)), "s", hashes + (20,))]
    p = des.Params(4, 8, 0.01, 0.001, 0.02, 0.001, prefix_cache_tokens=4096)
    r = des.simulate(jobs, p, Epp(), seed=9)
    assert r.replica[1] == r.replica[0]
    assert r.hit_tokens == 320
