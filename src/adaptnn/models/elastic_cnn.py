"""An elastic multi-exit CNN: one set of weights, a nested family of widths x depths, an exit after every stage.

The layout of :mod:`adaptnn.models.multi_exit_cnn` (stages of conv-BN-ReLU, a pooled linear head per stage) built
from the elastic layers of :mod:`adaptnn.layers.elastic`: every member of ``width_mults x depths`` runs a prefix of
each layer's channels and the leading ``depth`` blocks of each stage (SortedNet / slimmable networks). Train the
family at once with the ``sorted`` strategy; pick a member with ``model.set_variant(width=, depth=)`` or the
``adaptnn menu`` command, and make it a plain smaller model with ``model.materialise()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product

from torch import nn

from ..errors import ConfigError
from ..layers.elastic import (
    ElasticBatchNorm2d,
    ElasticConv2d,
    ElasticLinear,
    ElasticSequential,
    ElasticStagedModel,
    MatryoshkaHead,
    Variant,
)
from ..layers.heads import PoolLinearHead
from ..runtime.staged import InputSpec
from ._registry import register_model
from .multi_exit_cnn import _init_weights  # the same initialisation as the plain CNN family

__all__ = ["elastic_cnn", "elastic_cnn_digits", "elastic_cnn_mnist", "elastic_cnn_cifar"]


def _block(in_chans: int, out_chans: int, stride: int, num_variants: int) -> nn.Sequential:
    return nn.Sequential(
        ElasticConv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False),
        ElasticBatchNorm2d(out_chans, num_variants),
        nn.ReLU(inplace=True),
    )


def _head(in_features: int, num_classes: int, dropout: float, nested: Sequence[int] | None) -> nn.Module:
    if nested:  # a Matryoshka head: pooled features -> an embedding whose listed prefixes all classify
        matryoshka = MatryoshkaHead(in_features, num_classes, embed_dim=max(nested), dims=nested)
        matryoshka.proj = ElasticLinear(in_features, max(nested), fixed_out=True)  # reads the member's features
        return matryoshka
    head = PoolLinearHead(in_features, num_classes, dropout=dropout)
    head.fc = ElasticLinear(in_features, num_classes, fixed_out=True)  # reads the member's pooled features
    return head


def elastic_cnn(
    *,
    in_chans: int = 3,
    num_classes: int = 10,
    input_size: Sequence[int] = (32, 32),
    widths: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (1, 2, 2, 2),
    depth: int = 2,
    width_mults: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    depths: Sequence[int] | None = None,
    head_dropout: float = 0.0,
    matryoshka_dims: Sequence[int] | None = None,
) -> ElasticStagedModel:
    """Build the elastic multi-exit CNN; its valid members are ``width_mults x depths``.

    Args:
        in_chans, num_classes, input_size, widths, strides, head_dropout: as
            :func:`~adaptnn.models.multi_exit_cnn.multi_exit_cnn` (``widths`` are the full member's channels).
        depth: conv layers per stage in the full member.
        width_mults: width multipliers of the members, each in (0, 1]; must include 1.0 (the full member).
        depths: blocks per stage of the members, each in [1, depth] (default ``[depth]``: width-only family).
        matryoshka_dims: nested embedding sizes of Matryoshka exit heads (``None``: plain linear heads): each
            exit maps its pooled features to a ``max(matryoshka_dims)`` embedding whose listed prefixes classify
            (train with ``strategy: matryoshka``, or ``sorted`` with ``exit_loss: matryoshka``).
    """
    if len(widths) != len(strides) or not widths:
        raise ConfigError(f"widths {list(widths)} and strides {list(strides)} must be non-empty and of equal length")
    if depth < 1 or in_chans < 1 or num_classes < 2:
        raise ConfigError(f"need depth >= 1, in_chans >= 1, num_classes >= 2; got {depth}, {in_chans}, {num_classes}")
    if len(input_size) != 2:
        raise ConfigError(f"input_size is (height, width), got {list(input_size)}")
    depths = [depth] if depths is None else [int(d) for d in depths]
    if not depths or any(not 1 <= d <= depth for d in depths) or depth not in depths:
        raise ConfigError(f"depths must lie in [1, {depth}] and include {depth} (the full member), got {depths}")
    mults = [float(w) for w in width_mults]
    if not mults or any(not 0.0 < w <= 1.0 for w in mults) or 1.0 not in mults:
        raise ConfigError(f"width_mults must lie in (0, 1] and include 1.0 (the full member), got {mults}")
    nested = None if matryoshka_dims is None else [int(m) for m in matryoshka_dims]
    if nested is not None and (not nested or min(nested) < 1):
        raise ConfigError(f"matryoshka_dims must be positive embedding sizes, got {nested}")
    variants = sorted({Variant(w, d) for w, d in product(mults, depths)}, key=Variant.key)
    n = len(variants)
    segments, heads = [], []
    prev = in_chans
    for width, stride in zip(widths, strides, strict=True):
        blocks = [_block(prev, width, stride, n)] + [_block(width, width, 1, n) for _ in range(depth - 1)]
        segments.append(ElasticSequential(*blocks))
        heads.append(_head(width, num_classes, head_dropout, nested))
        prev = width
    model = ElasticStagedModel(
        segments,
        heads,
        variants=variants,
        input_spec=InputSpec((in_chans, int(input_size[0]), int(input_size[1]))),
        num_classes=num_classes,
    )
    _init_weights(model)
    return model


@register_model(args_like=elastic_cnn, build_on_meta=True)
def elastic_cnn_digits(**kwargs) -> ElasticStagedModel:
    """Elastic 4-exit CNN for 8x8 digits: widths x0.25..x1, depths 1-2."""
    args = dict(in_chans=1, num_classes=10, input_size=(8, 8), widths=(16, 32, 64, 128), strides=(1, 1, 2, 2))
    return elastic_cnn(**dict(dict(args, depths=(1, 2)), **kwargs))


@register_model(args_like=elastic_cnn, build_on_meta=True)
def elastic_cnn_mnist(**kwargs) -> ElasticStagedModel:
    """Elastic 4-exit CNN for 28x28 grayscale images (Fashion-MNIST): widths x0.25..x1, depths 1-2."""
    args = dict(in_chans=1, num_classes=10, input_size=(28, 28), widths=(16, 32, 64, 128), strides=(1, 2, 2, 2))
    return elastic_cnn(**dict(dict(args, depths=(1, 2)), **kwargs))


@register_model(args_like=elastic_cnn, build_on_meta=True)
def elastic_cnn_cifar(**kwargs) -> ElasticStagedModel:
    """Elastic 4-exit CNN for 32x32 RGB images (CIFAR): widths x0.25..x1, depths 1-2."""
    args = dict(in_chans=3, num_classes=10, input_size=(32, 32), widths=(32, 64, 128, 256), strides=(1, 2, 2, 2))
    return elastic_cnn(**dict(dict(args, depths=(1, 2)), **kwargs))
