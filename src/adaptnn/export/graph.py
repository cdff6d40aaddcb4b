"""One ONNX graph with per-sample early exit inside it (any batch size).

:func:`export_graph` unrolls the K stages of a :class:`~adaptnn.runtime.StagedModel` in Python (K is static)
and traces them with ``torch.onnx.export(..., dynamo=True)``. After each stage the policy's score is computed
for the rows still running, finished rows are scattered into the outputs (ScatterND) and only the survivors
are gathered (NonZero + Gather) for the next stage, so the batch shrinks inside the graph. Thresholds and
temperatures are graph *inputs*: recalibrating a policy never needs a new export.

Graph signature::

    inputs:  x [B, ...], thresholds [K-1] float32, temperatures [K] float32 (only when the policy has them)
    outputs: logits [B, C], exit_index [B] int64, macs [B] float64 (cumulative MACs of the exit taken)

Only stateless threshold rules can be exported (confidence, entropy, margin, with or without temperatures);
stateful ones (patience, ensembles, learned) raise :class:`~adaptnn.errors.ConfigError`.

A stage whose rows all left earlier runs on an empty (0-row) batch: onnxruntime's Conv, Gemm, pooling and
normalisation accept it, and nothing is written for those rows. At trace time the survivor count is declared
non-zero (``torch._check``): without that hint torch.export stops at batch norm, whose kernel branches on an
empty input; the hint adds no check to the ONNX graph, so the 0-row case still runs there.

Do not compile exit graphs with AOTInductor: in torch 2.14.1 it returns wrong values after a data-dependent
gather (see ``tests/test_export_graph.py``); ``torch.export`` and onnxruntime are exact.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..policies.base import ThresholdPolicy, max_softmax, normalised_certainty, softmax_margin
from ..policies.confidence import ConfidencePolicy, EntropyPolicy, MarginPolicy
from ..runtime.staged import StagedModel
from ..runtime.state import State, index_state
from .stages import DEFAULT_OPSET, check_exportable_policy, verify_against_dynamic

__all__ = ["export_graph", "exportable_score", "policy_thresholds", "DEFAULT_OPSET"]

ScoreFn = Callable[[Tensor], Tensor]

#: each stateless rule's score, computed on runtime-temperature-scaled logits (the policies' own functions)
_SCORES: dict[type, ScoreFn] = {
    ConfidencePolicy: max_softmax,
    EntropyPolicy: normalised_certainty,
    MarginPolicy: softmax_margin,
}


def exportable_score(policy: object) -> ScoreFn:
    """The traceable score function (float32 logits ``[b, C]`` -> ``[b]``) of a stateless threshold rule.

    Raises :class:`ConfigError` naming the policy when it carries state or is not a threshold rule
    (:func:`~adaptnn.export.stages.check_exportable_policy`, the one check for every export mode).
    """
    check_exportable_policy(policy)
    return next(fn for cls, fn in _SCORES.items() if isinstance(policy, cls))


def policy_thresholds(policy: ConfidencePolicy | EntropyPolicy | MarginPolicy, num_exits: int) -> Tensor:
    """The policy's ``K-1`` thresholds as a float32 tensor (``inf`` for disabled or missing exits)."""
    values = [policy.threshold_at(k) for k in range(num_exits - 1)]
    return torch.tensor(values, dtype=torch.float32)


def _check_model(model: nn.Module) -> StagedModel:
    if not isinstance(model, StagedModel):
        raise ConfigError(f"export needs a StagedModel, got {type(model).__name__}")
    if model.training:
        raise ConfigError("export needs the model in eval mode: call model.eval() first")
    return model


class _InGraphExit(nn.Module):
    """The unrolled dynamic loop: shrink the batch after every exit, scatter finished rows into the outputs."""

    def __init__(self, model: StagedModel, score: ScoreFn, costs: Tensor, num_classes: int, with_temps: bool) -> None:
        super().__init__()
        self.model = model
        self.score = score
        self.register_buffer("costs", costs.to(torch.float64), persistent=False)
        self.num_classes = num_classes
        self.with_temps = with_temps

    def _run(self, x: Tensor, thresholds: Tensor, temperatures: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        model = self.model
        num_exits = model.num_exits
        batch = x.shape[0]
        active = torch.arange(batch, device=x.device)
        exit_index = torch.full((batch,), num_exits - 1, dtype=torch.long, device=x.device)
        out: Tensor | None = None
        state: State = x
        for k in range(num_exits):
            for j in model.stages[k]:
                state = model.segments[j](state)
            logits = model.heads[k](state)
            if out is None:
                out = logits.new_zeros((batch, self.num_classes))
            if k == num_exits - 1:  # the last exit takes everyone still running
                out = out.index_put((active,), logits)
                break
            scaled = logits.float() if temperatures is None else logits.float() / temperatures[k]
            done = self.score(scaled) >= thresholds[k]
            done_idx = torch.nonzero(done).squeeze(1)
            keep_idx = torch.nonzero(~done).squeeze(1)
            # trace-time hint only (no runtime check in ONNX): kernels such as batch norm branch on an empty input
            torch._check(keep_idx.shape[0] != 0)
            leaving = active.index_select(0, done_idx)
            out = out.index_put((leaving,), logits.index_select(0, done_idx))
            exit_index = exit_index.index_put((leaving,), torch.full_like(leaving, k))
            active = active.index_select(0, keep_idx)
            state = index_state(state, keep_idx)
        assert out is not None
        return out, exit_index, self.costs.index_select(0, exit_index)


class _WithTemps(_InGraphExit):
    def forward(self, x: Tensor, thresholds: Tensor, temperatures: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self._run(x, thresholds, temperatures)


class _NoTemps(_InGraphExit):
    def forward(self, x: Tensor, thresholds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self._run(x, thresholds, None)


def export_graph(
    model: StagedModel,
    policy: object,
    example: Tensor,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ONE ONNX graph that runs ``model`` with per-sample early exit under ``policy``'s rule.

    Args:
        model: a :class:`StagedModel` in eval mode.
        policy: a stateless threshold rule (:class:`ConfidencePolicy`, :class:`EntropyPolicy`,
            :class:`MarginPolicy`); its thresholds only serve the trace: they are a runtime input. When it has
            temperatures the graph takes ``temperatures`` [K] as an input too.
        example: an input batch ``[B, ...]`` (any B >= 1); its per-sample shape is fixed in the graph, the batch
            size is not. ``model.exit_costs(example)`` is stored as the MACs constant.
        path: the ``.onnx`` file to write (parent folders are created).
        opset: ONNX opset version.

    Returns:
        ``path`` as a :class:`Path`. Inputs ``x``, ``thresholds`` (``temperatures``); outputs ``logits``,
        ``exit_index``, ``macs``.
    """
    staged = _check_model(model)
    score = exportable_score(policy)
    num_exits = staged.num_exits
    policy.check_num_exits(num_exits)  # type: ignore[attr-defined]
    staged.check_input(example)
    with torch.no_grad():
        num_classes = int(staged.forward(example[:1]).shape[-1])
    temps = policy.temperatures  # type: ignore[attr-defined]
    costs = staged.exit_costs(example).detach()
    wrapper = (_WithTemps if temps is not None else _NoTemps)(staged, score, costs, num_classes, temps is not None)
    wrapper.eval()
    path = Path(path)
    tmp = write_exit_graph(wrapper, example, policy_thresholds(policy, num_exits), temps, path, opset=opset)
    verify_onnx_file(tmp, path, staged, policy, example)  # type: ignore[arg-type]
    return path


def write_exit_graph(
    wrapper: nn.Module,
    example: Tensor,
    thresholds: Tensor,
    temperatures: Sequence[float] | None,
    path: Path,
    *,
    opset: int,
    dynamic_batch: bool = True,
) -> Path:
    """Export ``wrapper(x, thresholds[, temperatures])`` to a hidden file beside ``path`` (not yet verified).

    Inputs are ``x``, ``thresholds`` (and ``temperatures`` when the policy has them), outputs ``logits``,
    ``exit_index``, ``macs``; ``dynamic_batch`` makes the batch dimension of ``x`` symbolic. Returns the file.
    """
    args: tuple[Tensor, ...] = (example, thresholds)
    names = ["x", "thresholds"]
    dims: dict[str, dict[int, object] | None] = {"x": {0: torch.export.Dim("batch")}, "thresholds": None}
    if temperatures is not None:
        args = (*args, torch.tensor(list(temperatures), dtype=torch.float32))
        names.append("temperatures")
        dims["temperatures"] = None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.unverified")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            args,
            str(tmp),
            input_names=names,
            output_names=["logits", "exit_index", "macs"],
            dynamic_shapes=dims if dynamic_batch else None,
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return tmp


def verify_onnx_file(
    path: Path, final: Path, model: StagedModel, policy: ThresholdPolicy, example: Tensor, *, batch_one: bool = False
) -> None:
    """Run the exported file in onnxruntime against ``run_dynamic``; move it to ``final`` only when it matches."""
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        temps = policy.temperatures

        def run(x: Tensor, thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            feeds = {"x": x.numpy(), "thresholds": np.asarray(thresholds, dtype=np.float32)}
            if temps is not None:
                feeds["temperatures"] = np.asarray(temps, dtype=np.float32)
            logits, exit_index, macs = session.run(None, feeds)
            return logits, exit_index, macs

        verify_against_dynamic(run, model, policy, example, batch_one=batch_one)
        os.replace(path, final)
    finally:
        path.unlink(missing_ok=True)
