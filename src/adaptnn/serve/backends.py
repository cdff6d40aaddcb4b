"""How the serving engine runs one stage on a batch of pooled rows: PyTorch executors or exported ONNX stages.

A backend maps ``(stage k, state of n rows, policy state of those rows)`` to the next state, each row's
prediction, a "done" mask and the new policy state. Unlike :class:`~adaptnn.runtime.execution.StageExecutor`'s
handle, the state a backend returns is a plain nested state (see :mod:`adaptnn.runtime.state`), so rows of many
requests can be concatenated, split and compacted between stages.

* :class:`TorchBackend`: a :class:`~adaptnn.runtime.StagedModel` and an :class:`~adaptnn.runtime.ExitPolicy`,
  the stage run by an executor whose handle is the state (:class:`~adaptnn.runtime.EagerStages`, also over a
  model whose parts were compiled with :meth:`~adaptnn.runtime.StagedModel.compile_parts`; on a GPU
  :class:`~adaptnn.runtime.cuda_graphs.PooledGraphStages`, one CUDA graph per stage and batch-size bucket);
* :class:`OnnxBackend`: the per-stage files of a ``stages`` export, run with onnxruntime through
  :meth:`~adaptnn.export.StagesRunner.run_stage` (the exit rule's state, if any, travels inside the export's
  carried state).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from ..export.runner import StagesRunner
from ..runtime.cuda_graphs import GraphedStages
from ..runtime.execution import EagerStages, StageExecutor
from ..runtime.policy import ExitPolicy
from ..runtime.staged import StagedModel, check_policy
from ..runtime.state import State, state_tensors

__all__ = ["StageBackend", "TorchBackend", "OnnxBackend", "check_row_state"]


class StageBackend(Protocol):
    """What the engine needs from a model runtime."""

    num_exits: int
    sample_shape: tuple[int, ...] | None
    input_dtype: torch.dtype

    def check(self, x: Tensor) -> Tensor:
        """Validate one request's rows ``[n, ...]`` (raise :class:`InputError`); return what stage 0 takes."""

    def exit_macs(self) -> Tensor:
        """Cumulative MACs to reach each exit, float64 ``[K]`` (for the input shape the backend serves)."""

    def init_policy_state(self, n: int) -> State:
        """Per-row policy state of ``n`` new rows (``None`` for stateless rules)."""

    def run_stage(self, k: int, state: State, policy_state: State) -> tuple[State, Tensor, Tensor, State]:
        """Stage ``k`` on ``n`` rows: ``(next state, prediction [n, C], done [n] bool, next policy state)``."""


def _policy_name(policy: object) -> str:
    return str(getattr(policy, "name", "") or type(policy).__name__)


def check_row_state(state: State, n: int, what: str) -> None:
    """Raise :class:`ConfigError` unless every tensor of ``state`` has the ``n`` rows as dim 0.

    The engine concatenates and splits rows of many requests, so anything carried between stages must be per
    row; a scalar or batch-level tensor (e.g. a running count over the whole batch) cannot be pooled.
    """
    for t in state_tensors(state):
        if t.dim() == 0 or t.shape[0] != n:
            raise ConfigError(
                f"{what} carries a tensor of shape {list(t.shape)} for {n} rows; the serving engine pools rows of "
                "many requests and needs every carried tensor to have the rows as dim 0"
            )


class TorchBackend:
    """A staged model and its exit policy, stages run by a PyTorch executor.

    Args:
        model: the staged model (put in eval mode), on ``device``.
        policy: the exit rule; stateful rules work when their state is per row (checked here, a
            :class:`ConfigError` naming the policy otherwise).
        executor: how a stage runs; its handle must be the state (default :class:`EagerStages`).
        sample_shape: per-sample input shape used for the MACs (default: the model's fixed input shape).
    """

    def __init__(
        self,
        model: StagedModel,
        policy: ExitPolicy,
        *,
        executor: StageExecutor | None = None,
        sample_shape: Sequence[int] | None = None,
    ) -> None:
        check_policy(policy)
        policy.check_num_exits(model.num_exits)
        self.model = model.eval()
        self.policy = policy
        if isinstance(executor, GraphedStages):
            raise ConfigError(
                "GraphedStages keeps rows in its captured CUDA-graph buffers, so rows of other requests cannot join "
                "them between stages; serve with PooledGraphStages (GraphedModel.pooled_executor()) or EagerStages "
                "(optionally over model.compile_parts()) instead"
            )
        self.executor = executor if executor is not None else EagerStages(model)
        self.num_exits = model.num_exits
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        #: kernels are queued, not waited for (a GPU): the engine then pipelines its steps (``Engine(pipeline=)``)
        self.asynchronous = self.device.type == "cuda"
        probe = policy.init_state(2, self.device)
        check_row_state(probe, 2, f"policy {_policy_name(policy)!r}")
        self._policy_stateful = probe is not None
        spec = model.input_spec
        if sample_shape is None and spec is not None and all(s is not None for s in spec.shape):
            sample_shape = spec.shape  # type: ignore[assignment]
        self.sample_shape: tuple[int, ...] | None = tuple(sample_shape) if sample_shape is not None else None
        integer = spec is not None and spec.dtype_kind == "int"
        self.input_dtype: torch.dtype = torch.long if integer else (model._param_dtype or torch.float32)
        self._macs: Tensor | None = None

    def check(self, x: Tensor) -> Tensor:
        self.model.check_input(x)
        if self.sample_shape is not None and tuple(x.shape[1:]) != self.sample_shape:
            raise InputError(f"expected samples of shape {list(self.sample_shape)}, got {list(x.shape[1:])}")
        return x.to(self.device)

    def exit_macs(self) -> Tensor:
        if self._macs is None:
            if self.sample_shape is None:
                raise ConfigError("the model's input shape is not fixed; give TorchBackend a sample_shape")
            probe = torch.zeros((1, *self.sample_shape), dtype=self.model._param_dtype or torch.float32)
            self._macs = self.model.exit_costs(probe).cpu()
        return self._macs

    def init_policy_state(self, n: int) -> State:
        return self.policy.init_state(n, self.device) if self._policy_stateful else None

    def run_stage(self, k: int, state: State, policy_state: State) -> tuple[State, Tensor, Tensor, State]:
        with torch.inference_mode():
            handle = self.executor.start(state) if k == 0 else state
            handle, logits = self.executor.run(k, handle)
            done, prediction, policy_state = self.policy.decide(k, logits, policy_state)
            return handle, self.executor.own(prediction), done, policy_state


class OnnxBackend:
    """The per-stage ONNX files of a ``stages`` export, run with onnxruntime (CPU).

    The state between stages is the export's flat tensor list, held as torch tensors sharing memory with
    onnxruntime's numpy outputs (no copies), so the engine pools it like a PyTorch state. A row is done at
    exit ``k`` when the exported score reaches the threshold, exactly as :class:`StagesRunner` decides.

    Args:
        export_dir: a directory written by :func:`~adaptnn.export.export_stages`.
        thresholds: replace the manifest's thresholds (``None``: keep them).
        intra_op_threads: onnxruntime's intra-op threads (0: its default).
    """

    def __init__(
        self, export_dir: str | Path, thresholds: Sequence[float | None] | None = None, *, intra_op_threads: int = 0
    ) -> None:
        self.runner = StagesRunner(export_dir, thresholds, intra_op_threads=intra_op_threads)
        self.asynchronous = False  # onnxruntime on CPU returns finished outputs
        self.num_exits = self.runner.num_exits
        shape = self.runner.input_shape
        self.sample_shape: tuple[int, ...] | None = None if any(s is None for s in shape) else tuple(shape)
        self.input_dtype: torch.dtype = torch.from_numpy(np.zeros(0, dtype=self.runner.input_dtype)).dtype

    def check(self, x: Tensor) -> Tensor:
        array = self.runner.check_input(np.asarray(x.detach().cpu().numpy()))
        if self.sample_shape is None:
            raise ConfigError("the export's input shape is not fixed; the serving engine needs one sample shape")
        return torch.from_numpy(array)

    def exit_macs(self) -> Tensor:
        return torch.from_numpy(self.runner.macs_for((1, *(self.sample_shape or ())))).to(torch.float64)

    def init_policy_state(self, n: int) -> State:
        return None

    def run_stage(self, k: int, state: State, policy_state: State) -> tuple[State, Tensor, Tensor, State]:
        tensors = [state] if k == 0 else state
        next_state, logits, done = self.runner.run_stage(k, [np.ascontiguousarray(t.numpy()) for t in tensors])
        nxt = [torch.from_numpy(t) for t in next_state]  # the flat state list: pooled like any nested state
        return nxt, torch.from_numpy(logits), torch.from_numpy(done), None
