"""Local autoscaling needs nginx and prometheus: skipped without them on a laptop, never in CI
(.ci/run installs both, and a missing binary must fail there rather than pass as skipped)."""

from __future__ import annotations

import os
import shutil

import pytest

from local.procs import LocalModeError, find_nginx


def require_binaries() -> None:
    missing = []
    try:
        find_nginx()
    except LocalModeError:
        missing.append("nginx (apt-get install nginx-light)")
    if shutil.which("prometheus") is None:
        missing.append("prometheus (apt-get install prometheus)")
    if missing and not os.environ.get("CI"):
        pytest.skip("not installed: " + ", ".join(missing))


@pytest.fixture
def binaries() -> None:
    require_binaries()
