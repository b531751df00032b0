"""The GPU-regime model (server/engines/scheduler.py) held to vLLM 0.33.0's scheduler as read at
the tag (tests/contracts/data/vllm-0.33.0.scheduler.json): its defaults, and each rule, observed
by a small scenario run through the model and compared with the fact."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from components.pins import PINNED
from server.engines import scheduler as model
from server.engines.scheduler import Scheduler, SchedulerConfig, Seq, block_keys
from tests.contracts import facts

FACTS = facts.load("vllm", PINNED["vllm"] + ".scheduler")  # the pin's scheduler topic


def _cfg(**kw: Any) -> SchedulerConfig:
    base = dict(kv_cache_tokens=1024, max_model_len=512, max_num_seqs=8,
                max_num_batched_tokens=64)
    return SchedulerConfig(**{**base, **kw})


def _step(s: Scheduler) -> Any:
    plan = s.plan_step()
    s.finish_step(plan)
    return plan


def _names(seqs: Any) -> list:
    return [q.data for q in seqs]


# --- defaults ---------------------------------------------------------------------------------


def default_problems(f: dict[str, Any]) -> list[str]:
    d = f["defaults"]
    served = f["modelledServedDefault"]
    fields = {x.name: x.default for x in dataclasses.fields(SchedulerConfig)}
    expected = {
        "block_size": (model.DEFAULT_BLOCK_SIZE, d["block_size"]),
        "block_size (SchedulerConfig)": (fields["block_size"], d["block_size"]),
        "max_num_batched_tokens": (model.DEFAULT_MAX_NUM_BATCHED_TOKENS,
                                   d["max_num_batched_tokens"][served]),
        "max_num_seqs": (model.DEFAULT_MAX_NUM_SEQS, d["max_num_seqs"][served]),
        "enable_chunked_prefill": (fields["enable_chunked_prefill"], d["enable_chunked_prefill"]),
        "enable_prefix_caching": (fields["enable_prefix_caching"], d["enable_prefix_caching"]),
        "long_prefill_token_threshold": (fields["long_prefill_token_threshold"],
                                         d["long_prefill_token_threshold"]),
        "scheduler_reserve_full_isl": (fields["reserve_full_isl"],
                                       d["scheduler_reserve_full_isl"]),
        "watermark": (fields["watermark"], d["watermark"]),
    }
    problems = [f"{k}: the model has {ours!r}, vLLM {f['version']} {theirs!r}"
                for k, (ours, theirs) in expected.items() if ours != theirs]
    if d["policy"] != "fcfs":
        problems.append(f"policy: the model schedules fcfs, vLLM's default is {d['policy']}")
    if d["prefill_schedule_interval"] != 1:
        problems.append("prefill_schedule_interval: the model admits prefill on every step")
    return problems


def test_the_models_defaults_are_the_pinned_vllms():
    assert default_problems(FACTS) == []


def test_a_default_that_moved_upstream_would_be_caught():
    moved = copy.deepcopy(FACTS)
    moved["defaults"]["block_size"] = 32
    moved["defaults"]["max_num_batched_tokens"]["servedGpuAtLeast70GiBNotA100"] = 16384
    problems = default_problems(moved)
    assert any(p.startswith("block_size:") for p in problems)
    assert any(p.startswith("max_num_batched_tokens:") for p in problems)


# --- rules, observed ------------------------------------------------------------------------


def step_order() -> str:
    s = Scheduler(_cfg(max_num_batched_tokens=64))
    long = Seq(400, 5, data="long")
    s.add(long)
    _step(s)
    s.add(Seq(4, 5, data="short"))
    plan = _step(s)  # long's next chunk takes the whole budget
    return "running, then waiting" if _names(plan.seqs) == ["long"] else "waiting first"


def chunked_prefill() -> str:
    s = Scheduler(_cfg(max_num_batched_tokens=40))
    s.add(Seq(10, 50, data="a"))
    _step(s)
    s.add(Seq(200, 5, data="b"))
    plan = _step(s)
    if plan.batch.prefill == ((39, 0),):
        return "a prefill chunk is min(tokens left, budget left)"
    return f"first chunk {plan.batch.prefill}"


def decodes_share_prefill_steps() -> bool:
    s = Scheduler(_cfg(max_num_batched_tokens=40))
    s.add(Seq(10, 50, data="a"))
    _step(s)
    s.add(Seq(200, 5, data="b"))
    plan = _step(s)
    return bool(plan.batch.decode_kv) and bool(plan.batch.prefill)


def long_prefill_threshold_needs_eligible() -> int:
    """The fewest eligible requests (running + waiting) for which the threshold caps a chunk."""
    for eligible in (1, 2, 3):
        s = Scheduler(_cfg(max_num_batched_tokens=256, long_prefill_token_threshold=16))
        for k in range(eligible):
            s.add(Seq(100, 2, data=k))
        if s.plan_step().batch.prefill[0][0] == 16:
            return eligible
    return 0


def _preemption_scenario(**kw: Any) -> tuple[Scheduler, Seq, Seq, Seq, Any]:
    """8 blocks; a and b (3 blocks each) decode until the blocks run out; c (1 block) arrives in
    the step that preempts."""
    s = Scheduler(_cfg(kv_cache_tokens=128, max_model_len=128, max_num_seqs=4,
                       enable_prefix_caching=False, **kw))
    a, b, c = Seq(48, 40, data="a"), Seq(48, 40, data="b"), Seq(10, 2, data="c")
    s.add(a)
    s.add(b)
    _step(s)
    while True:
        if s.free_blocks == 0 and a.num_computed % 16 == 0:
            s.add(c)
        plan = s.plan_step()
        if plan.preempted:
            return s, a, b, c, plan
        s.finish_step(plan)


def preemption_victim() -> str:
    _, a, b, _, plan = _preemption_scenario()
    return {"b": "newest running", "a": "oldest running"}[_names(plan.preempted)[0]]


def preemption_mode() -> str:
    s, a, b, c, plan = _preemption_scenario()
    if b.num_computed or b.blocks:
        return "swap or keep"
    s.finish_step(plan)
    produced = b.num_output
    while b.status != model.RUNNING:
        plan = _step(s)
    return "recompute" if (plan.batch.prefill[-1] == (48 + produced, 0)) else "resume"


def preempted_requeued() -> str:
    s, *_ = _preemption_scenario()
    return "front" if _names(s.waiting) == ["b", "c"] else "back"


def waiting_admitted_in_a_step_that_preempted() -> bool:
    # Without the full-sequence check (and with a small budget), b's first chunk would fit the
    # blocks it just freed: only the rule keeps it (and c behind it) out of this step.
    *_, plan = _preemption_scenario(reserve_full_isl=False, max_num_batched_tokens=32)
    return bool({"b", "c"} & set(_names(plan.seqs)))


def max_num_seqs_bounds_running() -> bool:
    s = Scheduler(_cfg(max_num_seqs=2))
    for k in range(4):
        s.add(Seq(5, 3, data=k))
    plan = _step(s)
    return _names(plan.seqs) == [0, 1] and len(s.waiting) == 2


def _holder(s: Scheduler) -> None:
    a = Seq(96, 40, data="a")
    s.add(a)
    while a.num_output == 0:
        _step(s)


def waiting_order() -> str:
    for full in (True, False):  # the whole prompt, or (without that check) the first chunk
        s = Scheduler(_cfg(kv_cache_tokens=160, max_model_len=160, max_num_seqs=4,
                           reserve_full_isl=full))
        _holder(s)  # 7 of 10 blocks held once it decodes
        s.add(Seq(80, 2, data="big"))  # 5 blocks (4 for its first chunk): does not fit
        s.add(Seq(10, 2, data="small"))  # 1 block: would
        if _names(_step(s).seqs) != ["a"]:
            return "skips a request that does not fit"
    return "fcfs, stops at the first that does not fit"


def full_sequence_must_fit_at_admission() -> bool:
    s = Scheduler(_cfg(kv_cache_tokens=160, max_model_len=160, max_num_batched_tokens=16,
                       max_num_seqs=4))
    _holder(s)
    s.add(Seq(80, 2, data="big"))  # its first chunk (1 block) would fit, the whole prompt not
    return "big" not in _names(_step(s).seqs)


def watermark_only_beside_scheduled_requests() -> bool:
    alone = Scheduler(_cfg(kv_cache_tokens=160, max_model_len=160, watermark=0.5))
    alone.add(Seq(144, 2, data="a"))  # 9 of 10 blocks; 5 would be held back beside others
    beside = Scheduler(_cfg(kv_cache_tokens=320, max_model_len=160, watermark=0.5))
    beside.add(Seq(16, 50, data="x"))
    _step(beside)  # x runs, 2 blocks once it decodes: 18 of 20 free
    beside.add(Seq(144, 2, data="a"))  # 9 + 10 held back > 18 free
    return "a" in _names(_step(alone).seqs) and "a" not in _names(_step(beside).seqs)


def prefix_hit_max_tokens() -> str:
    s = Scheduler(_cfg())
    ids = list(range(40))
    s.add(Seq(40, 1, block_keys(ids), data="first"))
    _step(s)
    s.add(Seq(45, 1, block_keys(ids[:35] + [999] * 10), data="partial"))
    partial = s.plan_step().batch.prefill[0][1]
    s = Scheduler(_cfg())
    s.add(Seq(32, 1, block_keys(ids[:32]), data="first"))
    _step(s)
    s.add(Seq(32, 1, block_keys(ids[:32]), data="same"))
    same = s.plan_step().batch.prefill[0][1]
    if (partial, same) == (32, 16):
        return "num_tokens - 1, whole blocks"
    return f"hit {partial} of a 35-token match, {same} of an identical 32-token prompt"


def prefix_hit_needs_same_prefix() -> bool:
    s = Scheduler(_cfg())
    s.add(Seq(48, 1, block_keys(list(range(48))), data="a"))
    _step(s)
    s.add(Seq(48, 1, block_keys([7] * 16 + list(range(16, 48))), data="b"))
    return s.plan_step().batch.prefill == ((48, 0),)


def generated_blocks_cached() -> bool:
    s = Scheduler(_cfg())
    ids = list(range(100, 110)) + list(range(20))
    a = Seq(10, 20, block_keys(ids), data="a")
    s.add(a)
    while not a.finished:
        _step(s)
    s.add(Seq(30, 1, block_keys(ids), data="b"))
    return s.plan_step().batch.prefill == ((14, 16),)


def freed_blocks_evicted() -> str:
    s = Scheduler(_cfg(kv_cache_tokens=96, max_model_len=96, max_num_seqs=4))
    a_ids = list(range(48))
    s.add(Seq(47, 1, block_keys(a_ids[:47]), data="a"))
    _step(s)
    s.add(Seq(47, 1, block_keys([5000 + i for i in range(47)]), data="b"))
    _step(s)
    s.add(Seq(40, 1, block_keys([9000 + i for i in range(40)]), data="c"))
    _step(s)
    s.add(Seq(40, 1, block_keys(a_ids[:40]), data="d"))
    hit = s.plan_step().batch.prefill[0][1]
    return {16: "unhashed first, then least recently used, tail before head",
            32: "unhashed first, cached blocks kept", 0: "head before tail"}.get(hit, str(hit))


def finish_at() -> str:
    s = Scheduler(_cfg(max_model_len=32, kv_cache_tokens=64))
    capped = Seq(30, 10, data="capped")
    s.add(capped)
    done = Seq(5, 3, data="done")
    s.add(done)
    while s.has_work:
        _step(s)
    ok = (capped.num_tokens, capped.num_output, done.num_output) == (32, 2, 3)
    return "max_tokens or max_model_len" if ok else "other"


def waiting_counts_preempted() -> bool:
    s, *_ = _preemption_scenario()
    return len(s.waiting) == 2 and len(s.running) == 1


PROBES: dict[str, Callable[[], Any]] = {
    "stepOrder": step_order,
    "chunkedPrefill": chunked_prefill,
    "decodesSharePrefillSteps": decodes_share_prefill_steps,
    "longPrefillThresholdNeedsEligible": long_prefill_threshold_needs_eligible,
    "preemptionVictim": preemption_victim,
    "preemptionMode": preemption_mode,
    "preemptedRequeued": preempted_requeued,
    "waitingAdmittedInAStepThatPreempted": waiting_admitted_in_a_step_that_preempted,
    "maxNumSeqsBoundsRunning": max_num_seqs_bounds_running,
    "waitingOrder": waiting_order,
    "fullSequenceMustFitAtAdmission": full_sequence_must_fit_at_admission,
    "watermarkOnlyBesideScheduledRequests": watermark_only_beside_scheduled_requests,
    "prefixHitMaxTokens": prefix_hit_max_tokens,
    "prefixHitNeedsSamePrefix": prefix_hit_needs_same_prefix,
    "generatedBlocksCached": generated_blocks_cached,
    "freedBlocksEvicted": freed_blocks_evicted,
    "finishAt": finish_at,
    "waitingCountsPreempted": waiting_counts_preempted,
}


def rule_problems(f: dict[str, Any]) -> list[str]:
    problems = [f"{name}: vLLM {f['version']} has no such rule" for name in PROBES
                if name not in f["rules"]]
    problems += [f"{name}: not observed in the model" for name in f["rules"] if name not in PROBES]
    for name, expected in f["rules"].items():
        if name in PROBES and (seen := PROBES[name]()) != expected:
            problems.append(f"{name}: the model does {seen!r}, vLLM {f['version']} {expected!r}")
    return problems


def test_every_rule_and_default_cites_the_tag():
    for name in FACTS["rules"]:
        assert FACTS["sources"][f"rules.{name}"].startswith("vllm-project/vllm@v0.33.0:vllm/")
    for name in FACTS["defaults"]:
        assert any(k.startswith(f"defaults.{name}") or k == "defaults.servedDefaults"
                   for k in FACTS["sources"]), name


@pytest.mark.parametrize("rule", sorted(PROBES))
def test_the_model_follows_the_pinned_vllms_rule(rule):
    assert PROBES[rule]() == FACTS["rules"][rule]


def test_the_rules_and_their_observations_match_one_to_one():
    assert rule_problems(FACTS) == []


def test_a_rule_that_changed_upstream_would_be_caught():
    changed = copy.deepcopy(FACTS)
    changed["rules"]["preemptionVictim"] = "oldest running"
    changed["rules"]["preemptedRequeued"] = "back"
    problems = rule_problems(changed)
    assert any(p.startswith("preemptionVictim: the model does 'newest running'") for p in problems)
    assert any(p.startswith("preemptedRequeued:") for p in problems)
