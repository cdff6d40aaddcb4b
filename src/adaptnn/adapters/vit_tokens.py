"""Token reduction (ToMe, EViT) on timm ``VisionTransformer``-family models and ``from_timm`` staged ViTs.

:func:`tokenize_staged` turns a staged ViT from :func:`adaptnn.from_timm` into one whose state between segments
is a :class:`~adaptnn.layers.tokens.TokenState`: the embedding starts it, every timm block runs as a
:class:`~adaptnn.layers.tokens.TokenBlock` (the block's own modules, the reduction between attention and MLP), the
final norm maps the tokens, and the heads read the class token or, for pooling heads (``global_pool="avg"``), the
un-merged tokens. :func:`token_vit` does the same for a timm model given by name or instance. The modules are
shared with the original model, nothing is copied; with the knob off the logits equal the original model's.

    staged = token_vit("deit_small_patch16_224", exits=[3, 7])
    set_token_knob(staged, TokenKnob("tome", 13))
    staged.run_dynamic(x, policy)          # exits after reduced segments
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..layers.heads import TokenHead
from ..layers.tokens import TokenBlock, TokenEmbed, TokenKnob, TokenMap, TokenStateHead, set_token_knob
from ..runtime.staged import StagedModel
from .timm import _ViTEmbed, from_timm

__all__ = ["tokenize_staged", "token_vit"]


def _embed_of(staged: StagedModel) -> _ViTEmbed:
    first = staged.segments[0]
    unit = first[0] if isinstance(first, nn.Sequential) and len(first) else first
    if not isinstance(unit, _ViTEmbed):
        raise UnsupportedModelError(
            f"the first unit of this staged model is {type(unit).__name__}, not a timm ViT embedding: "
            "token reduction applies to staged ViTs built by adaptnn.from_timm"
        )
    return unit


def tokenize_staged(
    staged: StagedModel, *, proportional: bool = True, track_source: bool | None = None, knob: TokenKnob | None = None
) -> StagedModel:
    """A staged timm ViT (from :func:`adaptnn.from_timm`) whose segments carry a token state; shares every module.

    Args:
        staged: a staged ViT built by the timm adapter.
        proportional: proportional attention (``log(size)`` added to the attention logits) once tokens are merged.
        track_source: keep source indices (to un-merge dense or per-patch outputs); ``None`` (default): only where a
            head un-merges (mean pooling): a class-token model skips the dozen small index ops per merge, which
            matter where each op costs its launch (batch 1, a GPU).
        knob: the initial token reduction (default: none; change it with :func:`set_token_knob`).
    """
    vit = _embed_of(staged).vit
    prefix = int(getattr(vit, "num_prefix_tokens", 1))
    block_ids = {id(b) for b in getattr(vit, "blocks", [])}
    if not block_ids:  # the embedding's shell keeps only the embedding modules: find blocks by layout instead
        block_ids = {id(m) for seg in staged.segments for m in seg if hasattr(m, "attn") and hasattr(m, "mlp")}
    pool_head = getattr(vit, "global_pool", "token") not in ("token", "") or getattr(vit, "attn_pool", None) is not None
    heads = []
    last = staged.num_exits - 1
    for k, head in enumerate(staged.heads):
        unmerge_first = pool_head if k == last else isinstance(head, TokenHead) and head.pool == "mean"
        heads.append(TokenStateHead(head, unmerge_first))
    if track_source is None:
        track_source = any(h.unmerge_first for h in heads)
    if not track_source and any(h.unmerge_first for h in heads):
        raise ConfigError("track_source=False: a pooling head of this model un-merges the tokens and needs sources")
    segments = []
    for seg in staged.segments:
        units = []
        for unit in seg if isinstance(seg, nn.Sequential) else [seg]:
            if isinstance(unit, _ViTEmbed):
                units.append(TokenEmbed(unit, prefix))
            elif id(unit) in block_ids:
                units.append(TokenBlock(unit, proportional=proportional, track_source=track_source))
            else:
                units.append(TokenMap(unit))
        segments.append(nn.Sequential(*units))
    out = StagedModel(
        segments, heads, staged.exit_after, input_spec=staged.input_spec, num_classes=staged.num_classes
    ).train(staged.training)
    return set_token_knob(out, knob)


def token_vit(
    model: str | nn.Module,
    exits: str | int | Sequence[int] = (),
    *,
    knob: TokenKnob | None = None,
    proportional: bool = True,
    track_source: bool | None = None,
    **kwargs: object,
) -> StagedModel:
    """A timm ViT (name or instance) as a token-reducible staged model; ``exits=()`` gives only the classifier.

    Further ``kwargs`` go to :func:`adaptnn.from_timm` (``num_classes``, ``pretrained``, ``timm_kwargs`` ...), so
    online users load timm's pretrained weights the usual way.
    """
    exits = list(exits) if not isinstance(exits, (str, int)) else exits
    staged = from_timm(model, exits=exits, **kwargs)
    return tokenize_staged(staged, proportional=proportional, track_source=track_source, knob=knob)
