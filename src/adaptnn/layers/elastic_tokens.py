"""Elastic vision transformers: members keep a prefix of the attention heads and MLP width and skip trailing blocks.

:func:`elasticize_vit` turns a staged ViT whose blocks run as :class:`~adaptnn.layers.tokens.TokenBlock` s (the
native ``vit_*`` family, or a timm ViT through :func:`adaptnn.adapters.vit_tokens.token_vit`) into an
:class:`~adaptnn.layers.elastic.ElasticStagedModel`, with the same layers as :mod:`adaptnn.layers.elastic`:

* width ``w``: every block keeps its first ``scaled(num_heads, w)`` heads (:class:`~adaptnn.layers.elastic.ElasticQKV`
  for the fused projection, the output projection reading the kept heads' features) and the first
  ``scaled(hidden, w)`` units of its MLP (a prefix of ``fc1``'s outputs and ``fc2``'s inputs; a hidden LayerNorm
  becomes an :class:`~adaptnn.layers.elastic.ElasticLayerNorm`). The embedding width stays whole, so the residual
  stream, the norms around it, the embedding and the exit heads are shared as they are by every member;
* depth ``d``: each run of token blocks inside a segment becomes an
  :class:`~adaptnn.layers.elastic.ElasticSequential` that runs its first ``d`` blocks (the trailing ones skipped).

Members materialise (:func:`~adaptnn.layers.elastic.materialise`) into plain ViTs: the attention modules keep
``num_heads`` = the member's heads and plain ``nn.Linear`` projections holding the kept rows and columns.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import Tensor, nn

from ..errors import ConfigError, UnsupportedModelError
from ..runtime.staged import StagedModel
from .elastic import (
    ElasticLayerNorm,
    ElasticLinear,
    ElasticQKV,
    ElasticSequential,
    ElasticStagedModel,
    Variant,
    _check_variants,
    _copy_params,
    verify_full_member,
)
from .tokens import TokenBlock

__all__ = ["elasticize_vit", "elastic_attention", "elastic_mlp"]


def _linear(module: nn.Linear, *, fixed_out: bool) -> ElasticLinear:
    out = ElasticLinear(
        module.in_features,
        module.out_features,
        bias=module.bias is not None,
        fixed_out=fixed_out,
        device=module.weight.device,
        dtype=module.weight.dtype,
    )
    _copy_params(out, module.weight, module.bias)
    return out


def _layer_norm(module: nn.LayerNorm) -> ElasticLayerNorm:
    weight = module.weight
    ln = ElasticLayerNorm(
        module.normalized_shape[0],
        eps=module.eps,
        elementwise_affine=weight is not None,
        bias=module.bias is not None,
        device=None if weight is None else weight.device,
        dtype=None if weight is None else weight.dtype,
    )
    _copy_params(ln, weight, module.bias)
    return ln


def elastic_attention(attn: nn.Module) -> nn.Module:
    """Make ``attn`` (timm's attribute names: ``num_heads, head_dim, qkv, proj``) keep a prefix of its heads, in place.

    ``qkv`` becomes an :class:`ElasticQKV`, ``proj`` an :class:`ElasticLinear` with every output kept, and a
    LayerNorm ``norm`` over the heads' outputs (timm's ``scale_norm``) an :class:`ElasticLayerNorm`.

    Raises:
        UnsupportedModelError: another layout (separate q/k/v projections or biases, gated outputs, ...).
    """
    name = type(attn).__name__
    heads, head_dim = getattr(attn, "num_heads", None), getattr(attn, "head_dim", None)
    qkv, proj = getattr(attn, "qkv", None), getattr(attn, "proj", None)
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        raise UnsupportedModelError(f"{name} has no integer num_heads / head_dim: cannot slice its heads")
    if type(qkv) is not nn.Linear or qkv.out_features != 3 * heads * head_dim:
        raise UnsupportedModelError(f"{name}.qkv is not one nn.Linear with 3 x {heads} x {head_dim} outputs")
    if type(proj) is not nn.Linear or proj.in_features != heads * head_dim:
        raise UnsupportedModelError(f"{name}.proj is not an nn.Linear reading {heads} x {head_dim} features")
    for extra in ("gate", "q_bias", "v_bias", "rope", "q_proj"):
        if getattr(attn, extra, None) is not None:
            raise UnsupportedModelError(f"{name} has {extra!r}: elastic heads support fused qkv attention only")
    elastic_qkv = ElasticQKV(
        qkv.in_features, heads, head_dim, bias=qkv.bias is not None, device=qkv.weight.device, dtype=qkv.weight.dtype
    )
    _copy_params(elastic_qkv, qkv.weight, qkv.bias)
    attn.qkv = elastic_qkv
    attn.proj = _linear(proj, fixed_out=True)
    norm = getattr(attn, "norm", None)
    if isinstance(norm, nn.LayerNorm):
        if type(norm) is not nn.LayerNorm:
            raise UnsupportedModelError(f"{name}.norm is a {type(norm).__name__}: only a plain LayerNorm is sliced")
        attn.norm = _layer_norm(norm)
    elif norm is not None and not isinstance(norm, nn.Identity):
        raise UnsupportedModelError(f"{name}.norm is a {type(norm).__name__}: only a LayerNorm or Identity is sliced")
    return attn


def elastic_mlp(mlp: nn.Module) -> nn.Module:
    """Make a two-layer MLP (``nn.Sequential`` or timm's ``Mlp``) keep a prefix of its hidden units, in place.

    The first linear layer keeps ``scaled(hidden, width)`` outputs, the last reads them (and keeps every output);
    a LayerNorm between them is sliced, activations and dropouts are shared as they are.

    Raises:
        UnsupportedModelError: another layout (gated MLPs such as SwiGLU, convolutional MLPs, three linears, ...).
    """
    name = type(mlp).__name__
    if type(mlp) is not nn.Sequential and name != "Mlp":
        raise UnsupportedModelError(f"the block's MLP is a {name}: elastic width supports nn.Sequential or timm's Mlp")
    children = list(mlp.named_children())
    linears = [n for n, m in children if isinstance(m, nn.Linear)]
    if len(linears) != 2 or any(type(getattr(mlp, n)) is not nn.Linear for n in linears):
        raise UnsupportedModelError(f"the block's {name} has {len(linears)} linear layers, elastic width needs two")
    first, last = (getattr(mlp, n) for n in linears)
    if first.out_features != last.in_features:
        raise UnsupportedModelError(f"the block's {name} maps {first.out_features} hidden units to {last.in_features}")
    setattr(mlp, linears[0], _linear(first, fixed_out=False))
    setattr(mlp, linears[1], _linear(last, fixed_out=True))
    for n, m in children:
        if isinstance(m, nn.LayerNorm):
            if type(m) is not nn.LayerNorm:
                raise UnsupportedModelError(f"the block's {name}.{n} is a {type(m).__name__}: only LayerNorm slices")
            setattr(mlp, n, _layer_norm(m))
        elif n not in linears and any(True for _ in m.parameters()):
            raise UnsupportedModelError(
                f"the block's {name}.{n} ({type(m).__name__}) has weights elastic width ignores"
            )
    return mlp


def _group_blocks(segment: nn.Module) -> list[int]:
    """Replace each run of TokenBlocks in an ``nn.Sequential`` segment by an ElasticSequential; their lengths."""
    if type(segment) is not nn.Sequential:
        return []
    units: list[nn.Module] = []
    runs: list[int] = []
    run: list[nn.Module] = []
    for unit in list(segment):
        if isinstance(unit, TokenBlock):
            run.append(unit)
            continue
        if run:
            units.append(ElasticSequential(*run))
            runs.append(len(run))
            run = []
        units.append(unit)
    if run:
        units.append(ElasticSequential(*run))
        runs.append(len(run))
    for name in list(segment._modules):
        del segment._modules[name]
    for i, unit in enumerate(units):
        segment.add_module(str(i), unit)
    return runs


def elasticize_vit(
    model: StagedModel,
    *,
    width_mults: Sequence[float],
    depths: Sequence[int | None] = (None,),
    verify: bool = True,
    example: Tensor | None = None,
    copy_model: bool = True,
) -> ElasticStagedModel:
    """An elastic family (heads and MLP width x blocks per segment) made from a staged token ViT.

    Args:
        model: a staged ViT whose blocks are :class:`~adaptnn.layers.tokens.TokenBlock` s (timm's block layout).
        width_mults: the members' width multipliers in (0, 1]: fraction of heads and of MLP hidden units kept.
        depths: the members' blocks per segment (``None``: all; each at most the longest run of blocks).
        verify: check on ``example`` (default: a zero sample) that the full member's exits equal the model's (only
            with ``copy_model``: an in-place conversion leaves no original to compare with).
        example: input for that check.
        copy_model: convert a deep copy (default) or ``model`` itself (a builder's fresh model: saves a copy).

    Raises:
        UnsupportedModelError: no token blocks, a block layout the slicing does not cover, or a failed check.
        ConfigError: invalid variants.
    """
    variants: tuple[Variant, ...] = _check_variants(
        Variant(float(w), None if d is None else int(d)) for w in width_mults for d in depths
    )
    source = copy.deepcopy(model) if copy_model else model
    blocks = [m for m in source.modules() if isinstance(m, TokenBlock)]
    if not blocks:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no token blocks: elasticize_vit takes a native vit_* model or a token_vit"
        )
    for blk in blocks:
        if blk.predictor is not None:
            raise UnsupportedModelError("a token block has a DynamicViT keep predictor: make the ViT elastic first")
        elastic_attention(blk.block.attn)
        elastic_mlp(blk.block.mlp)
    runs = [n for seg in source.segments for n in _group_blocks(seg)]
    finite = [v.depth for v in variants if v.depth is not None]
    if finite and (not runs or max(finite) > max(runs)):
        raise ConfigError(
            f"depths {sorted(set(finite))} exceed the blocks per segment of this ViT ({runs or 'no nn.Sequential run'})"
        )
    elastic = ElasticStagedModel(
        list(source.segments),
        list(source.heads),
        source.exit_after,
        variants=variants,
        input_spec=source.input_spec,
        num_classes=source.num_classes,
    )
    if verify and copy_model:
        verify_full_member(model, elastic, example)
    return elastic
