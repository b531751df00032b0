"""The command a results file records names what was measured, not where it was written."""

from __future__ import annotations

import pytest

from bench.command import shown


@pytest.mark.parametrize("args, expected", [
    (["--quick"], "python -m bench --quick"),
    (["--runs", "2,3", "--out", "/some/dir", "--seed", "8"],
     "python -m bench --runs 2,3 --seed 8"),
    (["--out=/some/dir", "--factor", "10"], "python -m bench --factor 10"),
    ([], "python -m bench"),
])
def test_local_output_directory_is_left_out(args, expected):
    assert shown("python -m bench", args) == expected
