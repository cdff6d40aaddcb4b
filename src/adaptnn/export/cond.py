"""Batch-1 ONNX export with nested ``torch.cond`` branches: onnxruntime runs only the stages a sample needs.

After stage k the single sample's score is compared with ``thresholds[k]``; the ``If`` node either returns
exit k's logits or runs the rest of the network (the next stage and its own ``If``). Same inputs and outputs
as :func:`adaptnn.export.graph.export_graph` (``x`` [1, ...], ``thresholds`` [K-1], optional ``temperatures``
[K]; ``logits`` [1, C], ``exit_index`` [1] int64, ``macs`` [1] float64), but the batch size is fixed to 1.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ..errors import ConfigError
from ..runtime.staged import StagedModel
from ..runtime.state import State
from .graph import (
    DEFAULT_OPSET,
    ScoreFn,
    _check_model,
    exportable_score,
    policy_thresholds,
    verify_onnx_file,
    write_exit_graph,
)

__all__ = ["export_cond"]


class _CondExit(nn.Module):
    """Stage k, then ``If(score >= T_k, exit k, rest)``, nested down to the last exit."""

    def __init__(self, model: StagedModel, score: ScoreFn, costs: Tensor) -> None:
        super().__init__()
        self.model = model
        self.score = score
        self.register_buffer("costs", costs.to(torch.float64), persistent=False)

    def _from(self, k: int, state: State, thresholds: Tensor, temperatures: Tensor | None) -> tuple[Tensor, ...]:
        model = self.model
        for j in model.stages[k]:
            state = model.segments[j](state)
        logits = model.heads[k](state)
        exit_k = torch.full((1,), k, dtype=torch.long, device=logits.device)
        macs_k = self.costs.index_select(0, exit_k)
        if k == model.num_exits - 1:
            return logits, exit_k, macs_k
        scaled = logits.float() if temperatures is None else logits.float() / temperatures[k]
        stop = self.score(scaled)[0] >= thresholds[k]
        leaves, spec = pytree.tree_flatten(state)
        extra = [] if temperatures is None else [temperatures]

        def leave(logits: Tensor, exit_k: Tensor, macs_k: Tensor, thresholds: Tensor, *rest: Tensor) -> tuple:
            return logits.clone(), exit_k.clone(), macs_k.clone()

        def go_on(logits: Tensor, exit_k: Tensor, macs_k: Tensor, thresholds: Tensor, *rest: Tensor) -> tuple:
            temps = rest[0] if temperatures is not None else None
            inner = pytree.tree_unflatten(list(rest[len(extra) :]), spec)
            return self._from(k + 1, inner, thresholds, temps)

        return tuple(torch.cond(stop, leave, go_on, (logits, exit_k, macs_k, thresholds, *extra, *leaves)))


class _WithTemps(_CondExit):
    def forward(self, x: Tensor, thresholds: Tensor, temperatures: Tensor) -> tuple[Tensor, ...]:
        return self._from(0, x, thresholds, temperatures)


class _NoTemps(_CondExit):
    def forward(self, x: Tensor, thresholds: Tensor) -> tuple[Tensor, ...]:
        return self._from(0, x, thresholds, None)


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
        policy: a stateless threshold rule (confidence, entropy, margin); thresholds (and temperatures, when
            the policy has them) are runtime inputs.
        example: one input sample ``[1, ...]``; a larger batch is cut to its first sample for the trace, and up to
            8 of its samples are checked one by one against ``run_dynamic`` before the file is written.
        path: the ``.onnx`` file to write.
        opset: ONNX opset version.

    Returns:
        ``path`` as a :class:`Path`.
    """
    staged = _check_model(model)
    score = exportable_score(policy)
    num_exits = staged.num_exits
    policy.check_num_exits(num_exits)  # type: ignore[attr-defined]
    if example.dim() == 0 or example.shape[0] < 1:
        raise ConfigError(f"export_cond needs an example with one sample, got shape {list(example.shape)}")
    samples, example = example, example[:1]  # verified on up to 8 samples of the given batch, one by one
    staged.check_input(samples)
    temps = policy.temperatures  # type: ignore[attr-defined]
    costs = staged.exit_costs(example).detach()
    wrapper = (_WithTemps if temps is not None else _NoTemps)(staged, score, costs).eval()
    path = Path(path)
    thresholds = policy_thresholds(policy, num_exits)  # type: ignore[arg-type]
    tmp = write_exit_graph(wrapper, example, thresholds, temps, path, opset=opset, dynamic_batch=False)
    verify_onnx_file(tmp, path, staged, policy, samples, batch_one=True)  # type: ignore[arg-type]
    return path
