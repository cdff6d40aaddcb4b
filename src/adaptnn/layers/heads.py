"""Exit heads: small modules mapping a segment's state to class logits, and a factory with per-family defaults.

Every intermediate exit costs compute that a sample reaching the last exit pays for nothing, so heads are
kept cheap. The defaults of :func:`make_head` (chosen by :func:`default_head_kind`) are:

* CNN feature maps ``[b, c, h, w]`` (ResNet, ConvNeXt, EfficientNet, MobileNet): ``"pool_linear"``, global
  average pooling then a linear layer, ``c * num_classes`` MACs. On ResNet-50 at 224x224 its three
  intermediate heads plus the original classifier cost 3.8 MMACs, 0.09% of the backbone's 4.1 GMACs
  (far below the 5% budget we hold heads to; ``benchmarks/backbones.py`` prints the share per family).
  ``"conv_pool_linear"`` (1x1 conv, BN, ReLU, pool, linear) is the stronger, costlier option: its
  cost grows with the map's area, 8.9% of ResNet-50 with the default width 256 but 2.3% with
  ``width=64``.
* MSDNet (a list of per-scale maps): ``"msdnet_conv"``, MSDNet's classifier: two 3x3 stride-2
  conv-BN-ReLU of ``width`` (128) channels on the coarsest scale, average pooling, linear.
* Token sequences ``[b, n, d]`` (ViT/DeiT): ``"token"``, LayerNorm and a linear layer on the class token
  (or the mean of the patch tokens for models without one); ``d * num_classes`` MACs.
* Encoder states ``{"hidden": [b, t, d], "mask": [b, t]}`` (BERT-family): ``"token"`` shaped like BERT's
  own classifier, a ``d x d`` dense + tanh (the pooler) then a linear layer on the [CLS] token.

:func:`adaptnn.runtime.cost.heads_share` reports the heads' MACs separately from the backbone's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from ..errors import ConfigError
from .blocks import ConvBNReLU

__all__ = [
    "PoolLinearHead",
    "ConvPoolHead",
    "MSDNetConvHead",
    "TokenHead",
    "HEAD_KINDS",
    "FAMILY_DEFAULT_HEADS",
    "FAMILY_DEFAULT_OPTIONS",
    "default_head_kind",
    "make_head",
]


class PoolLinearHead(nn.Module):
    """Global average pooling over the spatial dims, then a linear classifier.

    The cheapest useful head for CNN feature maps ``[b, c, h, w]``: its MACs are ``c * num_classes``
    (pooling is not counted), so heads stay a negligible share of the backbone's cost.

    Args:
        in_features: channels of the feature map.
        num_classes: number of output classes.
        dropout: dropout before the classifier (training only).
    """

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(x).flatten(1)  # [b, c]
        return self.fc(self.dropout(x))


class ConvPoolHead(nn.Module):
    """1x1 conv, BN, ReLU, global average pooling, linear: a stronger CNN head.

    Costs ``h * w * c * width + width * num_classes`` MACs, i.e. it grows with the feature map's area;
    keep ``width`` small on early, high-resolution exits.

    Args:
        in_features: channels of the feature map.
        num_classes: number of output classes.
        width: channels of the 1x1 conv (default: ``min(in_features, 256)``).
        dropout: dropout before the classifier.
    """

    def __init__(self, in_features: int, num_classes: int, width: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        width = int(width or min(in_features, 256))
        self.conv = ConvBNReLU(in_features, width, kernel=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.conv(x)).flatten(1)
        return self.fc(self.dropout(x))


class MSDNetConvHead(nn.Module):
    """MSDNet's exit classifier: two 3x3 stride-2 conv-BN-ReLU, average pooling, linear.

    Reads the coarsest scale when given the list of per-scale feature maps (MSDNet's state). The registered
    MSDNet models build their exits with this class (``width`` = 128 on CIFAR, the coarsest channels on ImageNet).

    Args:
        in_features: channels of the (coarsest) feature map.
        num_classes: number of output classes.
        width: channels of both convs (128 in the paper).
        scale: which entry of a list state to read (default: the last, coarsest one).
    """

    def __init__(self, in_features: int, num_classes: int, width: int = 128, scale: int = -1) -> None:
        super().__init__()
        self.scale = int(scale)
        self.features = nn.Sequential(
            ConvBNReLU(in_features, width, stride=2),
            ConvBNReLU(width, width, stride=2),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        if not isinstance(x, Tensor):
            x = x[self.scale]
        return self.fc(self.features(x).flatten(1))


class TokenHead(nn.Module):
    """Classifier on a token sequence: the class token or the mean of the tokens, LayerNorm, linear.

    Accepts ``[b, n, d]`` tokens (ViT) or an encoder state ``{"hidden": [b, t, d], "mask": [b, t]}``; with a
    mask, mean pooling skips padding.

    Args:
        in_features: token width ``d``.
        num_classes: number of output classes.
        pool: ``"cls"`` (token 0) or ``"mean"``.
        num_prefix_tokens: leading non-patch tokens (class/register/distillation) that ``"mean"`` skips.
        norm: LayerNorm before the classifier (ViT style).
        hidden: a ``d x d`` linear + tanh before the classifier (BERT-pooler style).
        dropout: dropout before the classifier.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        pool: str = "cls",
        num_prefix_tokens: int = 1,
        norm: bool = True,
        hidden: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ConfigError(f"TokenHead pool must be 'cls' or 'mean', got {pool!r}")
        self.pool = pool
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.norm = nn.LayerNorm(in_features) if norm else nn.Identity()
        self.hidden = nn.Sequential(nn.Linear(in_features, in_features), nn.Tanh()) if hidden else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        mask = None
        if isinstance(x, Mapping):
            x, mask = x["hidden"], x.get("mask")
        if self.pool == "cls":
            feat = x[:, 0]
        else:
            tokens = x[:, self.num_prefix_tokens :]
            if mask is not None:
                m = mask[:, self.num_prefix_tokens :].to(tokens.dtype).unsqueeze(-1)
                feat = (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)
            else:
                feat = tokens.mean(1)
        return self.fc(self.dropout(self.hidden(self.norm(feat))))


HEAD_KINDS: dict[str, type[nn.Module]] = {
    "pool_linear": PoolLinearHead,
    "conv_pool_linear": ConvPoolHead,
    "msdnet_conv": MSDNetConvHead,
    "token": TokenHead,
}

FAMILY_DEFAULT_HEADS: dict[str, str] = {
    "cnn": "pool_linear",
    "msdnet": "msdnet_conv",
    "vit": "token",
    "encoder": "token",
}

FAMILY_DEFAULT_OPTIONS: dict[str, dict] = {
    "vit": {"pool": "cls", "norm": True, "hidden": False},  # ViT's own head: LayerNorm + linear on the class token
    "encoder": {"pool": "cls", "norm": False, "hidden": True},  # BERT's pooler (dense + tanh) + linear on [CLS]
}


def default_head_kind(family: str) -> str:
    """The default head kind of a backbone family (``cnn``, ``msdnet``, ``vit``, ``encoder``)."""
    if family not in FAMILY_DEFAULT_HEADS:
        raise ConfigError(f"unknown backbone family {family!r}; expected one of {sorted(FAMILY_DEFAULT_HEADS)}")
    return FAMILY_DEFAULT_HEADS[family]


def make_head(kind: str, in_features: int, num_classes: int, **options: object) -> nn.Module:
    """Build an exit head by kind name (see :data:`HEAD_KINDS`); ``options`` go to its constructor.

    Args:
        kind: ``"pool_linear"``, ``"conv_pool_linear"``, ``"msdnet_conv"`` or ``"token"``; or a family name
            (``"cnn"``, ``"msdnet"``, ``"vit"``, ``"encoder"``) for that family's default head and options
            (:data:`FAMILY_DEFAULT_OPTIONS`; explicit ``options`` override them).
        in_features: channels (CNN) or token width (transformers) of the state the head reads.
        num_classes: number of output classes.
    """
    if kind in FAMILY_DEFAULT_HEADS:
        options = {**FAMILY_DEFAULT_OPTIONS.get(kind, {}), **options}
        kind = FAMILY_DEFAULT_HEADS[kind]
    if kind not in HEAD_KINDS:
        raise ConfigError(
            f"unknown head kind {kind!r}; expected one of {sorted(HEAD_KINDS)} "
            f"or a family {sorted(FAMILY_DEFAULT_HEADS)}"
        )
    try:
        return HEAD_KINDS[kind](int(in_features), int(num_classes), **options)
    except TypeError as err:
        raise ConfigError(f"head {kind!r}: {err}") from None
