"""The official openai client against both engines, streaming and not."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from .support import RunningServer


@pytest.fixture(params=["sim", "transformers"])
def server(request: pytest.FixtureRequest) -> RunningServer:
    if request.param == "sim":
        return request.getfixturevalue("shared_sim")
    return request.getfixturevalue("hf_server")


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def model_name(server: RunningServer) -> str:
    return server.state.settings.model_name


MSG = [{"role": "user", "content": "Tell me about load balancers."}]


def chat(server: RunningServer, **kw):
    return client(server).chat.completions.create(model=model_name(server), messages=MSG, **kw)


def stream_chat(server: RunningServer, **kw) -> tuple[str, list]:
    chunks = list(client(server).chat.completions.create(
        model=model_name(server), messages=MSG, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_models_lists_the_served_model(server: RunningServer) -> None:
    models = client(server).models.list().data
    assert [m.id for m in models] == [model_name(server)]
    card = models[0].model_dump()
    assert card["simulated"] is (server.state.engine.kind == "sim")
    assert card["max_model_len"] == server.state.engine.context_length


def test_chat_usage_and_max_tokens(server: RunningServer) -> None:
    resp = chat(server, max_tokens=7, seed=3)
    u = resp.usage
    assert u is not None and u.prompt_tokens > 0
    assert 1 <= u.completion_tokens <= 7
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert resp.model == model_name(server)
    assert resp.choices[0].message.role == "assistant"
    if server.state.engine.kind == "sim":  # the sim never ends early: exactly max_tokens
        assert u.completion_tokens == 7 and resp.choices[0].finish_reason == "length"


def test_prompt_tokens_match_the_engine_tokenizer(server: RunningServer) -> None:
    expected = len(server.state.engine.encode_chat(MSG))
    assert chat(server, max_tokens=2).usage.prompt_tokens == expected


def test_same_seed_same_text_different_seed_differs(server: RunningServer) -> None:
    a = chat(server, max_tokens=16, seed=11, temperature=1.0).choices[0].message.content
    b = chat(server, max_tokens=16, seed=11, temperature=1.0).choices[0].message.content
    c = chat(server, max_tokens=16, seed=12, temperature=1.0).choices[0].message.content
    assert a == b
    assert a != c


def test_stream_matches_non_stream(server: RunningServer) -> None:
    full = chat(server, max_tokens=12, seed=5)
    text, chunks = stream_chat(server, max_tokens=12, seed=5,
                               stream_options={"include_usage": True})
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")


def _long_text(server: RunningServer, **kw) -> tuple[int, str]:
    for seed in range(20):  # a random model may emit end-of-sequence early: find a long one
        text = chat(server, max_tokens=24, seed=seed, **kw).choices[0].message.content
        if len(text) >= 8:
            return seed, text
    pytest.fail("no seed produced 8 characters")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text(server: RunningServer, stream: bool) -> None:
    seed, text = _long_text(server)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    expected = text[: text.find(stop)]
    if stream:
        got, chunks = stream_chat(server, max_tokens=24, seed=seed, stop=[stop, "\x00never"])
        reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        resp = chat(server, max_tokens=24, seed=seed, stop=stop)
        got, reason = resp.choices[0].message.content, resp.choices[0].finish_reason
    assert got == expected
    assert reason == "stop"


def test_completions_stream_and_not(server: RunningServer) -> None:
    c = client(server)
    full = c.completions.create(model=model_name(server), prompt="Pods run on nodes",
                                max_tokens=10, seed=9)
    assert full.object == "text_completion"
    assert full.usage.prompt_tokens == len(server.state.engine.encode_text("Pods run on nodes"))
    assert 1 <= full.usage.completion_tokens <= 10
    chunks = list(c.completions.create(model=model_name(server), prompt="Pods run on nodes",
                                       max_tokens=10, seed=9, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_greedy_and_tiny_top_p_agree(server: RunningServer) -> None:
    greedy = chat(server, max_tokens=12, temperature=0).choices[0].message.content
    assert chat(server, max_tokens=12, temperature=0).choices[0].message.content == greedy
    if server.state.engine.kind == "transformers":
        # top_p that keeps only the most likely token is greedy, whatever the seed
        for seed in (1, 2):
            nucleus = chat(server, max_tokens=12, temperature=1.0, top_p=1e-6, seed=seed)
            assert nucleus.choices[0].message.content == greedy


def test_unknown_model_is_404(server: RunningServer) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client(server).chat.completions.create(model="nope", messages=MSG)
    assert exc.value.body["code"] == "model_not_found"
    assert exc.value.body["param"] == "model"


def test_seed_is_reproducible_under_concurrency(server: RunningServer) -> None:
    # Each request samples with its own generator: neighbours must not shift the random stream.
    def one(seed: int) -> str:
        return chat(server, max_tokens=10, seed=seed, temperature=1.0).choices[0].message.content

    alone = one(21)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, [21, 22, 21, 23]))
    assert results[0] == results[2] == alone
