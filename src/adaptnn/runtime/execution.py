"""The early-exit loop, independent of how each stage is executed.

A *stage* is what runs between two exit decisions: the segments up to an exit head, then the head.
:func:`dynamic_loop` owns the decisions and the bookkeeping (who left where, with which prediction) and
asks a :class:`StageExecutor` to run a stage and to keep only the survivors. Two executors exist:

* :class:`EagerStages` calls the modules (any device, any batch size);
* :class:`adaptnn.runtime.cuda_graphs.GraphedStages` replays CUDA graphs captured at bucketed batch sizes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from .state import State, index_state, slice_state

if TYPE_CHECKING:
    from .policy import ExitPolicy
    from .staged import StagedModel

__all__ = ["StageExecutor", "EagerStages", "dynamic_loop", "oracle_loop", "split_finished", "stage_segments"]


def split_finished(done: Tensor) -> tuple[int, Tensor | None, Tensor | None]:
    """Split a batch by a "done" mask with ONE host sync: ``(n_done, done_idx, keep_idx)``.

    ``done_idx``/``keep_idx`` are batch positions in batch order; both are ``None`` when nobody or everybody
    is done (nothing to compact).
    """
    n_done = int(done.sum())  # the host sync: the next kernels' shapes depend on it
    if n_done == 0 or n_done == done.shape[0]:
        return n_done, None, None
    # done samples first (stable: each group keeps batch order)
    order = torch.argsort(done.to(torch.uint8), descending=True, stable=True)
    return n_done, order[:n_done], order[n_done:]


def stage_segments(exit_after: tuple[int, ...] | list[int]) -> list[range]:
    """Segment indices of each stage: stage k runs the segments after exit k-1 up to exit k."""
    starts = [0, *(e + 1 for e in exit_after[:-1])]
    return [range(s, e + 1) for s, e in zip(starts, exit_after, strict=True)]


class StageExecutor(Protocol):
    """How stages run. ``handle`` is the executor's view of the running samples' state."""

    def start(self, x: Tensor) -> Any:
        """Take the input batch; return the handle the first stage runs on."""

    def run(self, k: int, handle: Any) -> tuple[Any, Tensor]:
        """Run stage k (segments, then head k) on the running samples: ``(new handle, logits [n, C])``."""

    def keep(self, handle: Any, keep_idx: Tensor) -> Any:
        """Keep only the samples at positions ``keep_idx`` (in this order)."""

    def prefix(self, handle: Any, n: int) -> Any:
        """Keep only the first ``n`` running samples (the oracle's cheap compaction)."""

    def own(self, prediction: Tensor) -> Tensor:
        """A tensor the caller may keep (executors reusing static buffers return a copy)."""


class EagerStages:
    """Calls the segments and heads of a :class:`~adaptnn.runtime.staged.StagedModel` directly."""

    def __init__(self, model: StagedModel) -> None:
        self.model = model
        self.stages = model.stages

    def start(self, x: Tensor) -> State:
        return x

    def run(self, k: int, handle: State) -> tuple[State, Tensor]:
        state = handle
        for j in self.stages[k]:
            state = self.model.segments[j](state)
        return state, self.model.heads[k](state)

    def keep(self, handle: State, keep_idx: Tensor) -> State:
        return index_state(handle, keep_idx)

    def prefix(self, handle: State, n: int) -> State:
        return slice_state(handle, n)

    def own(self, prediction: Tensor) -> Tensor:
        return prediction


def dynamic_loop(executor: StageExecutor, x: Tensor, policy: ExitPolicy, num_exits: int) -> tuple[Tensor, Tensor]:
    """Real early exit over ``num_exits`` stages: ``(logits [B, C], exit_index [B])``.

    After each stage the policy marks finished samples; their predictions are written to the output and
    only the others (executor state and policy state compacted together, ONE host sync per exit) go on.
    """
    batch = x.shape[0]
    device = x.device
    exit_index = torch.full((batch,), num_exits - 1, dtype=torch.long, device=device)
    out: Tensor | None = None
    active: Tensor | None = None  # original positions of the running samples; None = all of them
    policy_state = policy.init_state(batch, device)
    handle = executor.start(x)
    for k in range(num_exits):
        handle, logits = executor.run(k, handle)
        done, prediction, policy_state = policy.decide(k, logits, policy_state)
        if out is None:
            out = prediction.new_empty((batch, *prediction.shape[1:]))
        if k == num_exits - 1:  # the last exit takes everyone still running
            if active is None:
                out = executor.own(prediction)
            else:
                out[active] = prediction
            break
        n_done, done_idx, keep_idx = split_finished(done)
        if n_done == 0:
            continue
        if done_idx is None:  # everybody still running is done
            if active is None:
                out, exit_index = executor.own(prediction), torch.full_like(exit_index, k)
            else:
                out[active] = prediction
                exit_index[active] = k
            break
        global_done = done_idx if active is None else active[done_idx]
        out[global_done] = prediction.index_select(0, done_idx)
        exit_index[global_done] = k
        active = keep_idx if active is None else active[keep_idx]
        handle = executor.keep(handle, keep_idx)
        policy_state = index_state(policy_state, keep_idx)
    assert out is not None
    return out, exit_index


def oracle_loop(executor: StageExecutor, x_sorted: Tensor, stage_alive: list[int]) -> None:
    """The computation of a dynamic run with its exits known in advance (the speed benchmark's oracle).

    ``x_sorted`` holds the samples ordered by exit, latest first; ``stage_alive[k]`` samples run stage k,
    always a prefix of the batch: no decisions, no host syncs, no gathers.
    """
    handle = executor.start(x_sorted)
    running = x_sorted.shape[0]
    for k, alive in enumerate(stage_alive):
        if alive == 0:
            break
        if alive < running:
            handle, running = executor.prefix(handle, alive), alive
        handle, _ = executor.run(k, handle)
