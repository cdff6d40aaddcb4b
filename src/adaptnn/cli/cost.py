"""Per-exit MACs and parameters of a registered model, a preset, or a timm/torchvision/Hugging Face model.

MODEL is one of:

* a registered adaptnn model (``adaptnn models``), e.g. ``msdnet_cifar100``, ``efficientnet_lite0``;
* ``timm:NAME`` (a timm CNN with feature_info, or a ViT/DeiT), e.g. ``timm:resnet50``, ``timm:deit_small_patch16_224``;
* ``torchvision:NAME`` (ResNet, MobileNetV2/V3, EfficientNet, ConvNeXt), e.g. ``torchvision:mobilenet_v3_large``;
* ``hf:PATH`` (a local BERT-family model directory, or ``hf:all-MiniLM-L6-v2`` for the packaged one);
* a plain timm name that is not a registered adaptnn model (e.g. ``resnet50``).

Adapter models are built with random weights (nothing is downloaded). ``--kwargs`` go to the factory
(``timm_staged``, ``torchvision_staged``, ``hf_staged``: e.g. ``'{exits: [0, 2], num_classes: 100}'``).
Token models are counted for 128 tokens unless ``--input_size [T]`` says otherwise.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from jsonargparse import ActionYesNo, ArgumentParser, Namespace

if TYPE_CHECKING:
    import torch

    from ..runtime.cost import CostBreakdown
    from ..runtime.staged import StagedModel

HELP = "Count per-exit MACs (registered models, timm:NAME, torchvision:NAME, hf:PATH)."

DEFAULT_TOKENS = 128


def build(parser: ArgumentParser) -> None:
    parser.add_argument(
        "model",
        type=str,
        help="Registered model (see `adaptnn models`), timm:NAME, torchvision:NAME, hf:PATH, or a plain timm name.",
    )
    parser.add_argument("--input_size", type=list[int] | None, default=None, help="One sample's shape, e.g. [3,32,32].")
    parser.add_argument("--kwargs", type=dict | None, default=None, help="Model arguments, e.g. '{num_classes: 100}'.")
    parser.add_argument("--json", action=ActionYesNo, default=False, help="Print JSON instead of a table.")


def run(args: Namespace) -> None:
    import torch

    from ..errors import ConfigError
    from ..models import resolve_model_name
    from ..runs.targets import build_named_model
    from ..runtime.execution import stage_segments

    factory, naming = resolve_model_name(args.model)
    model = build_named_model(args.model, factory, {**naming, **(args.kwargs or {})})
    spec = model.input_spec
    dtype = torch.long if spec is not None and spec.dtype_kind == "int" else torch.float32
    input_size = args.input_size
    if input_size is None:
        if spec is not None and dtype == torch.long and list(spec.shape) == [None]:
            input_size = [DEFAULT_TOKENS]
        elif spec is None or any(s is None for s in spec.shape):
            raise ConfigError(f"model {args.model!r} has no fixed input size; pass --input_size")
        else:
            input_size = list(spec.shape)
    breakdown = _breakdown(model, args.model, input_size, dtype)
    share = breakdown.heads_share()
    if args.json:
        out = {
            "model": args.model,
            "factory": factory,
            "kwargs": {**naming, **(args.kwargs or {})},
            **breakdown.to_dict(),
            "backbone_macs": share["backbone_macs"],
            "heads_share": share["share"],
            "added_heads_share": share["added_share"],
        }
        print(json.dumps(out, indent=2))
        return
    print(
        f"{args.model}, one sample of shape {list(breakdown.input_size)} "
        "(MACs: conv + matmul; see adaptnn.runtime.cost)"
    )
    print(f"{'exit':>4} {'segment MACs':>14} {'head MACs':>11} {'cumulative MACs':>16} {'share':>7} {'params':>11}")
    total = breakdown.exit_macs[-1]
    for k, segments in enumerate(stage_segments(model.exit_after)):
        seg = sum(breakdown.segment_macs[j] for j in segments)
        print(
            f"{k:>4} {seg:>14,.0f} {breakdown.head_macs[k]:>11,.0f} {breakdown.exit_macs[k]:>16,.0f} "
            f"{100 * breakdown.exit_macs[k] / total:>6.1f}% {breakdown.exit_params[k]:>11,}"
        )
    print(
        f"heads: {share['heads_total']:,.0f} MACs = {100 * share['share']:.2f}% of the backbone's "
        f"{share['backbone_macs']:,.0f} (exits before the last: {100 * share['added_share']:.2f}%)"
    )


def _breakdown(model: StagedModel, name: str, input_size: list[int], dtype: torch.dtype) -> CostBreakdown:
    """``cost_breakdown`` for one sample of ``input_size``; an input the model cannot run on is an InputError."""
    from ..errors import AdaptnnError, InputError
    from ..runtime.cost import cost_breakdown

    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in input_size):
        raise InputError(f"--input_size must hold positive sizes, got {list(input_size)}")
    try:
        return cost_breakdown(model, input_size, dtype=dtype)
    except AdaptnnError:
        raise
    except (RuntimeError, AssertionError, ValueError, IndexError) as err:  # e.g. a feature map shrunk to nothing
        spec = model.input_spec
        expects = f" (it expects {list(spec.shape)})" if spec is not None else ""
        reason = " ".join(str(err).split())[:300].rstrip(".") or type(err).__name__
        raise InputError(
            f"model {name!r} cannot run on one sample of shape {list(input_size)}{expects}: {reason}; "
            "pass a larger or matching --input_size"
        ) from None
