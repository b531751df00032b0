"""`python -m local` in a subprocess: the printed examples work, `down` stops it, errors."""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from local.__main__ import EXAMPLE_MAX_TOKENS
from local.cluster import REPO_ROOT
from local.procs import port_in_use
from tests.local.support import FAST_SIM, assert_gone, free_port_range, processes_with

CLI = [sys.executable, "-m", "local"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, **FAST_SIM, **extra}


def _run(*args: str, env: dict[str, str] | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=REPO_ROOT, env=env or _env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


def _assert_user_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def _up_args(base: int, workdir: Path, replicas: int = 2) -> list[str]:
    return ["up", "--replicas", str(replicas), "--port", str(base),
            "--first-port", str(base + 1), "--workdir", str(workdir)]


class _Lines:
    """Read a process's stdout on a thread so waiting for a line has a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert proc.stdout is not None
        out = proc.stdout
        threading.Thread(target=lambda: [self.lines.put(line) for line in out],
                         daemon=True).start()

    def until(self, needle: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            self.seen.append(line)
            if needle in line:
                return "".join(self.seen)
        raise AssertionError(f"no {needle!r} in output:\n{''.join(self.seen)}")


@pytest.fixture
def up(tmp_path: Path):
    """Run `python -m local up` in the background; make sure it is gone afterwards."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> tuple[subprocess.Popen[str], _Lines]:
        # A terminal's Ctrl-C: the child gets the default SIGINT even when the suite itself
        # was started with SIGINT ignored (e.g. in the background), which children inherit.
        proc = subprocess.Popen([*CLI, *args], cwd=REPO_ROOT, env=_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        procs.append(proc)
        return proc, _Lines(proc)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the supervisor stops its cluster itself
            proc.wait(timeout=30)


def test_up_prints_working_examples_and_down_stops_it(up, tmp_path: Path) -> None:
    base = free_port_range(3)
    workdir = tmp_path / "run"
    proc, out = up(*_up_args(base, workdir), "--policy", "round_robin", "--api-key", "k-123")
    text = out.until("stops everything")
    assert "replica 1/2 on :" in text and "replica 2/2 on :" in text
    assert f"endpoint  http://127.0.0.1:{base}/v1" in text and "api key   k-123" in text

    # The curl example, pasted into a shell as printed, streams a completion.
    curl = text[text.index("curl -N"):text.index("\n\n", text.index("curl -N"))]
    result = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 0 and "chat.completion.chunk" in result.stdout
    assert result.stdout.rstrip().endswith("data: [DONE]")
    # A short answer: the example sets max_tokens (the sim engine writes that many words;
    # without it the server's default 256 streamed for about 10 s).
    chunks = [line for line in result.stdout.splitlines() if '"content"' in line]
    assert 5 <= len(chunks) <= EXAMPLE_MAX_TOKENS + 1

    # So does the Python example, pasted into a shell as printed: it names the interpreter
    # that has the openai package (the one running local mode).
    start = text.index(" - <<'EOF'\n")
    start = text.rindex("\n", 0, start) + 1
    snippet = text[start:text.index("\nEOF\n", start) + len("\nEOF\n")]
    assert Path(REPO_ROOT, shlex.split(snippet)[0]).resolve() == Path(sys.executable).resolve()
    result = subprocess.run(["bash", "-c", snippet], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert 5 <= len(result.stdout.split()) <= EXAMPLE_MAX_TOKENS

    state = json.loads((workdir / "state.json").read_text())
    pids = [state["nginx"]["pid"], *(r["pid"] for r in state["replicas"])]
    down = _run("down", "--workdir", str(workdir))
    assert down.returncode == 0, down.stderr
    assert proc.wait(timeout=30) == 0
    assert_gone(pids)
    assert not (workdir / "state.json").exists()
    assert _run("status", "--workdir", str(workdir)).returncode == 1


def test_ctrl_c_stops_everything(up, tmp_path: Path) -> None:
    base = free_port_range(3)
    proc, out = up(*_up_args(base, tmp_path / "run"))
    out.until("stops everything")
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    assert "stopped" in out.until("stopped")
    assert_gone([state["nginx"]["pid"], *(r["pid"] for r in state["replicas"])])


def test_missing_nginx(tmp_path: Path) -> None:
    base = free_port_range(3)
    result = _run(*_up_args(base, tmp_path / "run"), "--nginx", str(tmp_path / "no-nginx"))
    _assert_user_error(result, r"nginx not found at .*no-nginx; install it: sudo apt-get "
                               r"install nginx-light \(Debian/Ubuntu\) or brew install nginx")
    assert not processes_with(f"--port {base + 1} ")


def test_port_in_use(tmp_path: Path) -> None:
    base = free_port_range(4)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", base + 2))
        holder.listen()
        result = _run(*_up_args(base, tmp_path / "run"))
    # Which of our processes wanted the port, and who holds it: this test process.
    _assert_user_error(result, rf"port {base + 2} \(wanted by replica 2\) is in use by pid "
                               rf"{os.getpid()} \(.*\); pick --port/--first-port or stop what "
                               r"holds it")
    assert not processes_with(f"--port {base + 1} ")


def test_port_in_use_names_the_holder_not_our_process(tmp_path: Path) -> None:
    """The nginx port held by another program: the message says nginx wanted it and names the
    holder, instead of reading as if nginx held it."""
    base = free_port_range(4)
    holder = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                               str(base)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not port_in_use(base) and time.monotonic() < deadline:
            time.sleep(0.05)
        result = _run(*_up_args(base, tmp_path / "run"))
    finally:
        holder.terminate()
        holder.wait(timeout=10)
    _assert_user_error(result, rf"port {base} \(wanted by nginx\) is in use by pid {holder.pid} "
                               r"\(.*-m http\.server.*\); pick --port/--first-port")


def test_replica_failing_shows_its_log(tmp_path: Path) -> None:
    base = free_port_range(3)
    result = _run(*_up_args(base, tmp_path / "run"),
                  env=_env(LLM_MAX_TOKENS="5000"))  # > LLM_MAX_MODEL_LEN: settings fail
    _assert_user_error(result, r"replica \d on :\d+ exited with code 2 before it was ready; "
                               r"last lines of .*replica-\d\.log:\n.*LLM_MAX_TOKENS \(5000\) "
                               r"must be smaller")
    for port in (base, base + 1, base + 2):
        assert not processes_with(f"--port {port} ")
    assert not (tmp_path / "run" / "state.json").exists()


def test_down_without_a_cluster_is_harmless(tmp_path: Path) -> None:
    result = _run("down", "--workdir", str(tmp_path))
    assert result.returncode == 0 and "nothing to stop" in result.stdout


TINY_STACK = """config:
  llm-serving:model:
    id: org/tiny-weights
    servedName: tiny-chat
  llm-serving:replicas: 2
  llm-serving:loadBalancing:
    method: round_robin
"""


def test_up_with_a_stack_serves_its_model_by_name_with_its_policy(up, tmp_path: Path) -> None:
    import httpx

    stack = tmp_path / "Pulumi.tiny.yaml"
    stack.write_text(TINY_STACK)
    base = free_port_range(3)
    workdir = tmp_path / "run"
    proc, out = up("up", "--stack", str(stack), "--port", str(base), "--first-port",
                   str(base + 1), "--workdir", str(workdir), "--api-key", "k-1")
    text = out.until("stops everything")
    assert "ready: 2 sim replica(s) behind nginx (round_robin)" in text
    assert "model     tiny-chat" in text
    answer = httpx.post(f"http://127.0.0.1:{base}/v1/chat/completions", timeout=10,
                        headers={"Authorization": "Bearer k-1"},
                        json={"model": "tiny-chat", "max_tokens": 1,
                              "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200 and answer.json()["model"] == "tiny-chat"
    status = _run("status", "--workdir", str(workdir))
    assert "model tiny-chat  policy round_robin" in status.stdout


TWO_MODEL_STACK = """config:
  llm-serving:models:
    - id: org/tiny-weights
      servedName: team/tiny-chat
    - id: org/coder-weights
      servedName: coder:v2
      name: coder
      replicas: 2
  llm-serving:replicas: 1
  llm-serving:ingress:
    enabled: true
  llm-serving:loadBalancing:
    method: least_conn
"""


def test_up_with_a_two_model_stack_serves_both_by_name(up, tmp_path: Path) -> None:
    """`--stack` with a `models` list: every model, with its own replica count, behind one
    nginx that routes by the body's model; /v1/models lists both; an unknown one gets the 404."""
    import httpx

    from tests.local.support import served

    stack = tmp_path / "Pulumi.two.yaml"
    stack.write_text(TWO_MODEL_STACK)
    base = free_port_range(4)
    workdir = tmp_path / "run"
    proc, out = up("up", "--stack", str(stack), "--port", str(base), "--first-port",
                   str(base + 1), "--workdir", str(workdir), "--api-key", "k-2")
    text = out.until("stops everything", timeout=60)
    assert "ready: 3 sim replica(s) behind nginx (least_conn)" in text, text
    assert "models    team/tiny-chat, coder:v2" in text, text
    key = {"Authorization": "Bearer k-2"}

    def ask(model: str) -> httpx.Response:
        return httpx.post(f"http://127.0.0.1:{base}/v1/chat/completions", timeout=10,
                          headers=key, json={"model": model, "max_tokens": 1,
                                             "messages": [{"role": "user", "content": "hi"}]})

    for model in ("team/tiny-chat", "coder:v2", "coder:v2"):
        answer = ask(model)
        assert answer.status_code == 200 and answer.json()["model"] == model, answer.text
    # Consecutive ports, model after model: one replica of the first, two of the second; each
    # model's requests reached its own replicas only.
    replicas = [f"http://127.0.0.1:{base + 1 + i}" for i in range(3)]
    assert [served(url) for url in replicas[:1]] == [1]
    assert sum(served(url) for url in replicas[1:]) == 2
    unknown = ask("gpt-4o")
    assert unknown.status_code == 404
    assert "`team/tiny-chat`, `coder:v2`" in unknown.json()["error"]["message"]
    listed = httpx.get(f"http://127.0.0.1:{base}/v1/models", headers=key, timeout=10)
    assert [card["id"] for card in listed.json()["data"]] == ["team/tiny-chat", "coder:v2"]
    status = _run("status", "--workdir", str(workdir))
    assert "models team/tiny-chat, coder:v2" in status.stdout, status.stdout
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0


def test_stack_errors_name_the_problem(tmp_path: Path) -> None:
    base = free_port_range(3)
    stack = tmp_path / "Pulumi.tiny.yaml"
    stack.write_text(TINY_STACK)
    _assert_user_error(_run(*_up_args(base, tmp_path / "run"), "--stack", str(stack),
                            "--model", "org/x"),
                       r"--model and --stack do not go together")
    _assert_user_error(_run(*_up_args(base, tmp_path / "run"), "--stack", "no-such-stack"),
                       r"no stack file for 'no-such-stack'")
