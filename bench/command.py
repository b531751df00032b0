"""What a results file records (the command line that reproduces it) and where results go.

Every benchmark writes into `OUT` (``build/bench/``, ignored by git) unless ``--out`` names
another folder, so a run leaves the working tree clean; the committed full-run results under
``docs/`` are refreshed on purpose, with ``--out docs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "bench"
"""Default output folder of every benchmark (git-ignored)."""
OUT_HELP = "folder for the results (default build/bench/, ignored by git; --out docs " \
           "refreshes the committed ones)"

LOCAL_ONLY = ("--out",)
"""Options that say where this machine wrote the files, not what was measured."""


def shown(prefix: str, args: Sequence[str]) -> str:
    """`prefix` and `args` without the local-only options (``--out DIR`` or ``--out=DIR``)."""
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in LOCAL_ONLY:
            skip = True
            continue
        if arg.split("=", 1)[0] in LOCAL_ONLY:
            continue
        kept.append(arg)
    return " ".join([prefix, *kept])
