"""A multi-exit ResNet-style CNN whose residual blocks are skipped per sample (LAUDNet's layer mode).

Each stage is a transition (conv-BN-ReLU, stride 2 after the first stage) then ``blocks`` ResNet basic blocks of
constant width, each wrapped in a :class:`~adaptnn.layers.skip.GatedBlock`: a pooled linear gate decides per
sample whether the block runs (the samples that run it are gathered and run densely). A pooled linear exit follows
every stage. Train with ``strategy: skip`` (Gumbel gates + a cost penalty towards a keep ``target``); raise the
gates' ``threshold`` to skip more at inference. Exit MACs (``exit_costs``) are those of every block kept (the upper
bound); the realised saving depends on the decisions (``record_gates``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import ConfigError
from ..layers.blocks import ConvBNReLU
from ..layers.heads import PoolLinearHead
from ..layers.skip import GatedBlock, ResidualBlock, gated_blocks
from ..runtime.staged import InputSpec, StagedModel
from ._registry import register_model
from .multi_exit_cnn import _init_weights  # the same initialisation as the plain CNN family

__all__ = ["skip_resnet", "skip_resnet_mnist", "skip_resnet_cifar"]


def skip_resnet(
    *,
    in_chans: int = 3,
    num_classes: int = 10,
    input_size: Sequence[int] = (32, 32),
    widths: Sequence[int] = (32, 64, 128),
    blocks: int = 2,
    tau: float = 1.0,
    threshold: float = 0.0,
    gate_bias: float = 2.0,
) -> StagedModel:
    """Build the gated multi-exit ResNet: one exit per stage of ``widths``.

    Args:
        in_chans, num_classes, input_size: input channels, classes, ``(height, width)``.
        widths: channels of each stage (the first keeps the input resolution, the others halve it).
        blocks: gated residual blocks per stage.
        tau: temperature of the gates' Gumbel-sigmoid in training.
        threshold: inference decision ``logit > threshold`` of every gate.
        gate_bias: the gates' initial logit (positive: every block starts on).
    """
    if not widths or blocks < 1 or in_chans < 1 or num_classes < 2:
        raise ConfigError(
            f"need widths, blocks >= 1, in_chans >= 1, num_classes >= 2; got {list(widths)}, {blocks}, "
            f"{in_chans}, {num_classes}"
        )
    if len(input_size) != 2:
        raise ConfigError(f"input_size is (height, width), got {list(input_size)}")
    segments, heads = [], []
    prev = in_chans
    for i, width in enumerate(widths):
        units: list[nn.Module] = [ConvBNReLU(prev, int(width), 3, stride=1 if i == 0 else 2)]
        units += [GatedBlock(ResidualBlock(int(width)), int(width), tau, threshold) for _ in range(blocks)]
        segments.append(nn.Sequential(*units))
        heads.append(PoolLinearHead(int(width), num_classes))
        prev = int(width)
    model = StagedModel(
        segments,
        heads,
        input_spec=InputSpec((in_chans, int(input_size[0]), int(input_size[1]))),
        num_classes=num_classes,
    )
    _init_weights(model)
    for block in gated_blocks(model):  # the gates start (almost) always on, as SkipGate sets them
        nn.init.zeros_(block.gate.fc.weight)
        nn.init.constant_(block.gate.fc.bias, float(gate_bias))
    return model


@register_model(args_like=skip_resnet, build_on_meta=True)
def skip_resnet_mnist(**kwargs) -> StagedModel:
    """Gated ResNet for 28x28 grayscale (Fashion-MNIST): widths 16-32-64, 2 gated blocks per stage, 3 exits."""
    args = dict(in_chans=1, num_classes=10, input_size=(28, 28), widths=(16, 32, 64))
    return skip_resnet(**dict(args, **kwargs))


@register_model(args_like=skip_resnet, build_on_meta=True)
def skip_resnet_cifar(**kwargs) -> StagedModel:
    """Gated ResNet for 32x32 RGB (CIFAR): widths 32-64-128, 2 gated blocks per stage, 3 exits."""
    args = dict(in_chans=3, num_classes=10, input_size=(32, 32), widths=(32, 64, 128))
    return skip_resnet(**dict(args, **kwargs))
