"""Per-exit MACs, parameters and the heads' share for every registered preset and adapter family.

Counts only (MACs on the meta device, see adaptnn.runtime.cost): no training, no timing, random weights (nothing is
downloaded). Writes benchmarks/results/backbones.json and backbones.md.

    .venv/bin/python benchmarks/backbones.py [--out benchmarks/results] [--only resnet50,deit]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import adaptnn
from adaptnn.models import create_model, list_models
from adaptnn.runtime.cost import cost_breakdown

FACTORIES = {"timm_staged", "torchvision_staged", "hf_staged"}

# (label, factory, kwargs, input size, dtype): one or more models per adapter family
ADAPTERS: list[tuple[str, str, dict, tuple[int, ...], torch.dtype]] = [
    ("timm:resnet50", "timm_staged", {"arch": "resnet50"}, (3, 224, 224), torch.float32),
    ("timm:convnext_tiny", "timm_staged", {"arch": "convnext_tiny"}, (3, 224, 224), torch.float32),
    ("timm:efficientnet_b0", "timm_staged", {"arch": "efficientnet_b0"}, (3, 224, 224), torch.float32),
    ("timm:mobilenetv3_large_100", "timm_staged", {"arch": "mobilenetv3_large_100"}, (3, 224, 224), torch.float32),
    ("timm:vit_base_patch16_224", "timm_staged", {"arch": "vit_base_patch16_224"}, (3, 224, 224), torch.float32),
    ("timm:deit_small_patch16_224", "timm_staged", {"arch": "deit_small_patch16_224"}, (3, 224, 224), torch.float32),
    ("torchvision:resnet50", "torchvision_staged", {"arch": "resnet50"}, (3, 224, 224), torch.float32),
    (
        "torchvision:mobilenet_v3_large",
        "torchvision_staged",
        {"arch": "mobilenet_v3_large"},
        (3, 224, 224),
        torch.float32,
    ),
    ("torchvision:efficientnet_b0", "torchvision_staged", {"arch": "efficientnet_b0"}, (3, 224, 224), torch.float32),
    ("torchvision:convnext_tiny", "torchvision_staged", {"arch": "convnext_tiny"}, (3, 224, 224), torch.float32),
    ("hf:all-MiniLM-L6-v2 (128 tokens)", "hf_staged", {"path": "all-MiniLM-L6-v2"}, (128,), torch.long),
]


def _row(label: str, model: adaptnn.StagedModel, input_size: tuple, dtype: torch.dtype, spec: dict) -> dict:
    b = cost_breakdown(model, input_size, dtype=dtype)
    share = b.heads_share()
    return {
        "model": label,
        "spec": spec,
        "input_size": list(input_size),
        "num_exits": model.num_exits,
        "exit_macs": b.exit_macs,
        "exit_params": b.exit_params,
        "head_macs": b.head_macs,
        "backbone_macs": share["backbone_macs"],
        "heads_macs": share["heads_total"],
        "heads_share": share["share"],
        "added_heads_share": share["added_share"],
        "total_params": sum(p.numel() for p in model.parameters()),
        "head_kinds": [type(h).__name__ for h in model.heads],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--only", default="", help="comma-separated substrings of model labels to keep")
    args = parser.parse_args()
    torch.set_num_threads(1)
    only = [s for s in args.only.split(",") if s]
    jobs = [(n, n, {}, None, torch.float32) for n in list_models() if n not in FACTORIES] + ADAPTERS
    if only:
        jobs = [j for j in jobs if any(s in j[0] for s in only)]
    rows, errors = [], {}
    for label, factory, kwargs, input_size, dtype in jobs:
        t0 = time.perf_counter()
        try:
            model = create_model(factory, **kwargs)
            size = input_size or tuple(model.input_spec.shape)
            rows.append(_row(label, model, size, dtype, {"name": factory, "kwargs": kwargs}))
            print(f"{label}: {len(rows[-1]['exit_macs'])} exits, {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        except Exception as err:  # report and go on: one broken model must not hide the others
            errors[label] = f"{type(err).__name__}: {err}"
            print(f"{label}: FAILED {errors[label]}", file=sys.stderr)
    lscpu = subprocess.run(["bash", "-c", "lscpu | head"], capture_output=True, text=True).stdout
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "hardware": lscpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "adaptnn": adaptnn.__version__,
        "note": "counts only (MACs = conv + matmul multiply-adds per sample, adaptnn.cost); no training, no seeds",
        "models": rows,
        "errors": errors,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "backbones.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "backbones.md").write_text(_markdown(result))
    print(_markdown(result))


def _markdown(result: dict) -> str:
    lines = [
        "# Backbones: per-exit cost",
        "",
        f"`{result['command']}` (torch {result['torch']}); {result['note']}.",
        "",
        "| model | input | exits | cumulative MACs per exit (M) | params per exit (M) | heads' MACs / backbone | "
        "exits before the last / backbone |",
        "|---|---|---:|---|---|---:|---:|",
    ]
    for r in result["models"]:
        macs = ", ".join(f"{m / 1e6:,.1f}" for m in r["exit_macs"])
        params = ", ".join(f"{p / 1e6:.2f}" for p in r["exit_params"])
        lines.append(
            f"| {r['model']} | {'x'.join(map(str, r['input_size']))} | {r['num_exits']} | {macs} | {params} | "
            f"{100 * r['heads_share']:.2f}% | {100 * r['added_heads_share']:.2f}% |"
        )
    if result["errors"]:
        lines += ["", "Failed:", ""] + [f"- {k}: {v}" for k, v in result["errors"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
