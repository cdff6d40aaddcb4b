"""Small vision transformers with exits and token-reduction decision points (a DeiT-Tiny shape with a conv stem).

No ViT checkpoint installs offline, so this family gives adaptnn a ViT to train and measure on: a conv stem (two
3x3 stride-2 conv-BN-GELU, as in "Early Convolutions Help Transformers See Better", Xiao et al. 2021) turns a
28x28 or 32x32 image into a 7x7 or 8x8 grid of tokens, a class token and learned positions are added, then
pre-norm transformer blocks (timm's ``Block`` layout: ``norm1, attn.qkv, attn.q_norm/k_norm, attn.proj, ls1,
drop_path1, norm2, mlp, ls2, drop_path2``). Every block runs as a :class:`~adaptnn.layers.tokens.TokenBlock`, so
:func:`~adaptnn.layers.tokens.set_token_knob` turns ToMe or EViT on for the whole model; the state between
segments is a :class:`~adaptnn.layers.tokens.TokenState`. Exit heads (LayerNorm + linear on the class token) sit
after chosen blocks; the last one follows the final LayerNorm.

For real pretrained ViTs (online), use :func:`adaptnn.adapters.vit_tokens.token_vit` on a timm name instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers.heads import TokenHead
from ..layers.tokens import TokenBlock, TokenMap, TokenState, TokenStateHead
from ..runtime.staged import InputSpec, StagedModel
from ._registry import register_model

__all__ = ["vit_staged", "vit_tiny_conv_fmnist", "vit_tiny_conv_cifar"]


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
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> TokenState:
        tokens = self.stem(x).flatten(2).transpose(1, 2)  # [b, n, d]
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return TokenState(tokens, None, None, 1)


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
) -> StagedModel:
    """A conv-stem ViT with class-token exits after the blocks ``exits`` (0-based; the last block always has one).

    Args:
        in_chans, num_classes, input_size: input channels, classes, ``(height, width)`` (multiples of 4).
        embed_dim, depth, num_heads, mlp_ratio, qk_norm, init_values: the transformer (DeiT-Tiny: 192, 12, 3).
        drop_path_rate: stochastic depth, increasing linearly to this rate at the last block.
        exits: blocks followed by an exit (default: after each quarter of the depth).
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
    blocks = [TokenBlock(Block(embed_dim, num_heads, mlp_ratio, qk_norm, init_values, rates[i])) for i in range(depth)]
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
