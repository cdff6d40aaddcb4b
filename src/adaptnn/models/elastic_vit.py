"""An elastic conv-stem ViT: one set of weights, a nested family of (heads + MLP width) x blocks per segment.

The ViT of :mod:`adaptnn.models.vit` made elastic by :func:`~adaptnn.layers.elastic_tokens.elasticize_vit`: a
member of width ``w`` keeps the first ``scaled(num_heads, w)`` attention heads and ``scaled(hidden, w)`` MLP units
of every block, a member of depth ``d`` the first ``d`` blocks of every segment (the blocks between two exits).
The embedding width, conv stem and exit heads are shared whole. Train the family at once with the ``sorted``
strategy; pick a member with ``model.set_variant(width=, depth=)`` and make it a plain ViT with
``model.materialise()``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ConfigError
from ..layers.elastic import ElasticStagedModel, scaled
from ..layers.elastic_tokens import elasticize_vit
from ..layers.tokens import TokenBlock
from ._registry import register_model
from .vit import vit_staged

__all__ = ["elastic_vit", "elastic_vit_tiny_conv_fmnist", "elastic_vit_tiny_conv_cifar"]


def elastic_vit(
    *,
    in_chans: int = 3,
    num_classes: int = 10,
    input_size: Sequence[int] = (32, 32),
    embed_dim: int = 192,
    depth: int = 12,
    num_heads: int = 4,
    mlp_ratio: float = 4.0,
    qk_norm: bool = False,
    init_values: float | None = None,
    drop_path_rate: float = 0.0,
    exits: Sequence[int] | None = None,
    width_mults: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    depths: Sequence[int] | None = None,
    verify: bool = True,
) -> ElasticStagedModel:
    """Build the elastic conv-stem ViT; its valid members are ``width_mults x depths``.

    Args:
        in_chans, num_classes, input_size, embed_dim, depth, num_heads, mlp_ratio, qk_norm, init_values,
            drop_path_rate, exits: as :func:`~adaptnn.models.vit.vit_staged` (the full member's transformer).
        width_mults: fractions of heads and MLP units the members keep, each in (0, 1]; must include 1.0. Widths
            that keep the same number of heads and MLP units as another are refused (they would be one member).
        depths: blocks per segment of the members, each in [1, the fewest blocks between two exits]; default: all.
        verify: check that the full member computes what the plain ViT with the same weights computes.
    """
    mults = [float(w) for w in width_mults]
    if not mults or any(not 0.0 < w <= 1.0 for w in mults) or 1.0 not in mults:
        raise ConfigError(f"width_mults must lie in (0, 1] and include 1.0 (the full member), got {mults}")
    hidden = int(embed_dim * mlp_ratio)
    shapes = {w: (scaled(num_heads, w), scaled(hidden, w)) for w in mults}
    if len(set(shapes.values())) != len(shapes):
        raise ConfigError(
            f"width_mults {sorted(mults)} give repeated (heads, MLP units) {sorted(shapes.values())} with "
            f"{num_heads} heads: use fewer widths or more heads"
        )
    plain = vit_staged(
        in_chans=in_chans,
        num_classes=num_classes,
        input_size=input_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        qk_norm=qk_norm,
        init_values=init_values,
        drop_path_rate=drop_path_rate,
        exits=exits,
    )
    per_segment = [sum(isinstance(m, TokenBlock) for m in seg.modules()) for seg in plain.segments]
    depth_list: list[int | None] = [None] if depths is None else [int(d) for d in depths]
    finite = [d for d in depth_list if d is not None]
    if finite and (min(finite) < 1 or max(finite) > min(per_segment)):
        raise ConfigError(
            f"depths must lie in [1, {min(per_segment)}] (blocks per segment {per_segment}), got {finite}"
        )
    if finite and max(finite) < min(per_segment) and None not in depth_list:
        depth_list.append(None)  # the full member is always listed
    return elasticize_vit(plain, width_mults=mults, depths=depth_list, verify=verify)


_FMNIST = dict(in_chans=1, num_classes=10, input_size=(28, 28), embed_dim=64, depth=6, num_heads=4, exits=(1, 3))


@register_model(args_like=elastic_vit, build_on_meta=True)
def elastic_vit_tiny_conv_fmnist(**kwargs) -> ElasticStagedModel:
    """Elastic conv-stem ViT for 28x28 grayscale (Fashion-MNIST): dim 64, 6 blocks, 4 heads, 3 exits.

    Members: 1-4 heads (MLP 64-256 units) x 1-2 blocks per segment; the full member is ``vit_tiny_conv_fmnist``'s
    shape with 4 heads of 16 dims instead of 2 of 32.
    """
    return elastic_vit(**dict(dict(_FMNIST, depths=(1, 2)), **kwargs))


@register_model(args_like=elastic_vit, build_on_meta=True)
def elastic_vit_tiny_conv_cifar(**kwargs) -> ElasticStagedModel:
    """Elastic DeiT-Tiny-shaped ViT (dim 192, 12 blocks, 4 heads of 48) for 32x32 RGB: 4 exits, 1-3 blocks each."""
    args = dict(in_chans=3, num_classes=10, input_size=(32, 32), embed_dim=192, depth=12, num_heads=4)
    return elastic_vit(**dict(dict(args, depths=(1, 2, 3)), **kwargs))
