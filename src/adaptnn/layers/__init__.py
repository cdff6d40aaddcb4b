"""Building blocks shared by models and adapters: exit heads and their per-family defaults."""

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
    "FAMILY_DEFAULT_HEADS",
    "FAMILY_DEFAULT_OPTIONS",
    "HEAD_KINDS",
    "ConvPoolHead",
    "MSDNetConvHead",
    "PoolLinearHead",
    "TokenHead",
    "default_head_kind",
    "make_head",
]
