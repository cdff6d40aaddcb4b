"""A small multi-exit CNN that trains in seconds on a CPU (the quickstart model).

Four stages of ``depth`` conv-BN-ReLU layers with widening channels; the first conv of a stage may
stride 2. One pooled linear head after every stage. Costs grow quickly from exit to exit (the first
exit costs a few percent of the last), which is what makes early exit pay off.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import ConfigError
from ..layers.heads import PoolLinearHead
from ..runtime.staged import InputSpec, StagedModel
from ._registry import register_model

__all__ = ["multi_exit_cnn", "mecnn_digits", "mecnn_mnist", "mecnn_cifar"]


class ConvBNAct(nn.Sequential):
    """3x3 convolution, batch norm, ReLU."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_chans),
            nn.ReLU(inplace=True),
        )


def _stage(in_chans: int, out_chans: int, stride: int, depth: int) -> nn.Sequential:
    layers = [ConvBNAct(in_chans, out_chans, stride)]
    layers += [ConvBNAct(out_chans, out_chans) for _ in range(depth - 1)]
    return nn.Sequential(*layers)


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)


def multi_exit_cnn(
    *,
    in_chans: int = 3,
    num_classes: int = 10,
    input_size: Sequence[int] = (32, 32),
    widths: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (1, 2, 2, 2),
    depth: int = 2,
    head_dropout: float = 0.0,
) -> StagedModel:
    """Build the multi-exit CNN: one stage per width, one exit after each stage.

    Args:
        in_chans: input channels.
        num_classes: classes predicted by every exit.
        input_size: ``(height, width)`` of the inputs (checked at run time; used for cost counting).
        widths: output channels of each stage (one exit per stage).
        strides: stride of the first conv of each stage.
        depth: conv layers per stage.
        head_dropout: dropout before each exit's linear layer.
    """
    if len(widths) != len(strides) or not widths:
        raise ConfigError(f"widths {list(widths)} and strides {list(strides)} must be non-empty and of equal length")
    if depth < 1 or in_chans < 1 or num_classes < 2:
        raise ConfigError(f"need depth >= 1, in_chans >= 1, num_classes >= 2; got {depth}, {in_chans}, {num_classes}")
    if len(input_size) != 2:
        raise ConfigError(f"input_size is (height, width), got {list(input_size)}")
    segments, heads = [], []
    prev = in_chans
    for width, stride in zip(widths, strides, strict=True):
        segments.append(_stage(prev, width, stride, depth))
        heads.append(PoolLinearHead(width, num_classes, dropout=head_dropout))
        prev = width
    model = StagedModel(
        segments,
        heads,
        input_spec=InputSpec((in_chans, int(input_size[0]), int(input_size[1]))),
        num_classes=num_classes,
    )
    _init_weights(model)
    return model


@register_model
def mecnn_digits(**kwargs) -> StagedModel:
    """4-exit CNN for 8x8 grayscale digits (scikit-learn); no downsampling before the third stage."""
    args = dict(in_chans=1, num_classes=10, input_size=(8, 8), widths=(16, 32, 64, 128), strides=(1, 1, 2, 2))
    return multi_exit_cnn(**dict(args, **kwargs))


@register_model
def mecnn_mnist(**kwargs) -> StagedModel:
    """4-exit CNN for 28x28 grayscale images (Fashion-MNIST)."""
    args = dict(in_chans=1, num_classes=10, input_size=(28, 28), widths=(16, 32, 64, 128), strides=(1, 2, 2, 2))
    return multi_exit_cnn(**dict(args, **kwargs))


@register_model
def mecnn_cifar(**kwargs) -> StagedModel:
    """4-exit CNN for 32x32 RGB images (CIFAR-10/100)."""
    args = dict(in_chans=3, num_classes=10, input_size=(32, 32), widths=(32, 64, 128, 256), strides=(1, 2, 2, 2))
    return multi_exit_cnn(**dict(args, **kwargs))
