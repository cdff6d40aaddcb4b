"""StagedModel: ordered segments with exit heads, run in full or with real per-sample early exit.

A staged model is a list of *segments* (modules mapping a state to the next state; see
:mod:`adaptnn.runtime.state`) and *exit heads* after chosen segments (modules mapping a state to logits). Two
ways to run it:

* :meth:`StagedModel.forward_all` runs every segment and head and returns the logits of every exit
  (training, anytime evaluation, calibration on cached logits);
* :meth:`StagedModel.run_dynamic` really exits early: after each head an :class:`~adaptnn.runtime.ExitPolicy`
  marks finished samples, their outputs are written, and only the remaining samples (model state and
  policy state compacted together) run on.

``forward`` is the plain full model: all segments and only the last head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from .cost import exit_macs
from .execution import EagerStages, dynamic_loop, split_finished, stage_segments
from .policy import ExitPolicy
from .state import State

__all__ = ["StagedModel", "DynamicOutput", "InputSpec", "check_policy", "split_finished"]

_POLICY_METHODS = ("check_num_exits", "init_state", "decide")


def check_policy(policy: object) -> None:
    """Raise :class:`ConfigError` naming the type received unless ``policy`` has the ExitPolicy methods."""
    missing = [name for name in _POLICY_METHODS if not hasattr(policy, name)]
    if missing:
        lacks = f" lacking {', '.join(missing)}" if len(missing) < len(_POLICY_METHODS) else ""
        raise ConfigError(
            f"policy must be an ExitPolicy (methods {', '.join(_POLICY_METHODS)}), got {type(policy).__name__}"
            f"{lacks}; build one with e.g. adaptnn.ConfidencePolicy(thresholds) or "
            "adaptnn.policies.make_policy(name, num_exits)"
        )


def _autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        return bool(torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled())


@dataclass(frozen=True)
class InputSpec:
    """What one input sample must look like.

    Attributes:
        shape: per-sample shape, e.g. ``(3, 32, 32)``; ``None`` entries accept any size.
        dtype_kind: ``"float"`` (images, features) or ``"int"`` (token ids).
        names: names of the dims for error messages, e.g. ``("channels", "height", "width")``.
    """

    shape: tuple[int | None, ...]
    dtype_kind: str = "float"
    names: tuple[str, ...] | None = None

    def check(self, x: object, *, check_finite: bool = True) -> None:
        """Raise :class:`InputError` naming the problem when ``x`` is not a valid batch."""
        if not isinstance(x, Tensor):
            raise InputError(f"expected a torch.Tensor batch, got {type(x).__name__}")
        expected_dims = len(self.shape) + 1
        if x.dim() != expected_dims:
            raise InputError(
                f"expected a batch of shape [batch, {', '.join(self._dim_names())}] ({expected_dims} dims), "
                f"got shape {list(x.shape)} ({x.dim()} dims)"
                + (" - add a batch dimension with x.unsqueeze(0)" if x.dim() == expected_dims - 1 else "")
            )
        for name, want, got in zip(self._dim_names(), self.shape, x.shape[1:], strict=True):
            if want is not None and want != got:
                raise InputError(
                    f"expected {want} {name}, got {got} (input shape {list(x.shape)}, "
                    f"expected [batch, {', '.join(str(s) for s in self.shape)}])"
                )
        if self.dtype_kind == "float" and not x.is_floating_point():
            raise InputError(f"expected a floating-point input, got dtype {x.dtype}; convert with x.float()")
        if self.dtype_kind == "int" and (x.is_floating_point() or x.is_complex()):
            raise InputError(f"expected integer token ids, got dtype {x.dtype}")
        if check_finite and x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
            n_bad = int((~torch.isfinite(x)).sum())
            raise InputError(f"input holds {n_bad} non-finite value(s) (NaN or inf)")

    def _dim_names(self) -> tuple[str, ...]:
        if self.names is not None and len(self.names) == len(self.shape):
            return self.names
        if len(self.shape) == 3:
            return ("channels", "height", "width")
        return tuple(f"dim{i + 1}" for i in range(len(self.shape)))


@dataclass
class DynamicOutput:
    """Result of :meth:`StagedModel.run_dynamic` for a batch of B samples.

    Attributes:
        logits: ``[B, C]`` prediction of each sample at the exit it took.
        exit_index: ``[B]`` long, 0-based exit each sample took.
        macs: ``[B]`` float64, multiply-accumulates spent on each sample (cumulative cost of its exit,
            every head on the way included).
    """

    logits: Tensor
    exit_index: Tensor
    macs: Tensor


class StagedModel(nn.Module):
    """Ordered segments with exit heads after chosen segments.

    Args:
        segments: modules, each mapping the state to the next state (the first receives the input).
        heads: one module per exit, mapping the state after its segment to logits ``[b, C]``.
        exit_after: index of the segment each head follows, strictly increasing, last one the last
            segment. Default: one head after every segment (needs ``len(heads) == len(segments)``).
        input_spec: per-sample input description, checked on every call (shape, dtype, finiteness).
        num_classes: number of classes the heads predict (informational; checked by loaders).
    """

    _param_dtype: torch.dtype | None = None  # instances set it; the class default serves unpickled old models

    def __init__(
        self,
        segments: Sequence[nn.Module],
        heads: Sequence[nn.Module],
        exit_after: Sequence[int] | None = None,
        *,
        input_spec: InputSpec | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if len(segments) == 0 or len(heads) == 0:
            raise ConfigError("a StagedModel needs at least one segment and one exit head")
        if exit_after is None:
            if len(heads) != len(segments):
                raise ConfigError(
                    f"got {len(segments)} segments and {len(heads)} heads: pass exit_after to say which "
                    "segment each head follows"
                )
            exit_after = list(range(len(segments)))
        exit_after = [int(i) for i in exit_after]
        if len(exit_after) != len(heads):
            raise ConfigError(f"exit_after has {len(exit_after)} entries for {len(heads)} heads")
        if any(b <= a for a, b in zip(exit_after, exit_after[1:], strict=False)) or exit_after[0] < 0:
            raise ConfigError(f"exit_after must be strictly increasing and >= 0, got {exit_after}")
        if exit_after[-1] != len(segments) - 1:
            raise ConfigError(
                f"the last head must follow the last segment ({len(segments) - 1}), got exit_after={exit_after}"
            )
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)
        self.exit_after: tuple[int, ...] = tuple(exit_after)
        self.input_spec = input_spec
        self.num_classes = num_classes
        # head index after each segment, -1 where there is none (plain list: no lookups on the hot path)
        self._head_at = [-1] * len(segments)
        for k, seg in enumerate(exit_after):
            self._head_at[seg] = k
        self._cost_cache: dict[tuple, Tensor] = {}
        self.stages: list[range] = stage_segments(self.exit_after)  # segments run before each exit decision
        # dtype of the first floating-point parameter (None: there is none); kept current by _apply
        self._param_dtype: torch.dtype | None = self._first_float_dtype()

    @property
    def num_exits(self) -> int:
        """Number of exit heads (the last one is the full model's classifier)."""
        return len(self.heads)

    def check_input(self, x: Tensor, *, check_finite: bool = True) -> None:
        """Validate a batch against ``input_spec`` (without one, only the tensor check), and its floating dtype.

        A floating-point batch must have the dtype of the model's parameters (e.g. not float64 into a float32
        model), except under autocast; the check is one dtype comparison per call.
        """
        if self.input_spec is not None:
            self.input_spec.check(x, check_finite=check_finite)
        elif not isinstance(x, Tensor):
            raise InputError(f"expected a torch.Tensor batch, got {type(x).__name__}")
        if x.dtype != self._param_dtype and x.is_floating_point():
            self._check_float_dtype(x)

    def _first_float_dtype(self) -> torch.dtype | None:
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), None)

    def _check_float_dtype(self, x: Tensor) -> None:
        """The slow path of the dtype check: re-read the parameters' dtype (they may have been replaced)."""
        self._param_dtype = self._first_float_dtype()
        if self._param_dtype is None or x.dtype == self._param_dtype or _autocast_enabled(x.device.type):
            return
        raise InputError(
            f"input dtype {x.dtype} does not match the model's parameters ({self._param_dtype}); "
            f"convert the batch with x.to({self._param_dtype}) or the model with model.to({x.dtype})"
        )

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> StagedModel:
        """``nn.Module._apply`` (``to``, ``half``, ``cuda`` ...), then the parameters' dtype is read again."""
        out = super()._apply(fn, *args, **kwargs)
        self._param_dtype = self._first_float_dtype()
        return out

    def forward(self, x: Tensor) -> Tensor:
        """The full model: every segment, then only the last head. Returns ``[B, C]`` logits."""
        self.check_input(x, check_finite=False)
        state: State = x
        for segment in self.segments:
            state = segment(state)
        return self.heads[-1](state)

    def forward_all(self, x: Tensor) -> list[Tensor]:
        """Run every segment and every head; returns the K exits' logits, each ``[B, C]``."""
        self.check_input(x, check_finite=False)
        return self.walk(x)

    def walk(
        self,
        x: State,
        *,
        segment: Callable[[int, nn.Module, State], State] | None = None,
        head: Callable[[int, nn.Module, State], Any] | None = None,
        after_exit: Callable[[int, State], State] | None = None,
    ) -> list[Any]:
        """Run the segments in order and each exit head right after its segment: the one stage walk.

        Every tool that needs the pieces one by one (MACs per segment and head, latency profiling, gradient
        rescaling, frozen-backbone caching) passes callbacks instead of re-implementing the loop:

        * ``segment(j, module, state) -> state`` replaces the call of segment ``j`` (default ``module(state)``);
        * ``head(k, module, state) -> out`` replaces the call of exit head ``k`` (default ``module(state)``);
        * ``after_exit(k, state) -> state`` runs after head ``k``, before the next segment (default: no-op).

        No input check: ``x`` may be any state (e.g. on the meta device). Returns the heads' outputs in exit order.
        """
        state: State = x
        outputs: list[Any] = []
        head_at = self._head_at
        for j, module in enumerate(self.segments):
            state = module(state) if segment is None else segment(j, module, state)
            k = head_at[j]
            if k >= 0:
                head_module = self.heads[k]
                outputs.append(head_module(state) if head is None else head(k, head_module, state))
                if after_exit is not None:
                    state = after_exit(k, state)
        return outputs

    def exit_costs(self, x: Tensor) -> Tensor:
        """Cumulative MACs to reach each exit for inputs shaped like ``x`` (float64 ``[K]``, cached)."""
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        cost = self._cost_cache.get(key)
        if cost is None:
            cost = torch.tensor(exit_macs(self, tuple(x.shape[1:]), dtype=x.dtype), dtype=torch.float64)
            cost = cost.to(x.device)
            self._cost_cache[key] = cost
        return cost

    def run_dynamic(self, x: Tensor, policy: ExitPolicy, *, check_finite: bool = True) -> DynamicOutput:
        """Real early exit: samples the policy marks finished leave; only the rest run on.

        Runs under ``torch.inference_mode()``; the model must be in eval mode (batch statistics of
        training-mode normalisation would make each sample's output depend on who else is in the batch).

        Args:
            x: input batch ``[B, ...]``.
            policy: an :class:`~adaptnn.runtime.ExitPolicy`.
            check_finite: reject NaN/inf inputs (one device sync).

        Returns:
            :class:`DynamicOutput` with logits ``[B, C]``, exit index ``[B]`` and MACs per sample ``[B]``.
        """
        if self.training:
            raise ConfigError("run_dynamic needs the model in eval mode: call model.eval() first")
        self.check_input(x, check_finite=check_finite)
        check_policy(policy)
        num_exits = self.num_exits
        policy.check_num_exits(num_exits)
        costs = self.exit_costs(x)
        with torch.inference_mode():
            out, exit_index = dynamic_loop(EagerStages(self), x, policy, num_exits)
            return DynamicOutput(logits=out, exit_index=exit_index, macs=costs[exit_index])

    def compile_parts(self, **compile_kwargs: object) -> StagedModel:
        """Opt-in ``torch.compile`` of every segment and head, with dynamic batch sizes.

        Compaction changes the batch size from call to call, so the parts are compiled with
        ``dynamic=True`` (one graph for all sizes instead of a recompilation per size). Compiling in place
        (``nn.Module.compile``) keeps parameter names, so checkpoints are unaffected. Returns ``self``.
        """
        compile_kwargs.setdefault("dynamic", True)
        for part in [*self.segments, *self.heads]:
            part.compile(**compile_kwargs)
        return self

    def extra_repr(self) -> str:
        return f"num_exits={self.num_exits}, exit_after={list(self.exit_after)}"
