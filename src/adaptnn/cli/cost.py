"""Per-exit MACs and parameters of a registered model."""

from __future__ import annotations

import json

from jsonargparse import ActionYesNo, ArgumentParser, Namespace

HELP = "Count per-exit MACs."


def build(parser: ArgumentParser) -> None:
    parser.add_argument("model", type=str, help="Registered model name (see `adaptnn models`).")
    parser.add_argument("--input_size", type=list[int] | None, default=None, help="One sample's shape, e.g. [3,32,32].")
    parser.add_argument("--kwargs", type=dict | None, default=None, help="Model arguments, e.g. '{num_classes: 100}'.")
    parser.add_argument("--json", action=ActionYesNo, default=False, help="Print JSON instead of a table.")


def run(args: Namespace) -> None:
    from ..cost import cost_breakdown
    from ..errors import ConfigError
    from ..models import create_model

    model = create_model(args.model, **(args.kwargs or {}))
    input_size = args.input_size
    if input_size is None:
        if model.input_spec is None or any(s is None for s in model.input_spec.shape):
            raise ConfigError(f"model {args.model!r} has no fixed input size; pass --input_size")
        input_size = list(model.input_spec.shape)
    breakdown = cost_breakdown(model, input_size)
    if args.json:
        print(json.dumps({"model": args.model, **breakdown.to_dict()}, indent=2))
        return
    print(f"{args.model}, one sample of shape {list(breakdown.input_size)} (MACs: conv + matmul; see adaptnn.cost)")
    print(f"{'exit':>4} {'segment MACs':>14} {'head MACs':>11} {'cumulative MACs':>16} {'share':>7} {'params':>10}")
    total = breakdown.exit_macs[-1]
    for k, seg_idx in enumerate(model.exit_after):
        first = model.exit_after[k - 1] + 1 if k else 0
        seg = sum(breakdown.segment_macs[first : seg_idx + 1])
        print(
            f"{k:>4} {seg:>14,.0f} {breakdown.head_macs[k]:>11,.0f} {breakdown.exit_macs[k]:>16,.0f} "
            f"{100 * breakdown.exit_macs[k] / total:>6.1f}% {breakdown.exit_params[k]:>10,}"
        )
