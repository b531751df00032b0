"""Latency profiles (server/engines/profile.py): loading, errors that name the file and the key,
the LLM_SIM_* overrides, the step model's shape, and time dilation in the sim engine."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from pathlib import Path

import pytest
import yaml

from server import from_env
from server.engines import build_engine
from server.engines.base import SamplingParams
from server.engines.profile import PROFILE_DIR, ProfileError, load_profile, profile_names
from server.engines.sim import LruPrefixCache, SimEngine
from server.engines.steps import StepBatch
from server.settings import SettingsError


def _write(tmp_path: Path, data: dict, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _cpu_sim() -> dict:
    return yaml.safe_load((PROFILE_DIR / "cpu-sim.yaml").read_text())


def test_every_shipped_profile_loads_and_names_its_file() -> None:
    names = profile_names()
    assert {"cpu-sim", "h200-llama8b", "h200-llama1b"} <= set(names)
    for name in names:
        p = load_profile(name)
        assert p.name == name and p.ref == name
        assert p.path == PROFILE_DIR / f"{name}.yaml"
        if p.provenance.source != "chosen":
            assert p.fit is not None and p.fit.cells_counted > 0


def test_cpu_sim_is_todays_sim_model_exactly() -> None:
    """The numbers every earlier benchmark ran with: 8 slots, 50 ms + 0.25 ms/token prefill,
    30 ms + 1 ms/sequence decode steps, a 65,536-token prefix cache of 16-token blocks."""
    p = load_profile("cpu-sim")
    assert p.provenance.source == "chosen" and p.kind == "slots"
    assert p.scheduler.slots == 8
    assert (p.scheduler.prefix_cache_tokens, p.scheduler.prefix_cache_block_tokens) == (65536, 16)
    assert p.prefill_seconds(200) == pytest.approx(0.050 + 0.25e-3 * 200, abs=1e-12)
    assert p.prefill_seconds(100, 96) == pytest.approx(0.050 + 0.25e-3 * 100, abs=1e-12)
    assert p.decode_step_seconds(8) == pytest.approx(0.038, abs=1e-12)
    engine = SimEngine(from_env({"LLM_SIM_PROFILE": "cpu-sim"}))
    assert engine.prefill_seconds(list(range(120))) == pytest.approx(0.080, abs=1e-12)
    assert isinstance(engine.prefix_cache, LruPrefixCache)
    assert engine.prefix_cache.stats()["capacity_tokens"] == 65536


def test_unknown_profile_lists_the_shipped_ones() -> None:
    with pytest.raises(ProfileError, match=r"unknown profile 'nope'.*cpu-sim.*h200-llama8b"):
        load_profile("nope")
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile("/nonexistent/dir/x.yaml")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["scheduler"].update(slots=0), r"scheduler\.slots: .*greater than or equal to 1"),
    (lambda d: d["cost"]["params"].pop("decode_base_ms"), r"cost\.params\.decode_base_ms: Field "
                                                          r"required"),
    (lambda d: d["cost"]["params"].update(decode_ms_per_sec=1),
     r"cost\.params\.decode_ms_per_sec: unknown key \(allowed: prefill_base_ms, "),
    (lambda d: d.update(colour="blue"), r"colour: unknown key \(allowed: name, summary, "),
    (lambda d: d["scheduler"].update(kind="paged"), r"scheduler\.kind: must be one of "
                                                    r"continuous, slots"),
    (lambda d: d["cost"].update(form="roofline"), r"cost\.params\.weights_ms: Field required"),
    (lambda d: d["provenance"].update(source="guessed"), r"provenance\.source: Input should be "
                                                         r"'measured-endpoint'"),
    (lambda d: d["provenance"].update(source="microbenchmark"),
     r"provenance\.source 'microbenchmark' needs a fit section"),
    (lambda d: d.update(scheduler=dict(kind="continuous", max_num_seqs=4,
                                       max_num_batched_tokens=2, block_size=16,
                                       num_gpu_blocks=10, enable_prefix_caching=True,
                                       enable_chunked_prefill=True)),
     r"scheduler: .*max_num_batched_tokens \(2\) must be at least max_num_seqs \(4\)"),
])
def test_a_bad_profile_names_the_file_and_the_key(tmp_path: Path, edit, message: str) -> None:
    data = _cpu_sim()
    edit(data)
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_kind_and_form_must_agree(tmp_path: Path) -> None:
    data = yaml.safe_load((PROFILE_DIR / "h200-llama8b.yaml").read_text())
    data["cost"] = _cpu_sim()["cost"]
    with pytest.raises(ProfileError, match="cost.form 'slots-linear' does not fit "
                                           "scheduler.kind 'continuous'"):
        load_profile(_write(tmp_path, data))


def test_a_profile_outside_the_shipped_ones_is_named_by_its_path(tmp_path: Path) -> None:
    data = _cpu_sim()
    data["name"] = "other"
    path = _write(tmp_path, data)
    assert load_profile(path).ref == str(path.resolve())
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [")
    with pytest.raises(ProfileError, match=f"{bad}: not valid YAML"):
        load_profile(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ProfileError, match=f"{bad}: a profile is a mapping"):
        load_profile(bad)


def test_roofline_steps_grow_with_kv_read_and_tokens_not_with_slots() -> None:
    p = load_profile("h200-llama8b")
    one = p.decode_step_seconds(1, 512)
    assert 0.006 < one < 0.009  # measured 7.6 ms
    # flat in batch while the weights dominate: 256 sequences cost ~2.4x one, not 256x
    assert p.decode_step_seconds(256, 512) / one == pytest.approx(18.367 / 7.604, rel=0.05)
    # the same batch reading 4x the KV costs more
    assert p.decode_step_seconds(256, 2048) > 1.8 * p.decode_step_seconds(256, 512)
    # batch 1 at long context is bound by the one sequence, not by total KV
    assert p.decode_step_seconds(16, 8192) == pytest.approx(p.decode_step_seconds(1, 8192),
                                                            rel=0.1)
    # a prefill chunk over cached tokens pays attention to them
    fresh = p.step_seconds(StepBatch(prefill=((512, 0),)))
    assert p.step_seconds(StepBatch(prefill=((512, 4096),))) > fresh
    # a mixed step costs more than either part, less than both apart
    mixed = StepBatch(decode_kv=(1024,) * 64, prefill=((512, 0),))
    apart = p.step_seconds(StepBatch(decode_kv=(1024,) * 64)) + fresh
    assert fresh < p.step_seconds(mixed) < apart
    assert p.step_seconds(StepBatch()) == 0


def test_slots_profiles_have_no_step_model() -> None:
    with pytest.raises(ProfileError, match="slots profile"):
        load_profile("cpu-sim").step_seconds(StepBatch(decode_kv=(1,)))


def test_dilation_scales_every_duration_and_does_not_compound() -> None:
    for name in ("cpu-sim", "h200-llama8b"):
        p = load_profile(name)
        d = p.dilated(7)
        assert d.time_dilation == 7 and p.time_dilation == 1
        assert d.decode_step_seconds(16, 2048) == pytest.approx(7 * p.decode_step_seconds(16, 2048))
        assert d.prefill_seconds(300, 64) == pytest.approx(7 * p.prefill_seconds(300, 64))
        assert d.dilated(2).decode_step_seconds(3) == pytest.approx(2 * p.decode_step_seconds(3))
    with pytest.raises(ProfileError, match="positive"):
        load_profile("cpu-sim").dilated(0)


# --- settings -----------------------------------------------------------------------------------


def test_without_a_profile_the_llm_sim_settings_are_the_model() -> None:
    p = from_env({}).sim_latency_profile()
    assert p.kind == "slots"
    assert p.prefill_seconds(10) == pytest.approx(0.100 + 0.0005 * 10)  # documented defaults
    assert p.decode_step_seconds(4) == pytest.approx(0.040 + 0.00025 * 4)
    assert p.scheduler.prefix_cache_tokens == 0


def test_llm_sim_values_given_override_the_profile_and_only_those() -> None:
    s = from_env({"LLM_SIM_PROFILE": "cpu-sim", "LLM_SIM_DECODE_BASE_MS": "10",
                  "LLM_SIM_PREFIX_CACHE_TOKENS": "0"})
    p = s.sim_latency_profile()
    assert p.decode_step_seconds(2) == pytest.approx(0.010 + 0.001 * 2)  # per-seq from cpu-sim
    assert p.prefill_seconds(100) == pytest.approx(0.050 + 0.025)
    assert p.scheduler.prefix_cache_tokens == 0
    assert "LLM_SIM_DECODE_BASE_MS" in p.summary


def test_settings_errors_name_the_variable() -> None:
    with pytest.raises(SettingsError, match="LLM_SIM_PROFILE: unknown profile 'gpu'"):
        from_env({"LLM_SIM_PROFILE": "gpu"})
    with pytest.raises(SettingsError, match="LLM_SIM_DECODE_BASE_MS set numbers of a slots "
                                            "profile, and h200-llama8b is a continuous"):
        from_env({"LLM_SIM_PROFILE": "h200-llama8b", "LLM_SIM_DECODE_BASE_MS": "5"})
    with pytest.raises(SettingsError, match="LLM_SIM_TIME_DILATION"):
        from_env({"LLM_SIM_TIME_DILATION": "-2"})
    # the transformers engine never reads the sim profile
    s = from_env({"LLM_ENGINE": "transformers", "LLM_MODEL": "m", "LLM_SIM_PROFILE": "gpu"})
    assert s.sim_profile == "gpu"


def test_profile_by_path_and_model_card_reports_dilation(tmp_path: Path) -> None:
    data = _cpu_sim()
    data["name"] = "mine"
    path = _write(tmp_path, data)
    engine = build_engine(from_env({"LLM_SIM_PROFILE": str(path),
                                    "LLM_SIM_TIME_DILATION": "4"}))
    card = engine.model_card()
    assert card["time_dilation"] == 4
    assert card["profile"] == {"name": "mine", "kind": "slots", "source": "chosen"}
    assert "x4" in card["description"]
    assert engine.prefill_seconds(list(range(40))) == pytest.approx(4 * (0.050 + 0.25e-3 * 40))


def test_a_continuous_profile_runs_the_batched_engine_with_its_scheduler_and_dilation() -> None:
    from server.engines.sim_batched import SimBatchedEngine

    profile = load_profile("h200-llama8b")
    engine = build_engine(from_env({"LLM_SIM_PROFILE": "h200-llama8b", "LLM_MAX_CONCURRENCY": "96",
                                    "LLM_SIM_TIME_DILATION": "5"}))
    assert isinstance(engine, SimBatchedEngine)
    card = engine.model_card()
    assert card["time_dilation"] == 5
    assert card["profile"] == {"name": "h200-llama8b", "kind": "continuous",
                               "source": "microbenchmark"}
    s = profile.scheduler
    assert card["scheduler"]["max_num_seqs"] == 96  # LLM_MAX_CONCURRENCY, as --max-num-seqs
    assert card["scheduler"]["max_num_batched_tokens"] == s.max_num_batched_tokens
    assert card["scheduler"]["block_size"] == s.block_size
    # The engine dilates the undilated step model once (not the profile's dilated one again).
    batch = StepBatch(decode_kv=(512,) * 8)
    assert engine.step_seconds(batch) == pytest.approx(profile.step_seconds(batch))
    assert engine.time_dilation == 5


async def _stamps(engine: SimEngine, n: int) -> list[float]:
    out = []
    async for _ in engine.generate([1, 2, 3], SamplingParams(max_tokens=n)):
        out.append(time.monotonic())
    return out


def test_dilation_stretches_the_measured_steps() -> None:
    """The same profile at dilation 1 and 3: measured inter-token times scale by 3."""
    def measure(dilation: float) -> float:
        settings = from_env({"LLM_SIM_PROFILE": "cpu-sim", "LLM_SIM_PREFIX_CACHE_TOKENS": "0",
                             "LLM_SIM_DECODE_BASE_MS": "20", "LLM_SIM_DECODE_MS_PER_SEQ": "2",
                             "LLM_SIM_PREFILL_BASE_MS": "1",
                             "LLM_SIM_TIME_DILATION": str(dilation)})

        async def main() -> list[list[float]]:
            engine = SimEngine(settings)
            await engine.load()
            try:
                return await asyncio.gather(*[_stamps(engine, 10) for _ in range(2)])
            finally:
                await engine.close()

        runs = asyncio.run(main())
        return statistics.median(b - a for r in runs for a, b in itertools.pairwise(r[1:]))

    plain, dilated = measure(1), measure(3)
    assert plain == pytest.approx(0.024, rel=0.15)  # 20 ms + 2 ms x 2 sequences
    assert dilated == pytest.approx(3 * 0.024, rel=0.15)
