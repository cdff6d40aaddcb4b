"""Shared test set-up. Tiers are markers (declared in pyproject.toml): the default run is the unit tier,
``-m integration`` / ``-m slow`` select the others (``make test``, ``make test-integration``, ``make test-slow``)."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic() -> Iterator[None]:
    """Seed torch and cap intra-op threads at 2 (the CI machine's cores) for every test."""
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    yield


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for tiny models (faster than two on a loaded machine, same results); restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
