"""Building blocks shared by models and adapters: exit heads, their per-family defaults, small blocks, and the
inline-collaboration transform of a trained model's exits (IMTA stage two)."""

from .blocks import ConvBNReLU
from .collaboration import inline_collaboration
from .heads import (
    FAMILY_DEFAULT_HEADS,
    FAMILY_DEFAULT_OPTIONS,
    HEAD_KINDS,
    ConvPoolHead,
    MSDNetConvHead,
    PoolLinearHead,
    TokenHead,
    default_head_kind,
    make_head,
)

__all__ = [
    "ConvBNReLU",
    "FAMILY_DEFAULT_HEADS",
    "FAMILY_DEFAULT_OPTIONS",
    "HEAD_KINDS",
    "ConvPoolHead",
    "MSDNetConvHead",
    "PoolLinearHead",
    "TokenHead",
    "default_head_kind",
    "inline_collaboration",
    "make_head",
]
