"""Gradient rescaling on the trunk of a staged model (gradient equilibrium, IMTA / BoostNet on MSDNet).

With K exits, the state after the segment of exit i (0-based) feeds both head i and the rest of the
network. Gradient equilibrium (Li et al., "Improved Techniques for Training Adaptive Deep Networks",
ICCV 2019) multiplies the gradient flowing back from head i by ``1 / (K - i)`` and the gradient flowing
back from the later segments by ``(K - i - 1) / (K - i)``, so the gradient reaching early blocks stays
a convex combination of the exits' gradients instead of their growing sum. The forward values are
unchanged; only the backward pass is rescaled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, autograd, nn

from ..runtime.state import State, map_state

if TYPE_CHECKING:
    from ..runtime.staged import StagedModel

__all__ = ["scale_grad", "forward_all_rescaled", "equilibrium_scales"]


class _ScaleGrad(autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def scale_grad(state: State, scale: float) -> State:
    """Identity in the forward pass; multiplies the gradient of every float tensor in ``state`` by ``scale``."""
    return map_state(state, lambda t: _ScaleGrad.apply(t, scale) if t.is_floating_point() and t.requires_grad else t)


def equilibrium_scales(num_exits: int) -> list[tuple[float, float]]:
    """``(head_scale, trunk_scale)`` for every exit: ``(1/(K-i), (K-i-1)/(K-i))``; the last is ``(1, 0)``."""
    return [(1.0 / (num_exits - i), (num_exits - i - 1) / (num_exits - i)) for i in range(num_exits)]


def forward_all_rescaled(model: StagedModel, x: Tensor) -> list[Tensor]:
    """``model.forward_all(x)`` with gradient-equilibrium rescaling at every exit but the last.

    One :meth:`~adaptnn.runtime.StagedModel.walk`: the ``head`` callback scales the gradient reaching the state
    through head ``k`` by ``1/(K-k)``, the ``after_exit`` callback scales the gradient through the rest of the
    trunk by ``(K-k-1)/(K-k)``.
    """
    model.check_input(x, check_finite=False)
    scales = equilibrium_scales(model.num_exits)
    last = model.num_exits - 1

    def head(k: int, module: nn.Module, state: State) -> Tensor:
        return module(state if k == last else scale_grad(state, scales[k][0]))

    def after_exit(k: int, state: State) -> State:
        return state if k == last else scale_grad(state, scales[k][1])

    return model.walk(x, head=head, after_exit=after_exit)
