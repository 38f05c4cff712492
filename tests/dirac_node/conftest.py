"""Fixtures for the DIRAC worker-node tests: the DIRAC 9.1.22 side venv, built once per session.

Skipped, with the reason, when that venv cannot be built (no package index, no swig/libssl-dev...), unless
GALAXY_DIRAC_REQUIRE_DIRACX=1 (CI), which makes it a failure, as for tests/contract's DiracX.
"""

from __future__ import annotations

import pathlib

import pytest

from tests.conftest import unavailable
from tests.dirac_node import dirac_venv


def _unavailable(reason: str) -> None:
    """Skip, or fail when the run requires the real DIRAC/DiracX components (CI)."""
    unavailable("DIRAC", reason)


@pytest.fixture(scope="session")
def dirac_node_venv() -> pathlib.Path:
    """The DIRAC side venv (its JobWrapper runs the jobs of these tests)."""
    try:
        return dirac_venv()
    except Exception as exc:  # no index, no compiler headers, broken wheel...: environment, not a test failure
        _unavailable(f"cannot build the DIRAC side venv: {exc}")
        raise  # unreachable: _unavailable skips or fails
