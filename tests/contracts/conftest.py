"""The infra tests' mocks fixtures, for contract tests that render components."""

from tests.infra.conftest import mocks, run  # noqa: F401
