"""One ONNX graph with per-sample early exit inside it (any batch size).

:func:`export_graph` unrolls the K stages of a :class:`~adaptnn.runtime.StagedModel` in Python (K is static)
and traces them with ``torch.onnx.export(..., dynamo=True)``. After each stage the policy's score is computed
for the rows still running, finished rows are scattered into the outputs (ScatterND) and only the survivors
are gathered (NonZero + Gather) for the next stage, so the batch shrinks inside the graph. Thresholds and
temperatures are graph *inputs*: recalibrating a policy never needs a new export.

Graph signature::

    inputs:  x [B, ...], thresholds [K-1] float32, temperatures [K] float32 (only when the policy has them)
    outputs: logits [B, C], exit_index [B] int64, macs [B] float64 (cumulative MACs of the exit taken)

Every threshold rule exports: score, prediction and state come from the policy's own ``step`` (so ``logits``
is what ``run_dynamic`` returns, e.g. the ensembles' combination), and a stateful rule's state (patience's
counter, the ensembles' running combination, the learned rule's features) is compacted with the model's state.
A sequence model's token dimension stays dynamic (MACs then follow the length, see :func:`exit_costs`).

A stage whose rows all left earlier runs on an empty (0-row) batch: onnxruntime's Conv, Gemm, pooling and
normalisation accept it, and nothing is written for those rows. At trace time the survivor count is declared
non-zero (``torch._check``): without that hint torch.export stops at batch norm, whose kernel branches on an
empty input; the hint adds no check to the ONNX graph, so the 0-row case still runs there.

Do not compile exit graphs with AOTInductor: in torch 2.14.1 it returns wrong values after a data-dependent
gather (see ``tests/test_export_graph.py``); ``torch.export`` and onnxruntime are exact.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..policies.base import ThresholdPolicy
from ..runtime.staged import StagedModel
from ..runtime.state import State, index_state
from .stages import (
    DEFAULT_OPSET,
    _example_batch,
    _longer,
    _macs_by_length,
    _translations,
    _variable_dim,
    check_exportable_policy,
    policy_label,
    policy_modules,
    verify_against_dynamic,
)

__all__ = ["export_graph", "policy_thresholds", "runtime_policy", "DEFAULT_OPSET"]


def policy_thresholds(policy: ThresholdPolicy, num_exits: int) -> Tensor:
    """The policy's ``K-1`` thresholds as a float32 tensor (``inf`` for disabled or missing exits)."""
    values = [policy.threshold_at(k) for k in range(num_exits - 1)]
    return torch.tensor(values, dtype=torch.float32)


def runtime_policy(policy: ThresholdPolicy, temperatures: Tensor | None) -> ThresholdPolicy:
    """``policy`` with its temperatures replaced by a graph input (``policy.scaled`` indexes it per exit)."""
    if temperatures is None:
        return policy
    traced = copy.copy(policy)
    traced.temperatures = temperatures  # type: ignore[assignment]
    return traced


def _check_model(model: nn.Module) -> StagedModel:
    if not isinstance(model, StagedModel):
        raise ConfigError(f"export needs a StagedModel, got {type(model).__name__}")
    if model.training:
        raise ConfigError("export needs the model in eval mode: call model.eval() first")
    return model


def register_costs(module: nn.Module, costs: Tensor, by_length: dict[str, Any] | None) -> None:
    """Give ``module`` the exits' MACs: buffers ``costs`` [K] and, for a variable-length input, ``length_coeffs``."""
    module.register_buffer("costs", costs.to(torch.float64), persistent=False)
    module.length_dim = None if by_length is None else int(by_length["dim"])
    coeffs = torch.zeros(0, 3) if by_length is None else torch.tensor(by_length["coefficients"])
    module.register_buffer("length_coeffs", coeffs.to(torch.float64), persistent=False)


def exit_costs(module: nn.Module, x: Tensor) -> Tensor:
    """Cumulative MACs of every exit for input ``x``: the constant ``costs``, or ``round(c0 + c1 L + c2 L^2)`` of
    its length ``L`` along the variable dim (exact for convolutions, linear layers and attention)."""
    if module.length_dim is None:
        return module.costs
    n = torch.scalar_tensor(x.shape[module.length_dim], dtype=torch.float64, device=x.device)
    return torch.round(module.length_coeffs @ torch.stack([torch.ones_like(n), n, n * n]))


class _ExitProgram(nn.Module):
    """What an exported exit program holds (the model, the exit rule with its modules, the exit costs) and its step."""

    def __init__(
        self, model: StagedModel, policy: ThresholdPolicy, costs: Tensor, by_length: dict[str, Any] | None
    ) -> None:
        super().__init__()
        self.model = model
        self.policy = policy
        self.policy_modules = policy_modules(policy)
        register_costs(self, costs, by_length)

    def stage(
        self, k: int, state: State, policy: ThresholdPolicy, policy_state: State
    ) -> tuple[State, Tensor, Tensor, State]:
        """Stage ``k`` (its segments, then head ``k`` and the rule): ``(state, score, prediction, policy_state)``."""
        for j in self.model.stages[k]:
            state = self.model.segments[j](state)
        score, prediction, policy_state = policy.step(k, self.model.heads[k](state), policy_state)
        return state, score, prediction, policy_state


class _InGraphExit(_ExitProgram):
    """The unrolled dynamic loop: shrink the batch after every exit, scatter finished rows into the outputs."""

    def _run(self, x: Tensor, thresholds: Tensor, temperatures: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        model = self.model
        policy = runtime_policy(self.policy, temperatures)
        num_exits = model.num_exits
        batch = x.shape[0]
        active = torch.arange(batch, device=x.device)
        exit_index = torch.full((batch,), num_exits - 1, dtype=torch.long, device=x.device)
        out: Tensor | None = None
        state: State = x
        policy_state: State = None
        for k in range(num_exits):
            state, score, prediction, policy_state = self.stage(k, state, policy, policy_state)
            if out is None:
                out = prediction.new_zeros((batch, *prediction.shape[1:]))
            if k == num_exits - 1:  # the last exit takes everyone still running
                out = out.index_put((active,), prediction)
                break
            done = score >= thresholds[k]
            done_idx = torch.nonzero(done).squeeze(1)
            keep_idx = torch.nonzero(~done).squeeze(1)
            # trace-time hint only (no runtime check in ONNX): kernels such as batch norm branch on an empty input
            torch._check(keep_idx.shape[0] != 0)
            leaving = active.index_select(0, done_idx)
            out = out.index_put((leaving,), prediction.index_select(0, done_idx))
            exit_index = exit_index.index_put((leaving,), torch.full_like(leaving, k))
            active = active.index_select(0, keep_idx)
            state = index_state(state, keep_idx)
            policy_state = index_state(policy_state, keep_idx)
        assert out is not None
        return out, exit_index, exit_costs(self, x).index_select(0, exit_index)


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
        policy: a threshold rule (:func:`~adaptnn.export.stages.check_exportable_policy`): confidence, entropy,
            margin, patience, the ensembles, learned; its thresholds only serve the trace: they are a runtime
            input. When it has temperatures the graph takes ``temperatures`` [K] as an input too.
        example: an input batch ``[B, ...]`` (any B >= 1); its per-sample shape is fixed in the graph (except a
            sequence model's token dim), the batch size is not. Also the verification batch.
        path: the ``.onnx`` file to write (parent folders are created).
        opset: ONNX opset version.

    Returns:
        ``path`` as a :class:`Path`. Inputs ``x``, ``thresholds`` (``temperatures``); outputs ``logits``,
        ``exit_index``, ``macs``.

    Raises:
        ConfigError: unsupported policy or model, an exporter failure (naming the policy);
            :class:`~adaptnn.export.ExportMismatchError` when onnxruntime does not reproduce ``run_dynamic``.
    """
    staged = _check_model(model)
    policy = check_exportable_policy(policy)
    num_exits = staged.num_exits
    policy.check_num_exits(num_exits)
    example = _example_batch(staged, example)
    temps = policy.temperatures
    costs = staged.exit_costs(example).detach()
    length_dim = _variable_dim(staged, example)
    by_length = _macs_by_length(staged, example, [] if length_dim is None else [length_dim])
    wrapper = (_WithTemps if temps is not None else _NoTemps)(staged, policy, costs, by_length).eval()
    path = Path(path)
    thresholds = policy_thresholds(policy, num_exits)
    tmp = write_exit_graph(wrapper, example, thresholds, temps, path, opset=opset, length_dim=length_dim)
    verify_onnx_file(tmp, path, staged, policy, example, longer=_longer(staged, example))
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
    length_dim: int | None = None,
) -> Path:
    """Export ``wrapper(x, thresholds[, temperatures])`` to a hidden file beside ``path`` (not yet verified).

    Inputs are ``x``, ``thresholds`` (and ``temperatures`` when the policy has them), outputs ``logits``,
    ``exit_index``, ``macs``; ``dynamic_batch`` makes the batch dimension of ``x`` symbolic, ``length_dim`` one
    more dimension (the tokens of a sequence model). Returns the file.
    """
    args: tuple[Tensor, ...] = (example, thresholds)
    names = ["x", "thresholds"]
    x_dims: dict[int, object] = {0: torch.export.Dim("batch")} if dynamic_batch else {}
    if length_dim is not None:
        x_dims[length_dim] = torch.export.Dim.DYNAMIC
    dims: dict[str, dict[int, object] | None] = {"x": x_dims or None, "thresholds": None}
    if temperatures is not None:
        args = (*args, torch.tensor(list(temperatures), dtype=torch.float32))
        names.append("temperatures")
        dims["temperatures"] = None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.unverified")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                args,
                str(tmp),
                input_names=names,
                output_names=["logits", "exit_index", "macs"],
                dynamic_shapes=dims if x_dims else None,
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
                custom_translation_table=_translations(),
            )
    except Exception as err:  # noqa: BLE001 - the exporter raises many types; the user gets one line
        tmp.unlink(missing_ok=True)
        reason = " ".join(str(err).split())[:300]
        policy = getattr(wrapper, "policy", None)
        raise ConfigError(f"ONNX export of {path.name} failed (policy {policy_label(policy)}): {reason}") from None
    return tmp


def verify_onnx_file(
    path: Path,
    final: Path,
    model: StagedModel,
    policy: ThresholdPolicy,
    example: Tensor,
    *,
    batch_one: bool = False,
    longer: Tensor | None = None,
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

        verify_against_dynamic(run, model, policy, example, batch_one=batch_one, longer=longer)
        os.replace(path, final)
    finally:
        path.unlink(missing_ok=True)
