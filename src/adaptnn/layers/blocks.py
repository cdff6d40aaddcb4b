"""Small blocks shared by exit heads and model families."""

from __future__ import annotations

from torch import nn

__all__ = ["ConvBNReLU"]


class ConvBNReLU(nn.Sequential):
    """Conv (no bias by default), batch norm, ReLU; ``padding = kernel // 2`` keeps the size at stride 1.

    Submodules are ``0`` (conv), ``1`` (norm), ``2`` (activation), so state-dict keys read ``<name>.0.weight``.
    """

    def __init__(self, in_chans: int, out_chans: int, kernel: int = 3, stride: int = 1, bias: bool = False) -> None:
        super().__init__(
            nn.Conv2d(in_chans, out_chans, kernel, stride=stride, padding=kernel // 2, bias=bias),
            nn.BatchNorm2d(out_chans),
            nn.ReLU(inplace=True),
        )
