"""Gradient rescaling on the trunk of a staged model (gradient equilibrium, IMTA / BoostNet on MSDNet).

With K exits, the state after the segment of exit i (0-based) feeds both head i and the rest of the
network. Gradient equilibrium (Li et al., "Improved Techniques for Training Adaptive Deep Networks",
ICCV 2019) multiplies the gradient flowing back from head i by ``1 / (K - i)`` and the gradient flowing
back from the later segments by ``(K - i - 1) / (K - i)``, so the gradient reaching early blocks stays
a convex combination of the exits' gradients instead of their growing sum. The forward values are
unchanged; only the backward pass is rescaled.

Which tensors of a nested state carry the rescaled trunk gradient (``scope``):

* ``"head_inputs"``: only the tensors exit head ``i`` reads, as the papers do on MSDNet (the head reads the
  coarsest-scale map, so only that map's trunk gradient is rescaled; the finer scales pass the later exits'
  gradient unscaled). Found once per exit by a probe: one backward through the head (eval mode, two rows).
  For single-tensor states (native CNNs, timm and torchvision CNNs, ViT tokens) both scopes are identical;
  for the Hugging Face encoder the head reads the hidden states, not the attention mask.
* ``"state"``: every float tensor of the state. On MSDNet this also scales the finer maps after each exit,
  so the early blocks receive a compounded ``1/K`` of the later exits' gradient on every scale.

The head's own gradient (``1/(K-i)``) is the same in both scopes: a head only sends gradient into what it reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, autograd, nn

from ..errors import ConfigError
from ..runtime.state import State, map_state, slice_state, state_tensors

if TYPE_CHECKING:
    from ..runtime.staged import StagedModel

__all__ = [
    "RESCALE_SCOPES",
    "RescaleScope",
    "scale_grad",
    "forward_all_rescaled",
    "equilibrium_scales",
    "head_read_mask",
]

RescaleScope = Literal["head_inputs", "state"]
RESCALE_SCOPES: tuple[str, ...] = ("head_inputs", "state")


class _ScaleGrad(autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def scale_grad(state: State, scale: float, mask: Sequence[bool] | None = None) -> State:
    """Identity in the forward pass; multiplies the gradient of the float tensors in ``state`` by ``scale``.

    ``mask`` (one flag per tensor, in :func:`~adaptnn.runtime.state.state_tensors` order) limits the rescaling to
    the flagged tensors; ``None`` rescales every float tensor.
    """
    flags = iter(mask) if mask is not None else None

    def rescale(t: Tensor) -> Tensor:
        chosen = flags is None or next(flags)
        return _ScaleGrad.apply(t, scale) if chosen and t.is_floating_point() and t.requires_grad else t

    return map_state(state, rescale)


def check_scope(scope: str) -> str:
    """Return ``scope`` if it is one of :data:`RESCALE_SCOPES`, else raise a one-line :class:`ConfigError`."""
    if scope not in RESCALE_SCOPES:
        raise ConfigError(f"rescale_scope must be one of {', '.join(RESCALE_SCOPES)}, got {scope!r}")
    return scope


def head_read_mask(head: nn.Module, state: State) -> list[bool]:
    """Which tensors of ``state`` (in ``state_tensors`` order) the output of ``head`` depends on.

    A probe: the head runs in eval mode (running statistics untouched) on two detached rows of the state, and one
    backward marks the tensors the gradient reaches. Integer tensors (masks, indices) never carry gradient.
    """
    rows = slice_state(state, 2)
    probe = map_state(rows, lambda t: t.detach().requires_grad_(t.is_floating_point()))
    leaves = state_tensors(probe)
    floats = [t for t in leaves if t.requires_grad]
    was_training = head.training
    head.train(False)
    try:
        with torch.enable_grad():
            outputs = state_tensors(head(probe))
            total = sum(out.float().sum() for out in outputs if out.is_floating_point())
            grads = iter(autograd.grad(total, floats, allow_unused=True) if floats else ())
    finally:
        head.train(was_training)
    return [t.requires_grad and next(grads) is not None for t in leaves]


def equilibrium_scales(num_exits: int) -> list[tuple[float, float]]:
    """``(head_scale, trunk_scale)`` for every exit: ``(1/(K-i), (K-i-1)/(K-i))``; the last is ``(1, 0)``."""
    return [(1.0 / (num_exits - i), (num_exits - i - 1) / (num_exits - i)) for i in range(num_exits)]


def forward_all_rescaled(
    model: StagedModel,
    x: Tensor,
    scope: RescaleScope = "head_inputs",
    masks: dict[int, list[bool]] | None = None,
) -> list[Tensor]:
    """``model.forward_all(x)`` with gradient-equilibrium rescaling at every exit but the last.

    One :meth:`~adaptnn.runtime.StagedModel.walk`: the ``head`` callback scales the gradient reaching the state
    through head ``k`` by ``1/(K-k)``, the ``after_exit`` callback scales the gradient through the rest of the
    trunk by ``(K-k-1)/(K-k)`` on the tensors chosen by ``scope`` (see the module docstring). ``masks`` caches the
    ``"head_inputs"`` probe per exit across calls (pass the same dict every step).
    """
    check_scope(scope)
    model.check_input(x, check_finite=False)
    scales = equilibrium_scales(model.num_exits)
    last = model.num_exits - 1
    cache = masks if masks is not None else {}

    def head(k: int, module: nn.Module, state: State) -> Tensor:
        if k != last and scope == "head_inputs" and k not in cache:
            cache[k] = head_read_mask(module, state)
        return module(state if k == last else scale_grad(state, scales[k][0]))

    def after_exit(k: int, state: State) -> State:
        if k == last:
            return state
        return scale_grad(state, scales[k][1], cache[k] if scope == "head_inputs" else None)

    return model.walk(x, head=head, after_exit=after_exit)
