"""The batched transformers engine: one step loop for every sequence, on the tiny float32 model.

Most tests drive :class:`StepLoop` step by step on the test's own thread, so which sequences
share a step is decided by the test, not by timing. The HTTP tests at the end go through a real
uvicorn server and the engine's thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.engines.base import SamplingParams, Token

from .support import RunningServer, tiny_transformers_server

torch = pytest.importorskip("torch")

from server.engines.batching import Sequence, StepLoop  # noqa: E402
from server.engines.sampling import IncrementalDetokenizer, sample  # noqa: E402
from server.engines.transformers import CHECK_TOLERANCE  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    return model, tok


def make_loop(tiny: tuple[Any, Any], **kw: Any) -> StepLoop:
    model, tok = tiny
    kw.setdefault("slots", 8)
    kw.setdefault("context", 256)
    kw.setdefault("eos", frozenset({tok.eos_token_id}))
    return StepLoop(torch, model, tok, **kw)


class Run:
    """Sequences submitted to one loop, and everything delivered to them."""

    def __init__(self, loop: StepLoop) -> None:
        self.loop = loop
        self.items: dict[Sequence, list[Any]] = {}

    def deliver(self, items: list[tuple[Sequence, Any]]) -> None:
        for seq, item in items:
            self.items[seq].append(item)

    def submit(self, prompt: list[int], max_tokens: int = 24, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None) -> Sequence:
        gen = None
        if temperature > 0:
            gen = torch.Generator().manual_seed(seed or 0)
        seq = Sequence(prompt=list(prompt), params=SamplingParams(max_tokens, temperature,
                                                                  top_p, seed),
                       deliver=self.deliver, generator=gen,
                       detok=IncrementalDetokenizer(self.loop.tokenizer))
        self.items[seq] = []
        self.loop.submit(seq)
        return seq

    def steps(self, n: int = 1) -> None:
        with torch.inference_mode():
            for _ in range(n):
                self.loop.step()

    def finish(self) -> None:
        for _ in range(10_000):
            if all(s.done for s in self.items):
                return
            self.steps()
        raise AssertionError("sequences did not finish")

    def text(self, seq: Sequence) -> str:
        return "".join(i.text for i in self.items[seq])


def prompts(tok: Any) -> list[list[int]]:
    texts = ["Kubernetes schedules pods onto nodes.", "A", "Load balancers spread requests "
             "across replicas of a service, and streaming responses send tokens early.",
             "The quick brown fox", "Streaming responses", "predicts the next token",
             "restarts them when they fail. " * 3, "lazy dog"]
    return [list(tok(t)["input_ids"]) for t in texts]


def alone(tiny: tuple[Any, Any], prompt: list[int], **params: Any) -> tuple[list[int], Any]:
    run = Run(make_loop(tiny))
    seq = run.submit(prompt, **params)
    run.finish()
    return seq.detok.ids, run.items[seq][-1].finish_reason


def with_seven_others(tiny: tuple[Any, Any], prompt: list[int], bucketed: bool = False,
                      **params: Any) -> tuple[list[int], Any, StepLoop]:
    """``prompt`` in a batch of 8: three others go first (they finish early, so the target's
    slot moves), four join two steps later; others sample or decode greedily."""
    loop = make_loop(tiny, bucketed=bucketed)
    run = Run(loop)
    others = prompts(tiny[1])
    for i in range(3):
        run.submit(others[i], max_tokens=5 + 4 * i, temperature=0.7 * (i % 2), seed=i)
    target = run.submit(prompt, **params)
    run.steps(2)
    for i in range(3, 7):
        run.submit(others[i], max_tokens=30 + i, temperature=1.0 if i % 2 else 0.0, seed=i)
    run.finish()
    return target.detok.ids, run.items[target][-1].finish_reason, loop


@pytest.mark.parametrize("bucketed", [False, True], ids=["eager", "bucketed"])
def test_greedy_tokens_are_the_same_alone_and_with_seven_others(tiny, bucketed: bool) -> None:
    prompt = list(tiny[1]("Tell me about load balancers.")["input_ids"])
    ids, finish = alone(tiny, prompt, max_tokens=40)
    assert len(ids) >= 10  # a real comparison, not an immediate end of sequence
    got, got_finish, loop = with_seven_others(tiny, prompt, bucketed=bucketed, max_tokens=40)
    assert (got, got_finish) == (ids, finish)
    assert loop.stats.max_batch == 8  # the eight really shared decode steps


def test_seeded_sampling_is_the_same_alone_and_with_seven_others(tiny) -> None:
    prompt = list(tiny[1]("Pods run on nodes")["input_ids"])
    for top_p in (1.0, 0.8):
        params = dict(max_tokens=30, temperature=1.0, top_p=top_p, seed=21)
        ids, finish = alone(tiny, prompt, **params)
        assert len(ids) >= 10
        got, got_finish, _ = with_seven_others(tiny, prompt, **params)
        assert (got, got_finish) == (ids, finish)
        other_seed, _ = alone(tiny, prompt, **{**params, "seed": 22})
        assert other_seed != ids


def test_the_kv_cache_grows_under_running_sequences_without_changing_them(tiny) -> None:
    prompt = prompts(tiny[1])[2]  # ~25 tokens: 16 -> 32 -> 64 -> 128 positions
    small = make_loop(tiny, initial_capacity=16)
    run = Run(small)
    a = run.submit(prompt, max_tokens=80)
    b = run.submit(prompts(tiny[1])[0], max_tokens=80)
    run.finish()
    assert small.cache.capacity >= len(prompt) + len(a.detok.ids)
    assert (a.detok.ids, b.detok.ids) == (alone(tiny, prompt, max_tokens=80)[0],
                                          alone(tiny, prompts(tiny[1])[0], max_tokens=80)[0])


def test_a_cancelled_sequence_leaves_at_the_next_step_and_the_others_are_unchanged(tiny) -> None:
    loop = make_loop(tiny)
    run = Run(loop)
    ps = prompts(tiny[1])
    seqs = [run.submit(p, max_tokens=20) for p in ps[:3]]
    run.steps(3)
    assert loop.running == 3
    loop.cancel(seqs[0])  # slot 0: the last running sequence moves into it
    run.steps(1)
    assert loop.running == 2 and seqs[0].done and seqs[0].slot == -1
    produced = len(run.items[seqs[0]])
    run.finish()
    assert len(run.items[seqs[0]]) == produced  # nothing after the cancel
    for seq, p in zip(seqs[1:], ps[1:3]):
        assert seq.detok.ids == alone(tiny, p, max_tokens=20)[0]


def test_max_tokens_usage_and_end_of_sequence(tiny) -> None:
    prompt = prompts(tiny[1])[0]
    run = Run(make_loop(tiny))
    one = run.submit(prompt, max_tokens=1)
    run.finish()
    assert [i.finish_reason for i in run.items[one]] == ["length"]
    first = one.detok.ids[0]
    # the same greedy first token, declared end-of-sequence: the stream ends with `stop`
    run = Run(make_loop(tiny, eos=frozenset({first})))
    seq = run.submit(prompt, max_tokens=10)
    run.finish()
    assert run.items[seq] == [Token("", "stop")]
    assert seq.detok.ids == []


def test_a_failed_step_fails_its_sequences_and_the_loop_goes_on(tiny, monkeypatch) -> None:
    loop = make_loop(tiny)
    run = Run(loop)
    prompt = prompts(tiny[1])[0]
    broken = run.submit(prompt, max_tokens=10)
    real = loop._forward_decode

    def fail_once(*args: Any) -> Any:
        monkeypatch.setattr(loop, "_forward_decode", real)
        raise RuntimeError("device on fire")

    monkeypatch.setattr(loop, "_forward_decode", fail_once)
    run.steps(1)
    assert isinstance(run.items[broken][-1], RuntimeError) and broken.done
    assert loop.running == 0 and loop.stats.errors == 1
    again = run.submit(prompt, max_tokens=10)
    run.finish()
    assert again.detok.ids == alone(tiny, prompt, max_tokens=10)[0]


def test_a_failed_prefill_fails_only_the_new_sequences(tiny, monkeypatch) -> None:
    loop = make_loop(tiny)
    run = Run(loop)
    ps = prompts(tiny[1])
    running = run.submit(ps[0], max_tokens=20)
    run.steps(2)
    real = loop.model

    def fail_next_prefill(**kw: Any) -> Any:
        if kw["input_ids"].shape[1] > 1:
            monkeypatch.setattr(loop, "model", real)
            raise RuntimeError("out of memory")
        return real(**kw)

    monkeypatch.setattr(loop, "model", fail_next_prefill)
    newcomer = run.submit(ps[2], max_tokens=20)
    run.steps(1)
    assert isinstance(run.items[newcomer][-1], RuntimeError) and newcomer.slot == -1
    assert loop.running == 1 and not running.done
    run.finish()
    assert running.detok.ids == alone(tiny, ps[0], max_tokens=20)[0]


class _IgnoresTheCache(torch.nn.Module):
    """A model whose attention would not use the engine's cache: what the load check catches."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, cache: Any = None, logits_to_keep: Any = 0, **kw: Any) -> Any:
        kw["attention_mask"] = None
        kw["use_cache"] = False
        out = self.inner(**kw)
        if not isinstance(logits_to_keep, int):
            out.logits = out.logits.gather(
                1, logits_to_keep.unsqueeze(-1).expand(-1, -1, out.logits.shape[-1]))
        return out


def test_the_load_check_accepts_the_model_and_rejects_one_that_ignores_the_cache(tiny) -> None:
    prompt = prompts(tiny[1])[0]
    assert make_loop(tiny).check_against_model(prompt) < 1e-4
    broken = StepLoop(torch, _IgnoresTheCache(tiny[0]), tiny[1], slots=2, context=256,
                      eos=frozenset())
    # rejected even at the loosest tolerance (16-bit weights)
    assert broken.check_against_model(prompt) > max(CHECK_TOLERANCE.values())


def test_incremental_detokenisation_equals_a_full_decode_and_reads_a_short_window(tiny) -> None:
    tok = tiny[1]
    windows: list[int] = []

    class Counting:
        def decode(self, ids: list[int], **kw: Any) -> str:
            windows.append(len(ids))
            return tok.decode(ids, **kw)

    text = "Ünïcödé façade — naïve 日本語 tokens 🚀 and plain words. " * 6
    gen = torch.Generator().manual_seed(3)
    for ids in (list(tok(text, add_special_tokens=False)["input_ids"]),
                torch.randint(0, len(tok), (300,), generator=gen).tolist()):  # invalid UTF-8
        windows.clear()
        detok = IncrementalDetokenizer(Counting())
        out = "".join(detok.add(i) for i in ids) + detok.flush()
        assert out == tok.decode(ids, skip_special_tokens=True,
                                 clean_up_tokenization_spaces=False)
        # a window grows only while a character is incomplete: never the whole output again
        assert len(ids) > 200 and max(windows) <= 16
    assert out != ""


def test_batched_sampling_rows_do_not_depend_on_their_neighbours() -> None:
    vocab = 50
    draws: dict[int, list[list[int]]] = {1: [], 4: []}
    for batch in (1, 4):
        gens = [torch.Generator().manual_seed(s) for s in (7, 8, 9, 10)][:batch]
        temps, tops = [1.0, 0.5, 0.0, 1.3][:batch], [0.9, 1.0, 1.0, 0.5][:batch]
        data = torch.Generator().manual_seed(0)
        for _ in range(40):
            logits = torch.randn(4, vocab, generator=data)[:batch]
            draws[batch].append(sample(torch, logits, temps, tops, gens).tolist())
    assert [d[0] for d in draws[1]] == [d[0] for d in draws[4]]
    assert len({d[0] for d in draws[1]}) > 5  # it samples, it is not argmax
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(1))
    greedy = logits.argmax(-1).tolist()
    assert sample(torch, logits, [0.0] * 3, [1.0] * 3, [None] * 3).tolist() == greedy
    tiny_nucleus = sample(torch, logits, [1.0] * 3, [1e-6] * 3,
                          [torch.Generator().manual_seed(s) for s in range(3)])
    assert tiny_nucleus.tolist() == greedy


# --- through a real server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def eight_slots(tiny_model_dir: Path) -> Iterator[RunningServer]:
    with tiny_transformers_server(tiny_model_dir, max_concurrency=8) as srv:
        yield srv


def _complete(srv: RunningServer, prompt: str, **kw: Any) -> dict:
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 40, **kw}
    resp = httpx.post(srv.base_url + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_over_http_greedy_and_seeded_text_do_not_change_with_seven_others(eight_slots) -> None:
    target = [dict(temperature=0), dict(temperature=1.0, seed=5)]
    solo = [_complete(eight_slots, "Pods run on nodes", **kw) for kw in target]
    steps = eight_slots.state.engine._loop.stats
    before = steps.decode_tokens, steps.decode_steps
    others = [dict(prompt=f"Replica {i} of a service", temperature=1.0, seed=i,
                   max_tokens=30 + i) for i in range(7)]
    for kw in target:
        with ThreadPoolExecutor(8) as pool:
            jobs = [pool.submit(_complete, eight_slots, o.pop("prompt"), **o)
                    for o in [dict(x) for x in others]]
            mine = _complete(eight_slots, "Pods run on nodes", **kw)
            [j.result() for j in jobs]
        assert mine["choices"][0]["text"] == solo[target.index(kw)]["choices"][0]["text"]
        assert mine["usage"] == solo[target.index(kw)]["usage"]
    tokens, decode_steps = (steps.decode_tokens - before[0], steps.decode_steps - before[1])
    assert tokens / decode_steps > 2  # the requests were batched, not run one by one
    card = httpx.get(eight_slots.base_url + "/v1/models").json()["data"][0]
    assert card["batching"]["slots"] == 8 and card["batching"]["step_errors"] == 0
