"""Shared test configuration: the repository root and the examples."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings

# Hypothesis fails an example that takes longer than 200 ms by default. On a shared machine under
# load that measures the machine, not the code (speed is what the benchmarks measure): no deadline.
settings.register_profile("modelfleet", deadline=None)
settings.load_profile("modelfleet")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
