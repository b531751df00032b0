"""The benchmarks' command lines: every option explained, every subcommand listed with its
purpose, results outside the working tree by default, and a run that leaves `git status`
clean."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bench import __main__ as bench_main
from bench import autoscale, autoscale_model, autoscale_validate, model_seeds, regime
from bench.command import OUT
from bench.faults import cli as faults_cli
from local.procs import LocalModeError, find_nginx
from server import bench as server_bench

ROOT = Path(__file__).resolve().parents[2]
COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "python -m bench": bench_main.main,
    "python -m bench autoscale": autoscale.main,
    "python -m bench autoscale-model": autoscale_model.main,
    "python -m bench autoscale-validate": autoscale_validate.main,
    "python -m bench faults": faults_cli.main,
    "python -m bench regime": regime.main,
    "python -m bench.model_seeds": model_seeds.main,
    "python -m server.bench": server_bench.main,
}


class _Parsed(Exception):
    pass


def _parser(main: Callable[[list[str]], int], monkeypatch) -> argparse.ArgumentParser:
    """The parser `main` builds, caught at parse_args (nothing starts)."""
    seen: list[argparse.ArgumentParser] = []

    def capture(self: argparse.ArgumentParser, *_args: object, **_kw: object) -> None:
        seen.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed):
        main([])
    return seen[0]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help_text(name, monkeypatch) -> None:
    parser = _parser(COMMANDS[name], monkeypatch)
    assert parser.prog == name
    bare = [a.option_strings[0] for a in parser._actions
            if a.option_strings and a.help in (None, "", argparse.SUPPRESS)]
    assert not bare, f"{name}: options without help: {bare}"


@pytest.mark.parametrize("name", ["python -m bench", "python -m bench autoscale",
                                  "python -m bench regime"])
def test_results_go_to_an_ignored_folder_unless_out_says_otherwise(name, monkeypatch) -> None:
    assert _parser(COMMANDS[name], monkeypatch).get_default("out") == OUT
    ignored = subprocess.run(["git", "check-ignore", "-q", str(OUT / "bench-results.md")],
                             cwd=ROOT, check=False)
    assert ignored.returncode == 0, f"{OUT} is not ignored by git"


def test_bench_help_lists_every_subcommand_with_its_purpose() -> None:
    out = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    for name in ("autoscale", "faults", "calibrate", "profile", "plan"):
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(name + " ")), None)
        assert line is not None, f"{name} missing from python -m bench --help"
        assert len(line.split(None, 1)[1]) > 20, line  # a purpose, not just the name
    assert "fit a latency profile to any OpenAI-compatible endpoint" in out


@pytest.mark.parametrize("name", bench_main.SUBCOMMANDS)
def test_every_listed_subcommand_runs_its_own_command(name, capsys) -> None:
    """`python -m bench <name> --help` reaches that subcommand's parser (its own prog)."""
    assert name in bench_main.MODULES, f"{name} is listed but dispatches nowhere"
    with pytest.raises(SystemExit) as stop:
        bench_main.main([name, "--help"])
    assert stop.value.code == 0
    assert f"python -m bench {name}" in capsys.readouterr().out


def test_a_quick_benchmark_run_leaves_git_status_clean(tmp_path) -> None:
    """A fault drill at its defaults (results into build/bench/), start to finish."""
    try:
        find_nginx()
    except LocalModeError:
        if not os.environ.get("CI"):
            pytest.skip("nginx is not installed")
    before = _status()
    result = subprocess.run(
        [sys.executable, "-m", "bench", "faults", "--drills", "disconnect"], cwd=ROOT,
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "wrote " + str(OUT / "reliability.md") in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].startswith("Conclusion: all 1 drill(s)")
    assert _status() == before


def _status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=True).stdout
