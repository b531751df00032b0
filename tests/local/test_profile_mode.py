"""`python -m local up --profile P [--time-dilation D]`: the replicas run the profile, the
dilation chosen keeps the event rate within the machine's headroom, the banner says so."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from local import dilation
from local.__main__ import _sim_profile_env
from local.procs import LocalModeError
from server.engines.profile import load_profile
from tests.local.support import free_port_range
from tests.local.test_cli import CLI, REPO_ROOT, _assert_user_error, _env, _Lines, _run, _up_args

HEADROOM = dilation.Headroom(events_per_s=2000, cores=os.cpu_count() or 2, replicas=3,
                             command="python -m bench.headroom", date="2026-12-04")


def _args(**kw: object) -> argparse.Namespace:
    base = dict(profile=None, time_dilation=None, engine=None, model=None, replicas=3)
    return argparse.Namespace(**{**base, **kw})


def test_pick_dilation_is_the_smallest_that_fits_the_headroom() -> None:
    gpu = load_profile("h200-llama8b")
    rate = dilation.full_batch_event_rate(gpu, 3)
    # 3 replicas x 1024 sequences in a ~58 ms step: tens of thousands of events per second
    assert 40_000 < rate < 70_000
    d = dilation.pick_dilation(gpu, 3, HEADROOM)
    budget = dilation.TARGET_SHARE * HEADROOM.for_this_machine()
    assert rate / d <= budget < rate / (d - 1)
    assert dilation.full_batch_event_rate(gpu.dilated(d), 3) == pytest.approx(rate / d)
    # today's CPU regime needs none: 8 / 38 ms x 3 = 632 events/s
    assert dilation.pick_dilation(load_profile("cpu-sim"), 3, HEADROOM) == 1


def test_profile_env_and_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dilation, "load_headroom", lambda: HEADROOM)
    env, note = _sim_profile_env(_args(profile="h200-llama8b"))
    d = float(env["LLM_SIM_TIME_DILATION"])
    assert d == dilation.pick_dilation(load_profile("h200-llama8b"), 3, HEADROOM)
    assert env["LLM_SIM_PROFILE"] == "h200-llama8b" and env["LLM_MAX_CONCURRENCY"] == "1024"
    assert f"dilated {d:g}x (chosen)" in note and f"Divide measured times by {d:g}" in note
    env, note = _sim_profile_env(_args(profile="cpu-sim"))
    assert "LLM_SIM_TIME_DILATION" not in env and "dilated 1x (none needed)" in note
    env, note = _sim_profile_env(_args(profile="cpu-sim", time_dilation=3.0))
    assert env["LLM_SIM_TIME_DILATION"] == "3.0" and "(as given)" in note
    assert _sim_profile_env(_args()) == ({}, "")
    with pytest.raises(LocalModeError, match="sim engine only"):
        _sim_profile_env(_args(profile="cpu-sim", model="some/model"))
    with pytest.raises(LocalModeError, match="--time-dilation must be positive"):
        _sim_profile_env(_args(time_dilation=0.0))


def test_the_shipped_headroom_file_loads() -> None:
    h = dilation.load_headroom()
    assert h.events_per_s > 0 and h.cores >= 1 and "bench.headroom" in h.command


def test_unknown_profile_is_a_user_error(tmp_path: Path) -> None:
    result = _run(*_up_args(free_port_range(3), tmp_path / "run"), "--profile", "nope")
    _assert_user_error(result, r"--profile: unknown profile 'nope'; shipped profiles: cpu-sim")


def test_up_runs_the_profile_at_the_dilation_given(tmp_path: Path) -> None:
    base = free_port_range(2)
    proc = subprocess.Popen([*CLI, *_up_args(base, tmp_path / "run", replicas=1),
                             "--api-key", "k-1", "--profile", "cpu-sim", "--time-dilation", "2"],
                            cwd=REPO_ROOT, env=_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        text = _Lines(proc).until("Divide measured times by 2")
        assert "profile   profile cpu-sim (chosen)" in text and "dilated 2x (as given)" in text
        card = httpx.get(f"http://127.0.0.1:{base}/v1/models",
                         headers={"Authorization": "Bearer k-1"}, timeout=10).json()["data"][0]
        assert card["time_dilation"] == 2
        assert card["profile"] == {"name": "cpu-sim", "kind": "slots", "source": "chosen"}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
