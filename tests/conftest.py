"""Shared test helpers: where the real datasets live (``../shared/data`` beside the repository), and a clean slate
for the compiled kernels' loader and checks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests: a second thread only adds synchronisation (about 10x
    slower on a shared 2-core machine). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def fresh_kernels():
    """Forget the loaded compiled kernels and what their checks found, before and after the test (its monkeypatched
    environment or checks decide what loads and runs)."""
    from grcn_bench.models.ops import native

    native.forget_loaded()
    yield
    native.forget_loaded()
