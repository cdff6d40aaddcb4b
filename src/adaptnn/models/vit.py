"""Small vision transformers with exits and token-reduction decision points (a DeiT-Tiny shape with a conv stem).

No ViT checkpoint installs offline, so this family gives adaptnn a ViT to train and measure on: a conv stem (two
3x3 stride-2 conv-BN-GELU, as in "Early Convolutions Help Transformers See Better", Xiao et al. 2021) turns a
28x28 or 32x32 image into a 7x7 or 8x8 grid of tokens, a class token and learned positions are added, then
pre-norm transformer blocks (timm's ``Block`` layout: ``norm1, attn.qkv, attn.q_norm/k_norm, attn.proj, ls1,
drop_path1, norm2, mlp, ls2, drop_path2``). Every block runs as a :class:`~adaptnn.layers.tokens.TokenBlock`, so
:func:`~adaptnn.layers.tokens.set_token_knob` turns ToMe or EViT on for the whole model; the state between
segments is a :class:`~adaptnn.layers.tokens.TokenState`. Exit heads (LayerNorm + linear on the class token) sit
after chosen blocks; the last one follows the final LayerNorm.

Inputs of other sizes (an EfficientTrain curriculum's small stages) get their patch positions resized bicubically
(:func:`resize_pos_embed`; the class token's untouched, the native size exact). :func:`dvt_staged` is the DVT
cascade: a coarse-grid ViT as exit 0, then a full-grid ViT reusing its features and (optionally) its attention
logits.

For real pretrained ViTs (online), use :func:`adaptnn.adapters.vit_tokens.token_vit` on a timm name instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers.heads import TokenHead
from ..layers.tokens import TokenBlock, TokenMap, TokenState, TokenStateHead, attach_keep_predictors, unmerge
from ..runtime.staged import InputSpec, StagedModel
from ..runtime.state_types import register_state_type
from ._registry import register_model

__all__ = [
    "CascadeState",
    "dvt_staged",
    "dvt_vit_tiny_conv_fmnist",
    "resize_pos_embed",
    "vit_staged",
    "vit_tiny_conv_fmnist",
    "vit_tiny_conv_cifar",
]


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample during training (rescaled by ``1 / keep``)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention with timm's attribute names (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Identity()


class Block(nn.Module):
    """Pre-norm transformer block (attention, MLP, optional LayerScale, stochastic depth); run by a TokenBlock."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        init_values: float | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.ls1 = _LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.ls2 = _LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()


class _LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class ConvStemEmbed(nn.Module):
    """Conv stem (two 3x3 stride-2 conv-BN-GELU) to a token grid, class token, learned positions -> TokenState."""

    def __init__(self, in_chans: int, dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        mid = max(dim // 2, 16)
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, mid, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.GELU(),
            nn.Conv2d(mid, dim, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.Conv2d(dim, dim, 1),
        )
        self.grid = (int(grid[0]), int(grid[1]))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> TokenState:
        feat = self.stem(x)  # [b, d, h, w]
        pos = self.pos_embed_for((int(feat.shape[-2]), int(feat.shape[-1])))
        tokens = feat.flatten(2).transpose(1, 2)  # [b, n, d]
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + pos
        return TokenState(tokens, None, None, 1)

    def pos_embed_for(self, grid: tuple[int, int]) -> Tensor:
        """Position embeddings ``[1, 1 + h * w, d]`` for a ``grid`` of patch tokens.

        The learned ones at the native grid, else their patch-grid part resized bicubically (the class token's
        embedding untouched).

        Lets the model take smaller or larger inputs than it was built for (e.g. an EfficientTrain curriculum's
        low-resolution stages) while computing exactly the same at the native size.
        """
        if tuple(grid) == self.grid:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, self.grid, grid, prefix=1)


def resize_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], prefix: int) -> Tensor:
    """``pos_embed [1, prefix + h*w, d]`` on a ``new_grid``: the patch part resized bicubically, special tokens kept."""
    special, patches = pos_embed[:, :prefix], pos_embed[:, prefix:]
    dim = patches.shape[-1]
    if patches.shape[1] != old_grid[0] * old_grid[1]:
        raise ConfigError(f"pos_embed holds {patches.shape[1]} patch positions, not a {old_grid[0]}x{old_grid[1]} grid")
    grid = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False).to(pos_embed.dtype)
    return torch.cat([special, grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def vit_staged(
    *,
    in_chans: int = 3,
    num_classes: int = 10,
    input_size: Sequence[int] = (32, 32),
    embed_dim: int = 192,
    depth: int = 12,
    num_heads: int = 3,
    mlp_ratio: float = 4.0,
    qk_norm: bool = False,
    init_values: float | None = None,
    drop_path_rate: float = 0.0,
    exits: Sequence[int] | None = None,
    keep_rate: float | None = None,
    keep_locations: Sequence[int] | None = None,
) -> StagedModel:
    """A conv-stem ViT with class-token exits after the blocks ``exits`` (0-based; the last block always has one).

    Args:
        in_chans, num_classes, input_size: input channels, classes, ``(height, width)`` (multiples of 4).
        embed_dim, depth, num_heads, mlp_ratio, qk_norm, init_values: the transformer (DeiT-Tiny: 192, 12, 3).
        drop_path_rate: stochastic depth, increasing linearly to this rate at the last block.
        exits: blocks followed by an exit (default: after each quarter of the depth).
        keep_rate, keep_locations: DynamicViT keep-score predictors (``None``: none) keeping ``keep_rate`` of the
            patch tokens entering the blocks ``keep_locations`` (see the ``dynamicvit`` strategy, which records
            them in the model spec so a trained model's checkpoint rebuilds with its predictors).
    """
    if len(input_size) != 2 or input_size[0] % 4 or input_size[1] % 4:
        raise ConfigError(f"input_size is (height, width), multiples of 4 (stride-4 stem); got {list(input_size)}")
    if depth < 1 or num_classes < 2:
        raise ConfigError(f"need depth >= 1 and num_classes >= 2; got {depth}, {num_classes}")
    if exits is None:
        exits = sorted({max(0, round(depth * q / 4) - 1) for q in (1, 2, 3)})
    exits = sorted({int(e) for e in exits} | {depth - 1})
    if exits[0] < 0 or exits[-1] >= depth:
        raise ConfigError(f"exits are block indices in 0..{depth - 1}, got {list(exits)}")
    grid = (int(input_size[0]) // 4, int(input_size[1]) // 4)
    embed = ConvStemEmbed(in_chans, embed_dim, grid)
    rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
    # the heads read the class token, so nothing un-merges: skip source tracking (a few small kernels per reducing
    # block); set ``track_source = True`` on the blocks to un-merge per-patch outputs of a reduced model
    blocks = [
        TokenBlock(Block(embed_dim, num_heads, mlp_ratio, qk_norm, init_values, rates[i]), track_source=False)
        for i in range(depth)
    ]
    segments, heads, start = [], [], 0
    for e in exits:
        units: list[nn.Module] = [embed] if start == 0 else []
        units += blocks[start : e + 1]
        if e == depth - 1:
            units.append(TokenMap(nn.LayerNorm(embed_dim)))
            heads.append(TokenStateHead(TokenHead(embed_dim, num_classes, pool="cls", norm=False), False))
        else:
            heads.append(TokenStateHead(TokenHead(embed_dim, num_classes, pool="cls", norm=True), False))
        segments.append(nn.Sequential(*units))
        start = e + 1
    model = StagedModel(
        segments, heads, input_spec=InputSpec((in_chans, *map(int, input_size))), num_classes=num_classes
    )
    _init_weights(model)
    if keep_rate is not None:
        attach_keep_predictors(model, keep_rate, keep_locations)
    return model


@register_model
def vit_tiny_conv_fmnist(**kwargs) -> StagedModel:
    """Conv-stem ViT for 28x28 grayscale (Fashion-MNIST): dim 64, 6 blocks, 2 heads, 49 patch tokens, 3 exits.

    Sized to train on one CPU core in minutes (about 17 MMACs per image at the last exit).
    """
    args = dict(in_chans=1, num_classes=10, input_size=(28, 28), embed_dim=64, depth=6, num_heads=2, exits=(1, 3))
    return vit_staged(**dict(args, **kwargs))


@register_model
def vit_tiny_conv_cifar(**kwargs) -> StagedModel:
    """DeiT-Tiny shape (dim 192, 12 blocks, 3 heads) with a conv stem for 32x32 RGB: 64 patch tokens, 4 exits."""
    args = dict(in_chans=3, num_classes=10, input_size=(32, 32), embed_dim=192, depth=12, num_heads=3)
    return vit_staged(**dict(args, **kwargs))


class CascadeState(NamedTuple):
    """The state between the two ViTs of a DVT cascade.

    Attributes:
        image: the input image (the fine stage embeds it at full size).
        coarse: the coarse ViT's final token state.
        relation: the coarse ViT's raw attention logits of every block and head, un-merged to its token grid
            ``[B, L * H, 1 + hc * wc, 1 + hc * wc]`` (class token first; ``None`` without relationship reuse).
    """

    image: Tensor
    coarse: TokenState
    relation: Tensor | None = None


register_state_type("cascade_state", CascadeState)  # exports name it (adaptnn.runtime.state_types)


class CoarseStage(nn.Module):
    """DVT's first stage: the image resized to ``size`` (a coarse token grid), a ViT, its final norm.

    Attributes:
        collect_relations: also return every block's raw attention logits (for the fine stage's relationship
            reuse); the blocks then run an explicit softmax instead of the fused attention kernel, so this costs
            time only when the cascade reuses relations.
    """

    def __init__(
        self,
        embed: ConvStemEmbed,
        blocks: Sequence[nn.Module],
        norm: nn.Module,
        size: tuple[int, int],
        collect_relations: bool = False,
    ):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.embed = embed
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm
        self.collect_relations = bool(collect_relations)

    def forward(self, x: Tensor) -> CascadeState:
        small = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        state = self.embed(small)
        relation = None
        if not self.collect_relations:
            state = self.blocks(state)
        else:
            _refuse_predictors(self.blocks)
            maps = []
            for blk in self.blocks:
                entry = state
                state, logits = blk(state, return_logits=True)
                maps.append(_unmerge_map(logits, entry))
            relation = torch.cat(maps, dim=1)
        return CascadeState(x, state._replace(tokens=self.norm(state.tokens)), relation)


class FineStage(nn.Module):
    """DVT's second stage: a ViT on the full token grid that reuses the coarse stage's features and relations.

    Feature reuse: the coarse ViT's final tokens (un-merged back to their grid, so token reduction in the coarse
    stage is allowed) go through ``LayerNorm -> Linear`` (zero-initialised, so training starts from the plain fine
    ViT), are upsampled to the fine grid and added to the fine tokens after the embedding (the class token gets
    the coarse class token's).

    Relationship reuse (``relation`` set): the coarse ViT's raw attention logits of all ``Lc`` blocks and ``Hc``
    heads (:attr:`CascadeState.relation`, on the coarse grid) go through an MLP over that ``Lc * Hc`` channel axis
    (``Linear -> GELU -> Linear``, the last one zero-initialised: training starts from the plain fine ViT) to one
    map per fine block and head, are upsampled to the fine grid on both the query and the key axis (nearest, as
    the features; the class token's row and column map to themselves) and are added to the fine attention logits
    before the softmax (through the additive mask, so the fused kernel is kept). When the fine stage merges
    tokens (ToMe/EViT), a merged token's bias is the mean over the original tokens it stands for.
    """

    def __init__(
        self,
        embed: ConvStemEmbed,
        blocks: Sequence[nn.Module],
        norm: nn.Module,
        coarse_dim: int,
        relation_channels: tuple[int, int] | None = None,
    ):
        super().__init__()
        dim = embed.pos_embed.shape[-1]
        self.embed = embed
        self.reuse = nn.Sequential(nn.LayerNorm(coarse_dim), nn.Linear(coarse_dim, dim))
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm
        self.coarse_grid: tuple[int, int] | None = None  # set by dvt_staged
        self._pairs: dict[tuple, Tensor] = {}  # (fine grid, device) -> gather index of the upsampled relation maps
        self.relation: nn.Sequential | None = None
        if relation_channels is not None:
            c_in, c_out = map(int, relation_channels)
            hidden = max(c_in, c_out)
            self.relation = nn.Sequential(nn.Linear(c_in, hidden), nn.GELU(), nn.Linear(hidden, c_out))

    def forward(self, cascade: CascadeState) -> TokenState:
        state = self.embed(cascade.image)
        ctx = self.reuse(unmerge(cascade.coarse))  # [b, 1 + hc * wc, d]
        b, _, d = ctx.shape
        hc, wc = self.coarse_grid
        n_fine = state.tokens.shape[1] - 1
        grid = ctx[:, 1:].transpose(1, 2).reshape(b, d, hc, wc)
        fine_hw = _fine_grid(cascade.image, n_fine)
        up = F.interpolate(grid, size=fine_hw, mode="nearest").flatten(2).transpose(1, 2)
        state = state._replace(tokens=state.tokens + torch.cat([ctx[:, :1], up], dim=1))
        if self.relation is None:
            state = self.blocks(state)
        else:
            if cascade.relation is None:
                raise ConfigError("the fine stage reuses relations but the cascade state carries none")
            _refuse_predictors(self.blocks)
            for blk, bias in zip(self.blocks, self.relation_bias(cascade.relation, fine_hw), strict=True):
                state = blk(state, attn_bias=_merge_map(bias, state))
        return state._replace(tokens=self.norm(state.tokens))

    def relation_bias(self, relation: Tensor, fine_hw: tuple[int, int]) -> list[Tensor]:
        """The per-block attention biases ``[B, H, 1 + hf * wf, 1 + hf * wf]`` from the coarse logits ``relation``."""
        n = relation.shape[-1]
        maps = self.relation(relation.permute(0, 2, 3, 1)).flatten(1, 2)  # [B, n * n, Lf * Hf], channels last
        key = (tuple(fine_hw), n, maps.device)
        if key not in self._pairs:  # built once per grid and device: not on every call of the fine stage
            index = _upsample_index(self.coarse_grid, fine_hw, maps.device)
            self._pairs[key] = (index[:, None] * n + index[None, :]).flatten()  # (query, key) pairs of the fine grid
        pairs = self._pairs[key]
        side = 1 + fine_hw[0] * fine_hw[1]
        # one gather of whole channel rows, then one transpose (4x faster on CPU than selecting the two last axes)
        maps = maps.index_select(1, pairs).transpose(1, 2).contiguous().unflatten(2, (side, side))
        return list(maps.unflatten(1, (len(self.blocks), -1)).unbind(1))


def _refuse_predictors(blocks: nn.Sequential) -> None:
    if any(getattr(blk, "predictor", None) is not None for blk in blocks):
        raise ConfigError(
            "DVT relationship reuse needs every token's attention logits; DynamicViT keep predictors drop tokens: "
            "build the cascade with relation_reuse=False to use them"
        )


def _sources(state: TokenState, what: str) -> Tensor | None:
    """The original token each token of ``state`` stands for (``None``: nothing merged); refuses merged tokens
    whose sources were not tracked (``what`` names the operation for the error)."""
    if state.source is None and state.size is not None:
        raise ConfigError(f"cannot {what}: tokens were merged without source tracking")
    return state.source


def _unmerge_map(logits: Tensor, state: TokenState) -> Tensor:
    """Attention logits ``[B, H, N, N]`` of the tokens of ``state`` at their original positions ``[B, H, N0, N0]``.

    Each original token takes its merged token's row and column. The logits are raw (no ``log(size)``): a softmax
    over the un-merged keys then equals proportional attention over the merged ones.
    """
    if _sources(state, "un-merge attention maps") is None:
        return logits
    b, h, n, _ = logits.shape
    n0 = state.source.shape[1]
    rows = state.source[:, None, :, None].expand(b, h, n0, n)
    cols = state.source[:, None, None, :].expand(b, h, n0, n0)
    return logits.gather(2, rows).gather(3, cols)


def _merge_map(bias: Tensor, state: TokenState) -> Tensor:
    """A bias ``[B, H, N0, N0]`` on the original tokens pooled to the tokens of ``state`` (mean over each token's
    originals on both axes); unchanged while nothing was merged."""
    if _sources(state, "merge attention biases") is None:
        return bias
    b, h, n0, _ = bias.shape
    n = state.tokens.shape[1]
    src = state.source
    rows = bias.new_zeros((b, h, n, n0)).scatter_add_(2, src[:, None, :, None].expand(b, h, n0, n0), bias)
    pooled = bias.new_zeros((b, h, n, n)).scatter_add_(3, src[:, None, None, :].expand(b, h, n, n0), rows)
    count = bias.new_zeros((b, n)).scatter_add_(1, src, bias.new_ones((b, n0))).clamp_min(1.0)
    return pooled / (count[:, None, :, None] * count[:, None, None, :])


def _upsample_index(coarse: tuple[int, int], fine: tuple[int, int], device: torch.device) -> Tensor:
    """``[1 + hf * wf]``: the coarse token each fine token reads (class token 0 -> 0; patches as nearest upsampling)."""
    hc, wc = coarse
    grid = torch.arange(1, 1 + hc * wc, dtype=torch.float32, device=device).reshape(1, 1, hc, wc)
    patches = F.interpolate(grid, size=fine, mode="nearest").flatten().long()
    return torch.cat([patches.new_zeros(1), patches])


def _fine_grid(image: Tensor, n: int) -> tuple[int, int]:
    h, w = (int(image.shape[-2]) + 3) // 4, (int(image.shape[-1]) + 3) // 4  # the stride-4 stem's output grid
    if h * w != n:
        raise ConfigError(f"fine token grid {h}x{w} does not match {n} tokens")
    return h, w


class _CoarseHead(nn.Module):
    """The exit after the coarse stage: a class-token head on the coarse tokens."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, cascade: CascadeState) -> Tensor:
        return self.head(cascade.coarse.tokens)


def dvt_staged(
    *,
    in_chans: int = 1,
    num_classes: int = 10,
    input_size: Sequence[int] = (28, 28),
    coarse_size: Sequence[int] = (16, 16),
    embed_dim: int = 64,
    depth: int = 6,
    num_heads: int = 2,
    mlp_ratio: float = 4.0,
    drop_path_rate: float = 0.0,
    relation_reuse: bool = False,
) -> StagedModel:
    """The DVT cascade (Wang et al., "Not All Images are Worth 16x16 Words", NeurIPS 2021) as a 2-exit model.

    Exit 0: a conv-stem ViT on the image resized to ``coarse_size`` (few tokens: cheap); exit 1: a second ViT on
    the full-size token grid that reuses the coarse stage's final features and, with ``relation_reuse``, its
    attention logits (:class:`FineStage`). Confident samples stop after the coarse stage under any early-exit
    policy; every block is a token block, so ToMe/EViT knobs apply to both stages (the coarse attention maps are
    un-merged to the grid, the fine biases pooled to the merged tokens) and DynamicViT too, without relation reuse.

    ``relation_reuse`` is off by default: the coarse stage then keeps the fused attention kernel (collecting the
    logits needs an explicit softmax in every coarse block, paid by every sample, exiting or not), and models and
    checkpoints saved before it existed build and load unchanged.
    """
    sizes = [tuple(map(int, input_size)), tuple(map(int, coarse_size))]
    if any(len(sz) != 2 or sz[0] % 4 or sz[1] % 4 for sz in sizes):
        raise ConfigError(f"input_size and coarse_size are (height, width), multiples of 4; got {sizes}")
    if depth < 1 or num_classes < 2:
        raise ConfigError(f"need depth >= 1 and num_classes >= 2; got {depth}, {num_classes}")
    rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]

    def blocks() -> list[TokenBlock]:
        return [TokenBlock(Block(embed_dim, num_heads, mlp_ratio, drop_path=rates[i])) for i in range(depth)]

    fine_grid = (sizes[0][0] // 4, sizes[0][1] // 4)
    coarse_grid = (sizes[1][0] // 4, sizes[1][1] // 4)
    coarse_embed = ConvStemEmbed(in_chans, embed_dim, coarse_grid)
    coarse = CoarseStage(coarse_embed, blocks(), nn.LayerNorm(embed_dim), sizes[1], bool(relation_reuse))
    channels = (depth * num_heads, depth * num_heads) if relation_reuse else None
    fine_embed = ConvStemEmbed(in_chans, embed_dim, fine_grid)
    fine = FineStage(fine_embed, blocks(), nn.LayerNorm(embed_dim), embed_dim, channels)
    fine.coarse_grid = coarse_grid
    heads = [
        _CoarseHead(TokenHead(embed_dim, num_classes, pool="cls", norm=False)),
        TokenStateHead(TokenHead(embed_dim, num_classes, pool="cls", norm=False), False),
    ]
    model = StagedModel([coarse, fine], heads, input_spec=InputSpec((in_chans, *sizes[0])), num_classes=num_classes)
    _init_weights(model)
    nn.init.zeros_(fine.reuse[1].weight)  # start from the plain fine ViT
    if fine.relation is not None:
        nn.init.zeros_(fine.relation[-1].weight)  # zero biases (the bias is zero already): the plain fine ViT
    return model


@register_model
def dvt_vit_tiny_conv_fmnist(**kwargs) -> StagedModel:
    """DVT cascade for Fashion-MNIST: a 4x4-token ViT (16x16 input) then a 7x7-token ViT (28x28), dim 64, 6 blocks."""
    return dvt_staged(**kwargs)
