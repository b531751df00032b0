"""Several models behind one local nginx, routed by the request's `model` field: real sim
replicas (each serving its own name) and a real nginx on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
from rich.console import Console

from local import LocalCluster
from local.__main__ import banner
from local.cluster import REPO_ROOT
from local.models import LocalModel
from local.top import Top, render
from tests.local.support import FAST_SIM, served

Make = Callable[..., LocalCluster]
A, B = "team/alpha-chat", "beta:v2"


def _two_models(make_cluster: Make, **kwargs: object) -> LocalCluster:
    return make_cluster(models=[LocalModel(A, replicas=2), LocalModel(B, replicas=2)],
                        **kwargs)


def _chat(cluster: LocalCluster, body: dict[str, object]) -> httpx.Response:
    return httpx.post(cluster.endpoint + "/chat/completions", timeout=10, json=body,
                      headers={"Authorization": f"Bearer {cluster.api_key}"})


def _ask(model: str) -> dict[str, object]:
    return {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}


def _counts(cluster: LocalCluster) -> dict[str, int]:
    """Requests each model's replicas finished, from the replicas' own metrics."""
    totals = {name: 0 for name in cluster.model_names}
    for url, name in zip(cluster.replica_urls, cluster.replica_models):
        totals[name] += served(url)
    return totals


def test_each_model_is_served_only_by_its_own_replicas(make_cluster: Make) -> None:
    cluster = _two_models(make_cluster)
    assert cluster.model_names == [A, B]
    assert cluster.replica_models == [A, A, B, B]  # consecutive ports, model after model
    ports = [int(url.rsplit(":", 1)[1]) for url in cluster.replica_urls]
    assert ports == [cluster.first_replica_port + i for i in range(4)]

    for _ in range(10):
        answer = _chat(cluster, _ask(A))
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == A
    assert _counts(cluster) == {A: 10, B: 0}

    # B's requests, spelled as other JSON encoders write them: escaped ':' and no spaces do not
    # matter, nor does a "model" key inside a message.
    bodies = [
        b'{"model":"beta\\u003av2","max_tokens":1,"messages":[{"role":"user","content":"x"}]}',
        b'{"messages":[{"role":"user","content":"{\\"model\\": \\"' + A.encode()
        + b'\\"}"}],\n "max_tokens": 1,\n "model" : "beta:v2"}',
    ] * 3
    for body in bodies:
        answer = httpx.post(cluster.endpoint + "/chat/completions", timeout=10, content=body,
                            headers={"Authorization": f"Bearer {cluster.api_key}",
                                     "Content-Type": "application/json"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == B
    assert _counts(cluster) == {A: 10, B: 6}


def test_an_unknown_model_gets_a_404_naming_every_model(make_cluster: Make) -> None:
    cluster = _two_models(make_cluster)
    answer = _chat(cluster, _ask("gpt-unknown"))
    assert answer.status_code == 404
    assert answer.headers["content-type"].startswith("application/json")
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "model"
    assert error["code"] == "model_not_found"
    assert "`gpt-unknown`" in error["message"]
    assert f"`{A}`" in error["message"] and f"`{B}`" in error["message"]
    assert _counts(cluster) == {A: 0, B: 0}  # no replica saw it

    client = openai.OpenAI(base_url=cluster.endpoint, api_key=cluster.api_key, max_retries=0)
    try:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    except openai.NotFoundError as exc:
        assert exc.code == "model_not_found"
    else:
        raise AssertionError("no 404 for an unknown model")


def test_a_body_without_a_model_is_answered_by_the_replicas(make_cluster: Make) -> None:
    """No `model` (or not JSON): the first model's replicas answer, as in single-model mode."""
    cluster = _two_models(make_cluster)
    missing = _chat(cluster, {"messages": [{"role": "user", "content": "hi"}]})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
    broken = httpx.post(cluster.endpoint + "/chat/completions", content=b'{"model": "beta:v2"',
                        headers={"Authorization": f"Bearer {cluster.api_key}"}, timeout=10)
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"


def test_models_lists_every_model_behind_the_key(make_cluster: Make) -> None:
    cluster = _two_models(make_cluster)
    client = openai.OpenAI(base_url=cluster.endpoint, api_key=cluster.api_key, max_retries=0)
    assert [m.id for m in client.models.list()] == [A, B]
    wrong = openai.OpenAI(base_url=cluster.endpoint, api_key="wrong", max_retries=0)
    try:
        wrong.models.list()
    except openai.AuthenticationError as exc:
        assert exc.code == "invalid_api_key"
    else:
        raise AssertionError("the model list was served without the key")


def test_a_routed_stream_arrives_chunk_by_chunk(make_cluster: Make) -> None:
    # 20 tokens x 50 ms: the stream lasts about a second.
    cluster = _two_models(make_cluster, server_env={**FAST_SIM, "LLM_SIM_DECODE_BASE_MS": "50"})
    arrivals: list[float] = []
    start = time.monotonic()
    with httpx.stream("POST", cluster.endpoint + "/chat/completions", timeout=10,
                      headers={"Authorization": f"Bearer {cluster.api_key}"},
                      json={"model": B, "stream": True, "max_tokens": 20,
                            "messages": [{"role": "user", "content": "hi"}]}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content":" ' in line:
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 20
    assert arrivals[-1] >= 0.9
    assert arrivals[0] < 0.3, f"first token after {arrivals[0]:.2f} s: nginx buffered"
    assert arrivals[9] < arrivals[-1] - 0.3  # the middle, too, arrives before the end
    assert _counts(cluster) == {A: 0, B: 1}


def test_status_top_and_banner_show_each_model(make_cluster: Make, tmp_path: Path) -> None:
    cluster = _two_models(make_cluster, workdir=tmp_path / "run")
    text = banner(cluster)
    assert f"models    {A}, {B}" in text and f'"model": "{A}"' in text

    status = subprocess.run([sys.executable, "-m", "local", "status", "--workdir",
                             str(tmp_path / "run")], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=30, check=False)
    assert status.returncode == 0, status.stderr
    assert f"models {A}, {B}" in status.stdout
    replica_lines = [line for line in status.stdout.splitlines() if "replica" in line]
    assert [line.split()[-1] for line in replica_lines] == [A, A, B, B]

    top = Top(workdir=tmp_path / "run")
    with httpx.Client(timeout=2) as client:
        frame = top.frame(top.scrape(client))
    assert [row.model for row in frame.rows] == [A, A, B, B]
    console = Console(record=True, width=120)
    console.print(render(frame))
    shown = console.export_text()
    assert "model" in shown and shown.count(A) == 2 and shown.count(B) == 2


def test_a_stack_s_models_start_as_their_deployments_do() -> None:
    """models_from_stack: each model of the stack's `models` list, with its own replica count
    (or the stack's), its own autoscaling minimum when the stack autoscales (as its Deployment
    starts in the cluster), --replicas over all, each model's id for the transformers engine."""
    import copy

    from components.config.parse import parse_stack_config
    from local.models import models_from_stack
    from tests.infra.test_models import TWO_MODELS

    static = copy.deepcopy(TWO_MODELS)
    static["autoscaling"] = {"enabled": False}
    del static["models"][1]["autoscaling"]
    assert [(m.served_name, m.replicas) for m in models_from_stack(parse_stack_config(static))] \
        == [("qwen-small", 2), ("coder", 3)]
    # Autoscaled: the stack's minimum (1) for the first, the coder's own (2) for the second.
    scaled = models_from_stack(parse_stack_config(TWO_MODELS))
    assert [(m.served_name, m.replicas) for m in scaled] == [("qwen-small", 1), ("coder", 2)]
    assert [m.replicas for m in models_from_stack(parse_stack_config(static), replicas=1)] \
        == [1, 1]
    loaded = models_from_stack(parse_stack_config(static), engine="transformers")
    assert [m.model_id for m in loaded] == ["Qwen/Qwen2.5-0.5B-Instruct",
                                            "Qwen/Qwen2.5-Coder-0.5B-Instruct"]
