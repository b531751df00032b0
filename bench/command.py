"""The command line a results file records: what to type to reproduce it."""

from __future__ import annotations

from collections.abc import Sequence

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
