"""Shared test set-up. Tiers are markers (declared in pyproject.toml): the default run is the unit tier,
``-m integration`` / ``-m slow`` select the others (``make test``, ``make test-integration``, ``make test-slow``)."""

from collections.abc import Callable, Iterator, Sequence

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


@pytest.fixture
def realised_equals_simulated() -> Callable[..., torch.Tensor]:
    """``check(model, x, policy, cached, batch_sizes, rows=None)``: ``run_dynamic`` on consecutive batches of each
    size over the first ``rows`` inputs decides and predicts what ``simulate_exits`` replays from ``cached``
    (``forward_all`` logits of ``x``); returns the simulated exits."""
    from adaptnn.policies import simulate_exits

    def check(model, x, policy, cached, batch_sizes: Sequence[int], rows: int | None = None) -> torch.Tensor:
        sim_exit, sim_pred = simulate_exits(policy, cached)
        for batch in batch_sizes:
            for start in range(0, len(x) if rows is None else rows, batch):
                out = model.run_dynamic(x[start : start + batch], policy)
                assert torch.equal(out.exit_index, sim_exit[start : start + batch]), (batch, start)
                assert torch.allclose(out.logits, sim_pred[start : start + batch], atol=1e-5), (batch, start)
        return sim_exit

    return check
