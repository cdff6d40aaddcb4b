"""MSDNet: Multi-Scale Dense Networks (Huang et al., ICLR 2018) as a :class:`~adaptnn.runtime.StagedModel`.

MSDNet keeps a *list of feature maps, one per scale* (finest first) all through the network. Each layer
adds ``growth_rate * gr_factor[s]`` new channels to scale ``s`` (dense connectivity: new features are
concatenated to the old ones), computed from

* the same scale by a (bottleneck 1x1 +) 3x3 conv, and
* the next finer scale by a (bottleneck 1x1 +) strided 3x3 conv (half of the new channels each),

so coarse, classification-ready features exist from the first layer on. Towards the end the finest scales
are dropped ("prune" ``'max'``: in ``n_scales`` equal chunks of depth; ``'min'``: only in the last layers,
keeping at most as many scales as layers left), and 1x1 transition layers compress the channels by
``reduction`` (``'max'``: after every layer that drops a scale; ``'min'``: after 1/3 and 2/3 of the depth).
Classifiers read the coarsest scale: two strided 3x3 convs, global average pooling, a linear layer.

Layers are grouped into ``n_blocks`` blocks; block ``b`` has ``base`` layers (b = 0) or ``step``
(``step_mode='even'``) / ``step * b + 1`` (``'lin_grow'``) layers, and an exit follows every block. In
the staged model each block is one segment and the state between segments is the list of per-scale
feature maps (compacted per sample by :meth:`StagedModel.run_dynamic` like any list state).

Hyper-parameters and layer shapes follow the paper and the authors' PyTorch reference implementation, so
the registered presets are the published networks: the 10-exit CIFAR model has exactly the reference's
4,839,544 parameters (CIFAR-10), and the ImageNet step-7 model reproduces the reference counter's printed
per-exit FLOPs and parameters to the printed precision when counted in that counter's convention
(:func:`reference_counter_costs`); :mod:`adaptnn.runtime.cost`'s MACs are 0.2-1.2% lower because they leave out
ReLU, pooling and bias ops (``benchmarks/msdnet_cost.py`` tabulates both). ImageNet presets use
``base = step`` (first exit after ``step`` layers), as the released step-4/6/7 models do. Two documented
choices: the ImageNet stem's 7x7 conv has a bias (as in the PyTorch reference; the Lua original has none),
and classifiers pool globally (the reference's ``AvgPool2d(2)`` sees a 2x2 map at 32x32 and 224x224
inputs, so it is the same there, and other resolutions still work).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers.blocks import ConvBNReLU
from ..layers.collaboration import inline_collaboration
from ..layers.heads import MSDNetConvHead
from ..runtime.staged import InputSpec, StagedModel
from ..runtime.state import State
from ._registry import register_model

__all__ = [
    "msdnet",
    "msdnet_block_depths",
    "msdnet_scale_schedule",
    "reference_counter_costs",
    "MSDNetStem",
    "MSDNetLayer",
    "MSDNetTransition",
    "MSDNetBlock",
    "msdnet_cifar100",
    "msdnet_cifar100_budget",
    "msdnet_cifar10",
    "msdnet_imagenet_step4",
    "msdnet_imagenet_step6",
    "msdnet_imagenet_step7",
    "msdnet_test_tiny",
]

logger = logging.getLogger(__name__)


class _DenseConv(nn.Sequential):
    """New features of one MSDNet layer from one input scale: [1x1 bottleneck] + 3x3 conv (stride 1 or 2).

    The bottleneck has ``min(in_chans, bn_width * out_chans)`` channels (never widens the input).
    """

    def __init__(self, in_chans: int, out_chans: int, *, stride: int, bottleneck: bool, bn_width: int) -> None:
        layers: list[nn.Module] = []
        inner = in_chans
        if bottleneck:
            inner = min(in_chans, bn_width * out_chans)
            layers.append(ConvBNReLU(in_chans, inner, kernel=1))
        layers.append(ConvBNReLU(inner, out_chans, kernel=3, stride=stride))
        super().__init__(*layers)


class MSDNetStem(nn.Module):
    """First layer: maps the image to ``n_scales`` feature maps (each scale halves the resolution).

    Scale 0 is a 3x3 conv (``'cifar'``) or a 7x7/2 conv + 3x3/2 max pool (``'imagenet'``, 4x smaller);
    each further scale is a 3x3/2 conv of the previous one.
    """

    def __init__(self, in_chans: int, channels: Sequence[int], stem: str) -> None:
        super().__init__()
        if stem == "cifar":
            first: nn.Module = ConvBNReLU(in_chans, channels[0], kernel=3)
        else:  # imagenet
            first = nn.Sequential(
                nn.Conv2d(in_chans, channels[0], 7, stride=2, padding=3, bias=True),
                nn.BatchNorm2d(channels[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        convs = [first] + [ConvBNReLU(channels[s - 1], channels[s], stride=2) for s in range(1, len(channels))]
        self.scales = nn.ModuleList(convs)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for conv in self.scales:
            x = conv(x)
            out.append(x)
        return out


class MSDNetLayer(nn.Module):
    """One MSDNet layer: adds ``growth[s]`` channels to every output scale ``s`` (dense concatenation).

    The input holds ``in_scales`` maps (the coarsest ones), the output ``out_scales`` (``in_scales`` or
    one fewer: the finest input scale is then only used to feed the next scale and is dropped). Output
    scale ``s`` is ``cat(x_s, down(x_{s-1}), same(x_s))`` with ``growth[s] / 2`` channels from each conv,
    or ``cat(x_s, same(x_s))`` with ``growth[s]`` new channels for the finest kept scale when nothing is
    dropped (it has no finer neighbour).

    Args:
        in_chans: channels of each input scale (absolute scale index -> channels), all ``n_scales`` entries.
        growth: new channels of each scale, all ``n_scales`` entries.
        bn_factor: bottleneck width factor of each scale (bottleneck = ``bn_factor[s] * new channels``).
        in_scales, out_scales: number of (coarsest) scales read and written.
        bottleneck: use 1x1 bottlenecks.
    """

    def __init__(
        self,
        in_chans: Sequence[int],
        growth: Sequence[int],
        bn_factor: Sequence[int],
        in_scales: int,
        out_scales: int,
        bottleneck: bool,
    ) -> None:
        super().__init__()
        n_scales = len(in_chans)
        self.in_scales, self.out_scales = in_scales, out_scales
        self.discard = in_scales - out_scales
        offset = n_scales - out_scales  # absolute index of the finest output scale
        self.same = nn.ModuleList()
        self.down = nn.ModuleList()
        for s in range(offset, n_scales):
            has_finer = s > offset or self.discard > 0
            new = growth[s] // 2 if has_finer else growth[s]
            self.same.append(_DenseConv(in_chans[s], new, stride=1, bottleneck=bottleneck, bn_width=bn_factor[s]))
            if has_finer:
                self.down.append(
                    _DenseConv(in_chans[s - 1], new, stride=2, bottleneck=bottleneck, bn_width=bn_factor[s - 1])
                )
            else:
                self.down.append(nn.Identity())  # placeholder keeps indices aligned; never called

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        out = []
        for i in range(self.out_scales):
            j = i + self.discard  # position of this output scale in the input list
            same = self.same[i](x[j])
            if j == 0:  # finest kept scale, no finer neighbour
                out.append(torch.cat([x[j], same], dim=1))
            else:
                out.append(torch.cat([x[j], self.down[i](x[j - 1]), same], dim=1))
        return out


class MSDNetTransition(nn.Module):
    """1x1 conv-BN-ReLU on every kept scale, compressing the channels (``reduction``)."""

    def __init__(self, in_chans: Sequence[int], out_chans: Sequence[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(ConvBNReLU(i, o, kernel=1) for i, o in zip(in_chans, out_chans, strict=True))

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        return [conv(t) for conv, t in zip(self.convs, x, strict=True)]


class MSDNetBlock(nn.Module):
    """One segment: the layers (and transitions) between two exits; the first block starts with the stem."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor | list[Tensor]) -> list[Tensor]:
        for layer in self.layers:
            x = layer(x)
        return x


def msdnet_block_depths(n_blocks: int, base: int, step: int, step_mode: str) -> list[int]:
    """Layers per block: ``base`` first, then ``step`` each (``'even'``) or ``step * b + 1`` (``'lin_grow'``)."""
    if step_mode not in ("even", "lin_grow"):
        raise ConfigError(f"step_mode must be 'even' or 'lin_grow', got {step_mode!r}")
    return [base] + [step if step_mode == "even" else step * b + 1 for b in range(1, n_blocks)]


def msdnet_scale_schedule(n_layers: int, n_scales: int, prune: str) -> list[tuple[int, int]]:
    """``(in_scales, out_scales)`` of each of the ``n_layers`` layers (1-based layer ``l`` at index ``l-1``).

    ``'max'`` drops the finest scale every ``ceil(n_layers / n_scales)`` layers; ``'min'`` keeps all
    scales until only as many layers remain as scales, then drops one per layer (the last layer keeps
    only the coarsest scale).
    """
    schedule = []
    for layer in range(1, n_layers + 1):
        if prune == "max":
            interval = math.ceil(n_layers / n_scales)
            in_s = n_scales - max(0, layer - 2) // interval
            out_s = n_scales - (layer - 1) // interval
        elif prune == "min":
            in_s = min(n_scales, n_layers - layer + 2)
            out_s = min(n_scales, n_layers - layer + 1)
        else:
            raise ConfigError(f"prune must be 'max' or 'min', got {prune!r}")
        schedule.append((in_s, out_s))
    return schedule


#: weight initialisations of :func:`msdnet` (see its ``init`` argument); the first is the default
INITS = ("torch_default", "he")


def _init_weights(model: nn.Module) -> None:
    """He-normal convs (fan-out), unit BN, zero linear biases: the initialisation the reference code *intends*."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def _factors(name: str, value: Sequence[int] | str, expected: int | None = None) -> list[int]:
    if isinstance(value, str):  # "1-2-4", the reference command-line form
        try:
            value = [int(v) for v in value.split("-")]
        except ValueError:
            raise ConfigError(f"{name} must be integers like [1, 2, 4] or '1-2-4', got {value!r}") from None
    values = [int(v) for v in value]
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"{name} needs one positive integer per scale, got {list(value)}")
    if expected is not None and len(values) != expected:
        raise ConfigError(
            f"{name} has {len(values)} entries but gr_factor defines {expected} scales; give one entry per scale"
        )
    return values


def msdnet(
    *,
    n_blocks: int = 7,
    step: int = 2,
    base: int = 4,
    step_mode: str = "even",
    growth_rate: int = 6,
    gr_factor: Sequence[int] | str = (1, 2, 4),
    bn_factor: Sequence[int] | str = (1, 2, 4),
    n_channels: int = 16,
    prune: str = "max",
    reduction: float = 0.5,
    bottleneck: bool = True,
    num_classes: int = 100,
    stem: str = "cifar",
    input_size: int | Sequence[int] | None = None,
    in_chans: int = 3,
    head_channels: int | None = None,
    init: str = "torch_default",
    collaboration: str = "none",
) -> StagedModel:
    """Build an MSDNet with one exit after each of its ``n_blocks`` blocks.

    Argument names follow the paper's reference code (``nBlocks`` -> ``n_blocks``, ``grFactor`` ->
    ``gr_factor``, ...). Defaults are the reference CIFAR configuration (3 scales) with 7 exits.

    Args:
        n_blocks: number of blocks = number of exits.
        step: layers per block after the first (``'even'``), or the growth of that number (``'lin_grow'``).
        base: layers in the first block.
        step_mode: ``'even'`` or ``'lin_grow'`` (block ``b`` has ``step * b + 1`` layers).
        growth_rate: new channels per layer at scale 0; scale ``s`` gets ``growth_rate * gr_factor[s]``.
        gr_factor: channel multiplier of each scale (its length is the number of scales), e.g. ``[1, 2, 4]``
            or ``'1-2-4'``.
        bn_factor: bottleneck width factor of each scale (same length as ``gr_factor``).
        n_channels: stem channels at scale 0 (scale ``s``: ``n_channels * gr_factor[s]``).
        prune: ``'max'`` or ``'min'``: how the finest scales are dropped with depth (see module doc).
        reduction: transition compression (0 disables transitions), in (0, 1].
        bottleneck: 1x1 bottlenecks before the 3x3 convs.
        num_classes: classes of every exit.
        stem: ``'cifar'`` (3x3 conv, for ~32x32 inputs) or ``'imagenet'`` (7x7/2 conv + max pool, ~224x224).
        input_size: ``H`` or ``(H, W)`` of the inputs; default 32 (cifar stem) or 224 (imagenet stem).
        in_chans: input channels.
        head_channels: channels of the classifiers' convs; default 128 (cifar stem) or the coarsest
            scale's channels (imagenet stem), as in the reference.
        init: ``'torch_default'`` (PyTorch's default initialisation: what the MSDNet and BoostNet reference codes
            actually run, because their init loop only visits the blocks' and classifiers' top-level children and
            never reaches a conv, norm or linear layer) or ``'he'`` (He-normal fan-out convs, unit BN, zero linear
            biases: what that loop is written to do). Every conv is followed by batch norm, so the init's scale sets
            the effective learning rate (``lr / |w|^2``) early in training: He weights are about 12x larger in
            squared norm, which slows the early blocks, most of all under gradient rescaling (BoostNet, IMTA). On
            the reference CIFAR-10 recipe (3 epochs, seed 0) ``torch_default`` gave boost 74.15 vs joint 71.79 mean
            accuracy over budgets, ``he`` boost 68.78 vs joint 72.85 (benchmarks/results/fidelity_cifar10_controlled).
        collaboration: ``'none'`` or ``'inline'``: IMTA's stage-two architecture, where every exit's classifier also
            reads the previous exit's prediction (:func:`adaptnn.layers.collaboration.inline_collaboration`; the
            ``imta_isc`` strategy trains it from a stage-one checkpoint).
    """
    if stem not in ("cifar", "imagenet"):
        raise ConfigError(f"stem must be 'cifar' (32x32 inputs) or 'imagenet' (224x224 inputs), got {stem!r}")
    if init not in INITS:
        raise ConfigError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if collaboration not in ("none", "inline"):
        raise ConfigError(f"collaboration must be 'none' or 'inline', got {collaboration!r}")
    for name, value, low in (("n_blocks", n_blocks, 1), ("base", base, 1), ("step", step, 0)):
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if step_mode == "even" and n_blocks > 1 and step < 1:
        raise ConfigError(f"step must be >= 1 with step_mode='even' and n_blocks > 1, got {step}")
    for name, value in (("growth_rate", growth_rate), ("n_channels", n_channels), ("in_chans", in_chans)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if head_channels is not None and (not isinstance(head_channels, int) or head_channels < 1):
        raise ConfigError(f"head_channels must be a positive integer or None (reference width), got {head_channels!r}")
    if not 0 <= reduction <= 1:
        raise ConfigError(f"reduction must be in [0, 1] (0 disables transition layers), got {reduction}")
    gr = _factors("gr_factor", gr_factor)
    bn = _factors("bn_factor", bn_factor, expected=len(gr))
    n_scales = len(gr)
    growth = [growth_rate * g for g in gr]
    if any(g % 2 for g in growth[1:]):
        raise ConfigError(
            f"growth_rate * gr_factor must be even on scales > 0 (half comes from each neighbour), got {growth}"
        )
    depths = msdnet_block_depths(n_blocks, base, step, step_mode)
    n_layers = sum(depths)
    schedule = msdnet_scale_schedule(n_layers, n_scales, prune)
    if input_size is None:
        input_size = 32 if stem == "cifar" else 224
    hw = (int(input_size), int(input_size)) if isinstance(input_size, int) else tuple(int(s) for s in input_size)
    if len(hw) != 2 or min(hw) < 1:
        raise ConfigError(f"input_size is H or (H, W), got {input_size!r}")

    segments: list[nn.Module] = []
    heads: list[nn.Module] = []
    width = n_channels  # channels per unit of gr_factor (scale s has width * gr[s])
    layer = 0
    for b, depth in enumerate(depths):
        modules: list[nn.Module] = []
        if b == 0:
            modules.append(MSDNetStem(in_chans, [width * g for g in gr], stem))
        for _ in range(depth):
            layer += 1
            in_s, out_s = schedule[layer - 1]
            modules.append(MSDNetLayer([width * g for g in gr], growth, bn, in_s, out_s, bottleneck))
            width += growth_rate
            transition = reduction > 0 and (
                (prune == "max" and in_s > out_s)
                or (prune == "min" and layer in (math.floor(n_layers / 3), math.floor(2 * n_layers / 3)))
            )
            if transition:
                new_width = math.floor(reduction * width)
                if new_width < 1:
                    raise ConfigError(f"reduction {reduction} leaves no channels (width {width}); raise it")
                kept = range(n_scales - out_s, n_scales)
                modules.append(MSDNetTransition([width * gr[s] for s in kept], [new_width * gr[s] for s in kept]))
                width = new_width
        segments.append(MSDNetBlock(modules))
        coarse = width * gr[-1]
        hidden = head_channels if head_channels is not None else (128 if stem == "cifar" else coarse)
        heads.append(MSDNetConvHead(coarse, num_classes, width=hidden))
    logger.debug("MSDNet: %d blocks of %s layers, scale schedule %s", n_blocks, depths, schedule)
    model = StagedModel(
        segments,
        heads,
        input_spec=InputSpec((in_chans, hw[0], hw[1]), names=("channels", "height", "width")),
        num_classes=num_classes,
    )
    if init == "he":
        _init_weights(model)
    if collaboration == "inline":
        model = inline_collaboration(model, freeze=False)
    return model


def reference_counter_costs(model: StagedModel, input_size: Sequence[int]) -> tuple[list[float], list[int]]:
    """Per-exit cumulative (ops, params) in the convention of MSDNet's reference op counter.

    The published MSDNet figures come from the reference code's counter, which differs from
    :mod:`adaptnn.runtime.cost` (convolution and matmul multiply-adds only): it also counts one op per ReLU input
    element, ``kernel_area`` ops per pooled output element (global pooling: one per input element) and the
    linear layers' biases. This re-implements that convention with forward hooks on a meta-device copy
    (shapes only, any size is cheap) so our networks can be compared with the published numbers
    like-for-like, and the difference between the two conventions can be quantified.

    Args:
        model: an MSDNet (any :class:`StagedModel` of conv/BN/ReLU/pool/linear leaves works).
        input_size: one sample's shape, e.g. ``(3, 224, 224)``.

    Returns:
        ``(ops, params)``: cumulative ops and parameters at each exit (all earlier heads included).
    """
    meta = copy.deepcopy(model).to(device="meta").eval()
    total = {"ops": 0.0, "params": 0}

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            out_hw = output.shape[2] * output.shape[3]
            total["ops"] += module.in_channels * module.out_channels * k * out_hw / module.groups
        elif isinstance(module, nn.ReLU):
            total["ops"] += x[0].numel()
        elif isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
            k = module.kernel_size if isinstance(module.kernel_size, int) else math.prod(module.kernel_size)
            total["ops"] += output[0].numel() * k * (k if isinstance(module.kernel_size, int) else 1)
        elif isinstance(module, nn.AdaptiveAvgPool2d):
            total["ops"] += x[0].numel()
        elif isinstance(module, nn.Linear):
            total["ops"] += module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
        total["params"] += sum(p.numel() for p in module.parameters(recurse=False))

    ops: list[float] = []
    params: list[int] = []

    def after_exit(k: int, state: State) -> State:  # every segment and head up to exit k has run
        ops.append(total["ops"])
        params.append(total["params"])
        return state

    handles = [m.register_forward_hook(hook) for m in meta.modules() if next(m.children(), None) is None]
    try:
        with torch.no_grad():
            meta.walk(torch.empty((1, *input_size), device="meta"), after_exit=after_exit)
    finally:
        for handle in handles:
            handle.remove()
    return ops, params


def _merge(*configs: dict) -> dict:
    """Later configs override earlier ones (user kwargs last)."""
    merged: dict = {}
    for config in configs:
        merged.update(config)
    return merged


_CIFAR = dict(n_channels=16, growth_rate=6, gr_factor=(1, 2, 4), bn_factor=(1, 2, 4), stem="cifar")
_IMAGENET = dict(
    n_blocks=5,
    step_mode="even",
    n_channels=32,
    growth_rate=16,
    gr_factor=(1, 2, 4, 4),
    bn_factor=(1, 2, 4, 4),
    stem="imagenet",
    num_classes=1000,
)


@register_model
def msdnet_cifar100(**kwargs) -> StagedModel:
    """MSDNet for CIFAR-100 (32x32): 3 scales, 10 exits after layers 4, 6, 8, ..., 22 (step 2, base 4)."""
    return msdnet(**_merge(_CIFAR, dict(n_blocks=10, step=2, base=4, step_mode="even", num_classes=100), kwargs))


@register_model
def msdnet_cifar100_budget(**kwargs) -> StagedModel:
    """MSDNet for CIFAR-100, budgeted-batch setting of the reference code: 5 exits after layers 1, 3, 6, 10, 15."""
    return msdnet(**_merge(_CIFAR, dict(n_blocks=5, step=1, base=1, step_mode="lin_grow", num_classes=100), kwargs))


@register_model
def msdnet_cifar10(**kwargs) -> StagedModel:
    """MSDNet for CIFAR-10: the 10-exit CIFAR architecture with 10 classes."""
    return msdnet(**_merge(_CIFAR, dict(n_blocks=10, step=2, base=4, step_mode="even", num_classes=10), kwargs))


@register_model
def msdnet_imagenet_step4(**kwargs) -> StagedModel:
    """MSDNet for ImageNet (224x224), 4 scales, 5 exits after layers 4, 8, 12, 16, 20 (step 4)."""
    return msdnet(**_merge(_IMAGENET, dict(step=4, base=4), kwargs))


@register_model
def msdnet_imagenet_step6(**kwargs) -> StagedModel:
    """MSDNet for ImageNet (224x224), 4 scales, 5 exits after layers 6, 12, 18, 24, 30 (step 6)."""
    return msdnet(**_merge(_IMAGENET, dict(step=6, base=6), kwargs))


@register_model
def msdnet_imagenet_step7(**kwargs) -> StagedModel:
    """MSDNet for ImageNet (224x224), 4 scales, 5 exits after layers 7, 14, 21, 28, 35 (step 7)."""
    return msdnet(**_merge(_IMAGENET, dict(step=7, base=7), kwargs))


@register_model
def msdnet_test_tiny(**kwargs) -> StagedModel:
    """A tiny 3-exit, 3-scale MSDNet on 16x16 inputs for fast tests (6 layers; ends on the coarsest scale only)."""
    args = dict(
        n_blocks=3,
        step=2,
        base=2,
        step_mode="even",
        growth_rate=4,
        gr_factor=(1, 2, 2),
        bn_factor=(1, 1, 2),
        n_channels=4,
        num_classes=5,
        stem="cifar",
        input_size=16,
        head_channels=8,
    )
    return msdnet(**_merge(args, kwargs))
