"""Per-exit MACs and parameters of every registered MSDNet preset, next to the published figures.

For each ``msdnet*`` preset (built on the meta device: nothing is allocated or trained) this prints and
saves, per exit:

* ``macs``: cumulative multiply-adds from :func:`adaptnn.cost.cost_breakdown` (our convention: conv +
  linear weights only),
* ``params``: cumulative parameters (every segment and head up to the exit),
* ``ref_ops``: the same network counted in the convention of MSDNet's reference op counter (conv
  multiply-adds + one op per ReLU input element + pooling window ops + linear biases), via
  :func:`adaptnn.models.msdnet.reference_counter_costs`,
* ``published``: the figures printed by the reference implementation, where one is available (sources
  below), and the relative differences.

Usage::

    python benchmarks/msdnet_cost.py          # writes benchmarks/results/msdnet_cost.{json,md}

Deterministic (no randomness, no timing); takes well under a minute on a CPU.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from adaptnn import create_model, list_models
from adaptnn.models.msdnet import MSDNetLayer, reference_counter_costs
from adaptnn.runtime.cost import cost_breakdown

RESULTS = Path(__file__).parent / "results"

# Figures printed by the reference implementation (read, not copied code): FLOPs and params in millions.
PUBLISHED = {
    "msdnet_imagenet_step7": {
        "source": "kalviny/MSDNet-PyTorch issue #10 (op_counter.py output for the released ImageNet model "
        "msdnet-step=7-block=5: base 7, step 7, nChannels 32, growthRate 16, grFactor/bnFactor 1-2-4-4)",
        "url": "https://github.com/kalviny/MSDNet-PyTorch/issues/10",
        "ops_M": [615.69, 1436.39, 2283.21, 2967.42, 3253.79],
        "params_M": [8.76, 20.15, 31.73, 41.86, 62.31],
    },
    "msdnet_cifar10": {
        "source": "kalviny/MSDNet-PyTorch check_msdnet/log.txt (printed model: cifar10, nBlocks 10, step 2, "
        "base 4, 'even', nChannels 16, growthRate 6, grFactor/bnFactor 1-2-4, prune max, reduction 0.5)",
        "url": "https://github.com/kalviny/MSDNet-PyTorch/blob/master/check_msdnet/log.txt",
        "total_params": 4_839_544,
        "head_in_channels": [160, 208, 256, 164, 212, 260, 308, 188, 236, 284],
    },
}

INPUT = {"cifar": (3, 32, 32), "imagenet": (3, 224, 224)}


def _relu_pool_bias_ops(model: nn.Module, size: tuple[int, ...]) -> dict[str, float]:
    """Totals (whole network, all heads) of the op kinds the reference counter adds to ours."""
    totals = {"relu": 0.0, "pool": 0.0, "linear_bias": 0.0}

    def hook(m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(m, nn.ReLU):
            totals["relu"] += inputs[0][0].numel()
        elif isinstance(m, nn.MaxPool2d):
            totals["pool"] += output[0].numel() * m.kernel_size**2
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            totals["pool"] += inputs[0][0].numel()
        elif isinstance(m, nn.Linear) and m.bias is not None:
            totals["linear_bias"] += m.bias.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model.forward_all(torch.empty((1, *size), device="meta"))
    for h in handles:
        h.remove()
    return totals


def _exit_layers(model: nn.Module) -> list[int]:
    """MSDNet layer index (1-based) each exit follows."""
    counts = [sum(isinstance(m, MSDNetLayer) for m in seg.modules()) for seg in model.segments]
    return [sum(counts[: i + 1]) for i in range(len(counts))]


def _hardware() -> str:
    try:
        return "\n".join(subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10])
    except OSError:
        return platform.processor()


def measure(name: str) -> dict:
    with torch.device("meta"):
        model = create_model(name).eval()
    size = tuple(model.input_spec.shape)
    breakdown = cost_breakdown(model, size)
    ref_ops, ref_params = reference_counter_costs(model, size)
    row = {
        "model": name,
        "input_size": list(size),
        "num_exits": model.num_exits,
        "exit_after_layers": _exit_layers(model),
        "macs": breakdown.exit_macs,
        "head_macs": breakdown.head_macs,
        "params": breakdown.exit_params,
        "total_params": sum(p.numel() for p in model.parameters()),
        "ref_ops": ref_ops,
        "ref_params": ref_params,
        "macs_vs_ref_ops": [m / r - 1 for m, r in zip(breakdown.exit_macs, ref_ops, strict=True)],
        "extra_ops_in_reference_convention": _relu_pool_bias_ops(model, size),
    }
    pub = PUBLISHED.get(name)
    if pub is not None:
        row["published"] = pub
        if "ops_M" in pub:
            row["macs_vs_published"] = [m / 1e6 / p - 1 for m, p in zip(breakdown.exit_macs, pub["ops_M"], strict=True)]
            row["ref_ops_vs_published"] = [r / 1e6 / p - 1 for r, p in zip(ref_ops, pub["ops_M"], strict=True)]
            row["params_vs_published"] = [
                q / 1e6 / p - 1 for q, p in zip(breakdown.exit_params, pub["params_M"], strict=True)
            ]
        if "total_params" in pub:
            row["total_params_equal_published"] = row["total_params"] == pub["total_params"]
            heads = [h.features[0][0].in_channels for h in model.heads]
            row["head_in_channels_equal_published"] = heads == pub["head_in_channels"]
    return row


def _markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# MSDNet presets: per-exit cost",
        "",
        f"Command: `{command}`. Meta device, batch 1, no training (epochs: none, seeds: none).",
        "`MACs` = our convention (conv + linear multiply-adds); `ref ops` = the reference counter's convention",
        "(MACs + ReLU elements + pooling + linear biases); `published` = printed by the reference implementation.",
        "",
    ]
    for row in rows:
        lines += [
            f"## {row['model']} (input {row['input_size']}, {row['num_exits']} exits after layers "
            f"{row['exit_after_layers']})",
            "",
        ]
        pub = row.get("published", {})
        header = "| exit | MACs (M) | head MACs (M) | params (M) | ref ops (M) | MACs vs ref ops |"
        sep = "|---:|---:|---:|---:|---:|---:|"
        if "ops_M" in pub:
            header += " published FLOPs (M) | published params (M) | MACs vs published | ref ops vs published |"
            sep += "---:|---:|---:|---:|"
        lines += [header, sep]
        for k in range(row["num_exits"]):
            line = (
                f"| {k} | {row['macs'][k] / 1e6:.2f} | {row['head_macs'][k] / 1e6:.2f} | {row['params'][k] / 1e6:.3f} "
                f"| {row['ref_ops'][k] / 1e6:.2f} | {100 * row['macs_vs_ref_ops'][k]:+.2f}% |"
            )
            if "ops_M" in pub:
                line += (
                    f" {pub['ops_M'][k]:.2f} | {pub['params_M'][k]:.2f} | {100 * row['macs_vs_published'][k]:+.2f}% "
                    f"| {100 * row['ref_ops_vs_published'][k]:+.3f}% |"
                )
            lines.append(line)
        extra = row["extra_ops_in_reference_convention"]
        lines += [
            "",
            f"Total params {row['total_params']:,}. Ops the reference convention adds (whole network, all heads): "
            f"ReLU {extra['relu'] / 1e6:.2f}M, pooling {extra['pool'] / 1e6:.2f}M, linear biases "
            f"{extra['linear_bias'] / 1e6:.4f}M.",
        ]
        if pub:
            lines.append(f"Published source: {pub['source']} ({pub['url']}).")
        if "total_params" in pub:
            lines.append(
                f"Total params equal published {pub['total_params']:,}: {row['total_params_equal_published']}; "
                f"classifier input channels equal published: {row['head_in_channels_equal_published']}."
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    command = " ".join(["python", *sys.argv])
    names = [n for n in list_models("msdnet*") if n != "msdnet_test_tiny"]
    rows = []
    for name in names:
        row = measure(name)
        rows.append(row)
        print(
            f"{name:26s} exits={row['num_exits']:2d} MACs(M)={[round(m / 1e6, 2) for m in row['macs']]} "
            f"params(M)={round(row['total_params'] / 1e6, 3)} max|MACs/ref-1|="
            f"{100 * max(abs(d) for d in row['macs_vs_ref_ops']):.2f}%"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "command": command,
        "hardware": _hardware(),
        "torch": torch.__version__,
        "epochs": None,
        "seeds": None,
        "convention": "macs: conv + linear multiply-adds (adaptnn.cost); ref_ops: + ReLU elements + pooling + "
        "linear biases (the reference op_counter.py convention)",
        "models": rows,
    }
    (RESULTS / "msdnet_cost.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "msdnet_cost.md").write_text(_markdown(rows, command))
    print(f"wrote {RESULTS / 'msdnet_cost.json'} and {RESULTS / 'msdnet_cost.md'}")


if __name__ == "__main__":
    main()
