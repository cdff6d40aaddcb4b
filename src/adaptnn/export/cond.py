"""Batch-1 ONNX export with nested ``torch.cond`` branches: onnxruntime runs only the stages a sample needs.

After stage k the single sample's score is compared with ``thresholds[k]``; the ``If`` node either returns
exit k's prediction or runs the rest of the network (the next stage and its own ``If``). Same inputs and outputs
as :func:`adaptnn.export.graph.export_graph` (``x`` [1, ...], ``thresholds`` [K-1], optional ``temperatures``
[K]; ``logits`` [1, C], ``exit_index`` [1] int64, ``macs`` [1] float64), but the batch size is fixed to 1.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ..errors import ConfigError
from ..runtime.staged import StagedModel
from ..runtime.state import State
from .graph import (
    DEFAULT_OPSET,
    _check_model,
    _ExitProgram,
    exit_costs,
    policy_thresholds,
    runtime_policy,
    verify_onnx_file,
    write_exit_graph,
)
from .stages import _longer, _macs_by_length, _variable_dim, check_exportable_policy

__all__ = ["export_cond"]


class _CondExit(_ExitProgram):
    """Stage k, then ``If(score >= T_k, exit k, rest)``, nested down to the last exit."""

    def _from(
        self, k: int, carried: State, thresholds: Tensor, temperatures: Tensor | None, costs: Tensor
    ) -> tuple[Tensor, ...]:
        model = self.model
        state, policy_state = carried
        policy = runtime_policy(self.policy, temperatures)
        state, score, prediction, policy_state = self.stage(k, state, policy, policy_state)
        exit_k = torch.full((1,), k, dtype=torch.long, device=prediction.device)
        macs_k = costs.index_select(0, exit_k)
        if k == model.num_exits - 1:
            return prediction, exit_k, macs_k
        stop = score[0] >= thresholds[k]
        leaves, spec = pytree.tree_flatten((state, policy_state))
        extra = [] if temperatures is None else [temperatures]

        def leave(
            prediction: Tensor, exit_k: Tensor, macs_k: Tensor, thresholds: Tensor, costs: Tensor, *rest
        ) -> tuple:
            return prediction.clone(), exit_k.clone(), macs_k.clone()

        def go_on(
            prediction: Tensor, exit_k: Tensor, macs_k: Tensor, thresholds: Tensor, costs: Tensor, *rest
        ) -> tuple:
            temps = rest[0] if temperatures is not None else None
            inner = pytree.tree_unflatten(list(rest[len(extra) :]), spec)
            return self._from(k + 1, inner, thresholds, temps, costs)

        operands = (prediction, exit_k, macs_k, thresholds, costs, *extra, *leaves)
        return tuple(torch.cond(stop, leave, go_on, operands))


class _WithTemps(_CondExit):
    def forward(self, x: Tensor, thresholds: Tensor, temperatures: Tensor) -> tuple[Tensor, ...]:
        return self._from(0, (x, None), thresholds, temperatures, exit_costs(self, x))


class _NoTemps(_CondExit):
    def forward(self, x: Tensor, thresholds: Tensor) -> tuple[Tensor, ...]:
        return self._from(0, (x, None), thresholds, None, exit_costs(self, x))


def export_cond(
    model: StagedModel,
    policy: object,
    example: Tensor,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export a batch-1 ONNX graph whose exits are nested ``If`` nodes (only the taken branch runs).

    Args:
        model: a :class:`StagedModel` in eval mode.
        policy: a threshold rule (:func:`~adaptnn.export.stages.check_exportable_policy`; a stateful rule's state
            passes into the branches); thresholds (and temperatures, when the policy has them) are runtime inputs.
        example: one input sample ``[1, ...]``; a larger batch is cut to its first sample for the trace, and up to
            8 of its samples are checked one by one against ``run_dynamic`` before the file is written.
        path: the ``.onnx`` file to write.
        opset: ONNX opset version.

    Returns:
        ``path`` as a :class:`Path`.
    """
    staged = _check_model(model)
    policy = check_exportable_policy(policy)
    num_exits = staged.num_exits
    policy.check_num_exits(num_exits)
    if example.dim() == 0 or example.shape[0] < 1:
        raise ConfigError(f"export_cond needs an example with one sample, got shape {list(example.shape)}")
    samples, example = example, example[:1]  # verified on up to 8 samples of the given batch, one by one
    staged.check_input(samples)
    temps = policy.temperatures
    costs = staged.exit_costs(example).detach()
    length_dim = _variable_dim(staged, example)
    by_length = _macs_by_length(staged, example, [] if length_dim is None else [length_dim])
    wrapper = (_WithTemps if temps is not None else _NoTemps)(staged, policy, costs, by_length).eval()
    path = Path(path)
    thresholds = policy_thresholds(policy, num_exits)
    tmp = write_exit_graph(
        wrapper, example, thresholds, temps, path, opset=opset, dynamic_batch=False, length_dim=length_dim
    )
    longer = _longer(staged, example)
    verify_onnx_file(tmp, path, staged, policy, samples, batch_one=True, longer=longer)
    return path
