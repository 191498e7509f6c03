"""Shared test helpers: where the real datasets live (``../shared/data`` beside the repository)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real datasets; the test is skipped when this checkout has none."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not available: {SHARED_DATA} does not exist")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_dataset(shared_data: Path) -> Callable[[str], Path]:
    """``shared_dataset(name)``: the folder of one real dataset, or skip the test when it is absent."""

    def find(name: str) -> Path:
        path = shared_data / name
        if not path.is_dir():
            pytest.skip(f"real dataset {name} not available at {path}")
        return path

    return find
