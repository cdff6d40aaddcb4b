"""What did an ``l2w`` run's weight network learn? Per exit, the weight it gives a training sample against its loss.

L2W-DEN's premise (Han et al., ECCV 2022): easy samples, which exit early at inference, should count more for the
early exits, and hard samples for the late ones, i.e. weights that fall with the loss at early exits and rise with
it at late exits. This reads l2w training checkpoints (``<work_dir>/seed<N>/l2w/checkpoints/last.safetensors`` of a
``fidelity.py`` run, or ``checkpoints/last.safetensors`` of any l2w run directory), takes ``--samples`` training
images (no augmentation; the same split as ``fidelity.py``), computes every exit's loss with the model in eval mode,
and the weights the weight network gives them in micro-batches of the run's batch size (centred per micro-batch,
as in training). Per exit it reports the weights' spread, their Pearson and Spearman correlation with that exit's
loss (:func:`adaptnn.strategies.l2w.weight_loss_correlation`), and the mean weight of the easiest and the hardest
quarter of the samples by that loss. Runs trained since this script exist also log the Pearson figure per epoch
(``l2w_weight_loss_corr_<k>`` in ``metrics.jsonl``).

``--weight_net init`` weighs the same losses with the weight network the run *started* from instead (the trainer
seeds with the run's seed and builds it first, so it is rebuilt exactly): did meta-training move the weights, or
do they still show the random initialisation's slopes?

Example (the fidelity runs of issue 12; a minute on one CPU core)::

    python benchmarks/l2w_weights.py W/seed0/l2w/checkpoints/last.safetensors \\
        W/seed1/l2w/checkpoints/last.safetensors --root /tmp/adaptnn-cifar10-jpg \\
        --out benchmarks/results/l2w_weights_cifar10

Writes ``<out>.json``, ``<out>.md`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from adaptnn.errors import AdaptnnError, ConfigError
from adaptnn.io import load_checkpoint
from adaptnn.io.checkpoint import unpack_tensors
from adaptnn.models import load_model
from adaptnn.strategies.l2w import L2WLoss, weight_loss_correlation
from adaptnn.training import TrainConfig, build_strategy
from adaptnn.training.config import dataclass_from_mapping
from adaptnn.training.device import seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))
import strategies as engine  # noqa: E402  (benchmarks/strategies.py: data loading, hardware, reports)


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Column-wise ranks ``[N, K]`` (for a Spearman correlation through the Pearson one)."""
    return values.argsort(0).argsort(0).float()


def weight_profiles(
    path: str, images: torch.Tensor, labels: torch.Tensor, weight_nets: tuple[str, ...] = ("trained",)
) -> list[dict[str, Any]]:
    """The per-exit weight statistics of the l2w checkpoint ``path`` on ``images`` (see the module docstring), one
    profile per weight network in ``weight_nets``: ``"trained"`` (the checkpoint's) or ``"init"`` (the one its run
    started from). The losses are computed once and weighed by each."""
    try:
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt.meta.get("train_config"), dict):
            raise ConfigError(f"{path} has no train_config; expected a training checkpoint (checkpoints/last)")
        config = dataclass_from_mapping(TrainConfig, ckpt.meta["train_config"], f"{path}: train_config")
        if not isinstance(build_strategy(config), L2WLoss) or not ckpt.meta.get("strategy_state"):
            raise ConfigError(f"{path} is a {config.strategy!r} checkpoint without l2w state; expected an l2w run's")
        model = load_model(path).eval()
        strategies = {}
        for kind in weight_nets:
            strategy = build_strategy(config)
            if kind == "init":  # as the trainer does: seed, then build the weight network before anything else
                seed_everything(config.seed)
                strategy.setup(model)
            else:
                strategy.setup(model)
                tensors = {f"strategy.{k}": v for k, v in ckpt.extra.get("strategy", {}).items()}
                strategy.load_state_dict(unpack_tensors(ckpt.meta["strategy_state"], tensors))
            strategies[kind] = strategy
    except AdaptnnError as err:  # a checkpoint is data: a bad one is a one-line error
        raise SystemExit(str(err)) from None
    with torch.no_grad():
        try:
            chunks = [model.forward_all(images[i : i + 256]) for i in range(0, len(images), 256)]
        except (RuntimeError, AdaptnnError) as err:
            shape = tuple(images.shape[1:])
            raise SystemExit(f"{path}: its model does not take this dataset's inputs {shape} ({err})") from None
        logits = [torch.cat(per_exit) for per_exit in zip(*chunks, strict=True)]
        losses = torch.stack([F.cross_entropy(lg, labels, reduction="none") for lg in logits], dim=1)  # [N, K]
    quarter = max(1, len(losses) // 4)
    order = losses.argsort(0)  # per exit, easiest first
    profiles = []
    for kind, strategy in strategies.items():
        batch = config.batch_size
        with torch.no_grad():
            chunks = [strategy.sample_weights(losses[i : i + batch]) for i in range(0, len(losses), batch)]
        weights = torch.cat(chunks)
        profiles.append(
            {
                "checkpoint": path,
                "epoch": int(ckpt.meta["epoch"]) + 1,
                "weight_net": kind,
                "strategy_options": ckpt.meta["train_config"].get("strategy_options", {}),
                "weight_std": weights.std(0).tolist(),
                "pearson": weight_loss_correlation(weights, losses).tolist(),
                "spearman": weight_loss_correlation(_ranks(weights), _ranks(losses)).tolist(),
                "mean_weight_easiest_quarter": torch.gather(weights, 0, order[:quarter]).mean(0).tolist(),
                "mean_weight_hardest_quarter": torch.gather(weights, 0, order[-quarter:]).mean(0).tolist(),
                "mean_loss": losses.mean(0).tolist(),
            }
        )
    return profiles


def _short(path: str) -> str:
    """The part of a checkpoint path that names its run: ``.../work_C/seed0/l2w/checkpoints/last.safetensors`` ->
    ``work_C/seed0/l2w`` (the three folders above ``checkpoints/``)."""
    parts = Path(path).parts
    return "/".join(parts[-5:-2]) if len(parts) >= 5 else path


def _signed(values: list[float]) -> str:
    return " / ".join(f"{v:+.2f}" for v in values)


def _plain(values: list[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def markdown(report: dict[str, Any]) -> str:
    lines = ["# What l2w's weight network learned: weight vs loss at every exit", ""]
    lines += [f"Command: `{report['command']}`", "", report["setup"], ""]
    lines += [f"Hardware: {report['hardware']['summary']}.", ""]
    lines += [
        "Per exit (first to last): Pearson / Spearman correlation of a sample's weight with its loss at that exit "
        "(< 0: easy samples weighted more, the paper's premise for early exits; > 0: hard samples weighted more), "
        "and the mean weight of the easiest / hardest quarter by that exit's loss.",
        "",
        "| run | epoch | weight net | options | Pearson | Spearman | easiest quarter | hardest quarter | weight std |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["profiles"]:
        lines.append(
            f"| {_short(r['checkpoint'])} | {r['epoch']} | {r.get('weight_net', 'trained')} | "
            f"{r['strategy_options'] or 'defaults'} | "
            f"{_signed(r['pearson'])} | {_signed(r['spearman'])} | {_plain(r['mean_weight_easiest_quarter'])} | "
            f"{_plain(r['mean_weight_hardest_quarter'])} | {_plain(r['weight_std'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    runs = list(dict.fromkeys(r["checkpoint"] for r in report["profiles"]))  # one colour per run, init dashed
    for r in report["profiles"]:
        exits = np.arange(1, len(r["pearson"]) + 1)
        init = r.get("weight_net") == "init"
        label = _short(r["checkpoint"]) + (" (initial weight net)" if init else "")
        colour = f"C{runs.index(r['checkpoint']) % 10}"
        ax.plot(exits, r["pearson"], marker="o", ls="--" if init else "-", color=colour, label=label)
        ax.set_xticks(exits)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("exit")
    ax.set_ylabel("corr(weight, loss) at that exit")
    ax.set_title("l2w: > 0 weights hard samples more, < 0 easy ones")
    ax.set_ylim(-1.05, 1.05)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="l2w training checkpoints (.safetensors)")
    parser.add_argument("--dataset", default="image_folder")
    parser.add_argument("--root", default=None, help="dataset root (image_folder: the extracted CIFAR-10 tree)")
    parser.add_argument("--val_size", type=int, default=5000)
    parser.add_argument("--split_seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=2048, help="training images to weigh (a seeded draw)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--weight_net",
        choices=["trained", "init", "both"],
        default="trained",
        help="the checkpoint's weight network, the one its run started from, or both (a row each)",
    )
    parser.add_argument("--out", default="benchmarks/results/l2w_weights")
    args = parser.parse_args(argv)
    if args.samples < 8 or args.threads < 0:
        raise SystemExit(f"--samples must be at least 8 and --threads >= 0, got {args.samples} and {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        splits, _ = engine.load_data(args.dataset, args.root, args.val_size, args.split_seed, False)
    except AdaptnnError as err:  # an unknown dataset, a missing root: one line
        raise SystemExit(f"--dataset {args.dataset!r}: {err}") from None
    count = min(args.samples, len(splits.train))
    chosen = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(args.split_seed))[:count]
    items = [splits.train[int(i)] for i in chosen]
    images = torch.stack([x for x, _ in items])
    labels = torch.tensor([int(y) for _, y in items])
    kinds = ("init", "trained") if args.weight_net == "both" else (args.weight_net,)
    profiles = [profile for path in args.checkpoints for profile in weight_profiles(path, images, labels, kinds)]
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    setup = (
        f"{count} training images of {args.dataset} (split seed {args.split_seed}, val {args.val_size}, no "
        "augmentation), model in eval mode, weights in micro-batches of each run's batch size."
    )
    report = {"command": command, "setup": setup, "hardware": engine._hardware(), "profiles": profiles}
    engine.save_report(report, args.out, markdown, plot)
    return report


if __name__ == "__main__":
    main()
