"""Fuzz tests: a session-wide count of the requests the fuzzers sent, printed at the end."""

from __future__ import annotations

from collections import Counter

import pytest

REQUESTS: Counter[str] = Counter()
"""Requests sent per fuzz test label; each test also asserts its own minimum."""


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REQUESTS:
        total = sum(REQUESTS.values())
        terminalreporter.write_sep("-", f"fuzz: {total} generated requests")
        for label, n in sorted(REQUESTS.items()):
            terminalreporter.write_line(f"  {n:6d}  {label}")
