"""bench/autoscale_model.py: settings, intervals, the run cache and the Markdown table.

The model runs themselves are slow (tens of seconds each) and are tested in
tests/scaling/test_des_autoscale.py; here `run_one` is replaced by a hand-made outcome per
(setting, seed) so the study's bookkeeping is checked by hand.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest

from bench import autoscale_model as am


def test_settings_parse_and_bad_ones_name_the_text():
    assert am.Choice.parse("128:1:96") == am.Choice(128, 1, 96, 60.0)
    assert am.Choice.parse("256:2:192:0") == am.Choice(256, 2, 192, 0.0)
    assert am.Choice.parse("128:static:4") == am.Choice(128, static=4)
    assert am.Choice.parse("128:1:96").name == "M128 waiting 1, running 96"
    assert am.Choice.parse("128:1:96:0").name == "M128 waiting 1, running 96, avg 0 s"
    for bad in ("128:0:96", "128:static:0", "128", "x:1:2", "128:1:96:60:9"):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            am.Choice.parse(bad)


def test_mean_and_t_interval_by_hand():
    m, h = am.mean_ci([1.0, 2.0, 3.0])  # sd 1, t(2) 4.30
    assert m == 2.0 and h == pytest.approx(4.30 / math.sqrt(3))
    assert am.mean_ci([5.0]) == (5.0, 0.0)


def _fake(outcomes: dict[tuple[str, int], tuple[float, float]], calls: list):
    """run_one giving (SLO share, replica-s) per (setting name, seed); static max 1000 s."""
    def run_one(profile, shape, choice, seed, cap, *rest):
        calls.append((choice.name, seed))
        slo, cost = outcomes[(choice.name, seed)]
        return {"requests": 10, "lost": 0, "slo": slo, "slo_tpot": slo, "tpot_p99": 0.02,
                "replica_s": cost, "static_max_s": 1000.0, "lag_s": None if choice.static else 40.0,
                "max_replicas": 4, "scale_events": 2}
    return run_one


def test_runs_are_cached_resumed_and_the_table_pairs_by_seed(tmp_path, monkeypatch, capsys):
    a, b = "M128 waiting 1, running 96", "M128 waiting 4, running 96"
    outcomes = {(a, 1): (0.90, 600.0), (a, 2): (0.94, 700.0),
                (b, 1): (0.90, 500.0), (b, 2): (0.92, 500.0)}
    calls: list = []
    monkeypatch.setattr(am, "run_one", _fake(outcomes, calls))
    cache, out = tmp_path / "cache", tmp_path / "table.md"
    cache.mkdir()
    (cache / "capacity-h200-llama8b-M128.json").write_text(json.dumps({"capacity": 80.0}))
    argv = ["128:1:96", "128:4:96", "--seeds", "1,2", "--cache", str(cache), "--out", str(out)]

    assert am.main(argv + ["--limit", "3"]) == 0
    assert len(calls) == 3 and not out.exists()
    assert "1 run(s) not done yet" in capsys.readouterr().out

    assert am.main(argv) == 0
    assert calls[3:] == [(b, 2)]  # only the missing run; the rest came from the cache
    text = out.read_text()
    row_b = next(line for line in text.splitlines() if line.startswith(f"| {b} "))
    cells = [c.strip() for c in row_b.strip("|").split("|")]
    # SLO 91.0 ± 12.71*1.414/1.414; paired vs a: (0, -2) points -> -1.0 ± 12.7;
    # cost 50 % both seeds; paired: (-10, -20) -> -15.0 ± 63.6
    assert cells[2] == "91.0 ± 12.7"
    assert cells[3] == "-1.0 ± 12.7"
    assert cells[6] == "50.0 ± 0.0"
    assert cells[7] == "-15.0 ± 63.5"
    assert "Modelled" in text and "`python -m bench autoscale-model 128:1:96 128:4:96" in text

    calls.clear()
    assert am.main(argv + ["--report-only"]) == 0
    assert calls == []


def test_a_slots_profile_takes_only_its_slot_count(capsys):
    assert am.model_with_seqs("cpu-sim", 8).slots == 8
    with pytest.raises(ValueError, match="8 slots"):
        am.model_with_seqs("cpu-sim", 128)
    with pytest.raises(SystemExit):
        am.main(["128:1:96", "--profile", "cpu-sim", "--report-only"])
    assert "must be 8, not 128" in capsys.readouterr().err
