"""Compare training strategies side by side: same data, backbone, epochs, seed and optimiser.

For every strategy: train the backbone from the same initial weights, cache the logits of every exit on
the validation and test splits, map them to each exit's prediction (``strategy.predictions``: the raw
logits, or BoostNet's additive ensemble), run the budgeted-batch sweep (thresholds fitted on validation,
applied to test), and replay the strategy's own early-exit policy on the test logits at one operating
point as a consistency check. Writes ``<out>.json``, ``<out>.md`` and ``<out>.png`` (budgeted curves).

Metrics:
* anytime accuracy of every exit (test);
* budgeted-curve test accuracy at fixed budgets (fractions of the last exit's MACs), linearly
  interpolated along each curve (sorted by average test MACs);
* area under the budgeted curve over the cost range every strategy's curve covers, divided by the
  range's width (a mean accuracy, comparable across strategies).

Example (CPU, a few minutes per strategy)::

    python benchmarks/strategies.py --dataset fashion_mnist --model mecnn_mnist --epochs 3 \\
        --train_subset 20000 --out benchmarks/results/strategies_fashion_mnist
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptnn import create_model
from adaptnn.calibration.budgeted import budgeted_sweep
from adaptnn.data import DataConfig, build_datasets
from adaptnn.evaluation import collect_logits
from adaptnn.io import write_json
from adaptnn.policies import simulate_exits
from adaptnn.runtime import StagedModel
from adaptnn.runtime.cost import exit_macs
from adaptnn.training import TrainConfig, Trainer, build_strategy, seed_everything

log = logging.getLogger("benchmarks.strategies")

DEFAULT_STRATEGIES = ("joint", "distill", "boost", "imta", "l2w")
DEFAULT_BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.8)


def _hardware() -> dict[str, Any]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()[:12]
    except OSError:
        lscpu = []
    hw = {
        "lscpu": lscpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg": list(os.getloadavg()),
    }
    cpus = _lscpu_field(lscpu, "CPU(s)")
    hw["summary"] = hw["cuda"] or f"{cpu_label(hw)} ({cpus} CPUs, {hw['torch_threads']} torch threads)"
    return hw


def _lscpu_field(lscpu: list[str], name: str) -> str:
    return next((line for line in lscpu if line.split(":")[0].strip() == name), "").split(":")[-1].strip()


def cpu_label(hw: dict[str, Any]) -> str:
    """The processor a record was trained on, e.g. ``AMD EPYC family 25 model 17``, read from its ``lscpu`` lines.

    Two CPUs sold under one name can differ in family and model, and with them in the float rounding of their
    kernels: a run repeated on the other one does not follow the same float path, so a pairing across them is
    only as tight as two seeds.
    """
    if hw.get("cuda"):
        return hw["cuda"]
    lscpu = hw.get("lscpu", [])
    name, family, model = (_lscpu_field(lscpu, key) for key in ("Model name", "CPU family", "Model"))
    return " ".join(part for part in (name, family and f"family {family}", model and f"model {model}") if part)


def _curve(sweep: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    cost = np.array([pt["avg_cost"] for pt in sweep], dtype=np.float64)
    acc = np.array([pt["test_accuracy"] for pt in sweep], dtype=np.float64)
    order = np.argsort(cost, kind="stable")
    return cost[order], acc[order]


def _accuracy_at(cost: np.ndarray, acc: np.ndarray, budget: float) -> float | None:
    if budget < cost[0] or budget > cost[-1]:
        return None
    return float(np.interp(budget, cost, acc))


def _area(cost: np.ndarray, acc: np.ndarray, lo: float, hi: float, n: int = 512) -> float:
    grid = np.linspace(lo, hi, n)
    return float(np.trapezoid(np.interp(grid, cost, acc), grid) / (hi - lo))


def anchored_mean_accuracy(result: dict[str, Any]) -> float:
    """Mean accuracy over [first exit's MACs, last exit's MACs] of one strategy's budgeted curve.

    The curve (sorted by average test MACs) is anchored at the first and last exits' own test accuracies (the
    strategy's predictions there), clipped to that range, and its area is divided by the range's width, so every
    strategy of one backbone is scored over the same range whatever part of it its sweep reached.
    """
    macs, anytime = result["exit_macs"], result["anytime_accuracy"]
    lo, hi = float(macs[0]), float(macs[-1])
    cost, acc = _curve(result["budgeted"])
    inside = (cost > lo) & (cost < hi)
    cost = np.concatenate([[lo], cost[inside], [hi]])
    acc = np.concatenate([[anytime[0]], acc[inside], [anytime[-1]]])
    return _area(cost, acc, lo, hi)


def load_data(
    dataset: str, root: str | None, val_size: int, seed: int, augment: bool, train_subset: int = 0
) -> tuple[Any, Any]:
    """The splits of ``dataset`` and the training set (a seeded subset of ``train_subset`` samples when > 0)."""
    splits = build_datasets(DataConfig(name=dataset, root=root, val_size=val_size, seed=seed, augment=augment))
    train_set = splits.train
    if train_subset and train_subset < len(train_set):
        perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
        train_set = torch.utils.data.Subset(train_set, perm[:train_subset].tolist())
    return splits, train_set


def run_strategy(
    name: str,
    options: dict[str, Any],
    splits: Any,
    train_set: Any,
    args: argparse.Namespace,
    train_overrides: dict[str, Any] | None = None,
    resume: bool = False,
    build_model: Callable[[], StagedModel] | None = None,
) -> dict:
    """Train one strategy and evaluate it; returns its result record.

    ``train_overrides`` sets further :class:`TrainConfig` fields (e.g. ``nesterov``, ``weight_decay_norm_bias``,
    ``exit_weights``) for controlled runs; the run directory is ``args.work_dir / name``. ``resume`` continues a
    run cut short there from its last epoch checkpoint (the Trainer refuses one made with another config); the
    record's ``resumed_epochs`` says how many epochs an earlier process trained. ``build_model`` replaces
    ``create_model(args.model, **args.model_kwargs)`` (e.g. a stage-two model made from a stage-one checkpoint);
    it is called after seeding, and its model needs a ``model_spec`` that rebuilds it.
    """
    seed_everything(args.seed)  # identical initial weights for every strategy
    if build_model is not None:
        model = build_model()
    else:
        model = create_model(args.model, **json.loads(args.model_kwargs))
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        seed=args.seed,
        device=args.device,
        progress=False,
        strategy=name,
        strategy_options=options,
        num_workers=args.num_workers,
        precision=args.precision,
        **(train_overrides or {}),
    )
    strategy = build_strategy(cfg)
    run_dir = Path(args.work_dir) / name
    started = time.perf_counter()
    trainer = Trainer(model, train_set, cfg, run_dir, loss_fn=strategy)
    resuming = resume and trainer.checkpoint_path.exists()
    history = trainer.fit(resume=resume)
    train_time = time.perf_counter() - started
    resumed_epochs = 0
    if resuming:  # the epochs an earlier process trained are in the run's metrics log (one line per epoch)
        full = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines() if line.strip()]
        resumed_epochs, history = len(full) - len(history), full
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    val_logits, val_labels = collect_logits(model, splits.val, batch_size=512, device=device)
    test_logits, test_labels = collect_logits(model, splits.test, batch_size=512, device=device)
    val_pred = torch.stack(strategy.predictions(list(val_logits)))
    test_pred = torch.stack(strategy.predictions(list(test_logits)))
    costs = exit_macs(model.cpu(), tuple(splits.input_size))
    sweep = budgeted_sweep(val_pred.softmax(-1), val_labels, test_pred.softmax(-1), test_labels, costs)
    anytime = (test_pred.argmax(-1) == test_labels).double().mean(1).tolist()
    raw_anytime = (test_logits.argmax(-1) == test_labels).double().mean(1).tolist()
    # consistency: the strategy's own policy at p = 1 on the raw test logits reproduces the sweep's point
    point = min(sweep, key=lambda pt: abs(pt["p"] - 1.0))
    thresholds = [float("inf") if t is None else t for t in point["thresholds"]]
    exits, prediction = simulate_exits(strategy.policy(thresholds), test_logits)
    policy_acc = float((prediction.argmax(-1) == test_labels).double().mean())
    return {
        "strategy": name,
        "options": {k: v for k, v in vars(strategy).items() if not k.startswith("_") and _jsonable(v)},
        "train_time_s": train_time,
        "resumed_epochs": resumed_epochs,
        "epoch_time_s": [h["epoch_time_s"] for h in history],
        "train_loss": [h["train_loss"] for h in history],
        "extra_metrics": {k: v for k, v in history[-1].items() if k.startswith(name)},
        "exit_macs": costs,
        "anytime_accuracy": anytime,
        "raw_head_accuracy": raw_anytime,
        "budgeted": [
            {k: pt[k] for k in ("p", "avg_cost", "test_accuracy", "val_accuracy", "exit_fractions")} for pt in sweep
        ],
        "policy_check": {
            "p": point["p"],
            "sweep_test_accuracy": point["test_accuracy"],
            "policy_test_accuracy": policy_acc,
            "sweep_exit_fractions": point["exit_fractions"],
            "policy_exit_fractions": (torch.bincount(exits, minlength=len(costs)).double() / len(exits)).tolist(),
        },
    }


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def summarise(results: list[dict[str, Any]], budgets: list[float]) -> dict[str, Any]:
    """Budgeted accuracy at fixed budgets and the normalised area over the common cost range."""
    curves = {r["strategy"]: _curve(r["budgeted"]) for r in results}
    lo = max(c[0][0] for c in curves.values())
    hi = min(c[0][-1] for c in curves.values())
    last_cost = results[0]["exit_macs"][-1]
    table = []
    for r in results:
        cost, acc = curves[r["strategy"]]
        table.append(
            {
                "strategy": r["strategy"],
                "anytime_accuracy": r["anytime_accuracy"],
                "budget_accuracy": {f"{b:g}": _accuracy_at(cost, acc, b * last_cost) for b in budgets},
                "area_mean_accuracy": _area(cost, acc, lo, hi) if hi > lo else None,
                "train_time_s": r["train_time_s"],
            }
        )
    return {"common_cost_range": [lo, hi], "budgets_fraction_of_last_exit": budgets, "table": table}


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    budgets = [f"{b:g}" for b in s["budgets_fraction_of_last_exit"]]
    k = len(report["results"][0]["exit_macs"])
    lines = [
        f"# Strategy comparison: {report['setup']['dataset']} / {report['setup']['model']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Epochs {report['setup']['epochs']}, seed {report['setup']['seed']}, train samples "
        f"{report['setup']['train_samples']}, val {report['setup']['val_samples']}, test "
        f"{report['setup']['test_samples']}; hardware: {report['hardware']['summary']}.",
        "",
        "Exit MACs: " + ", ".join(f"{c / 1e6:.2f}M" for c in report["results"][0]["exit_macs"]),
        "",
        "Anytime = test accuracy of each exit's prediction (BoostNet: the additive ensemble). Budget columns: "
        "budgeted-curve test accuracy at that fraction of the last exit's MACs (thresholds fitted on validation). "
        f"Area = mean accuracy over the common cost range {s['common_cost_range'][0] / 1e6:.2f}M-"
        f"{s['common_cost_range'][1] / 1e6:.2f}M MACs. Train time was measured on a shared CPU (indicative only).",
        "",
        "| strategy | "
        + " | ".join(f"exit {i}" for i in range(k))
        + " | "
        + " | ".join(f"@{b}" for b in budgets)
        + " | area | train s |",
        "|---" * (2 + k + len(budgets) + 1) + "|",
    ]
    for row in s["table"]:
        accs = " | ".join(f"{a:.4f}" for a in row["anytime_accuracy"])
        buds = " | ".join("-" if v is None else f"{v:.4f}" for v in row["budget_accuracy"].values())
        area = "-" if row["area_mean_accuracy"] is None else f"{row['area_mean_accuracy']:.4f}"
        lines.append(f"| {row['strategy']} | {accs} | {buds} | {area} | {row['train_time_s']:.0f} |")
    ref = {row["strategy"]: row for row in s["table"]}.get("joint")
    if ref is not None:
        lines += ["", "Versus joint (budget columns where both curves reach; + = better):", ""]
        for row in s["table"]:
            if row["strategy"] == "joint":
                continue
            diffs = [
                (b, row["budget_accuracy"][b] - ref["budget_accuracy"][b])
                for b in row["budget_accuracy"]
                if row["budget_accuracy"][b] is not None and ref["budget_accuracy"][b] is not None
            ]
            wins = sum(d > 0 for _, d in diffs)
            detail = ", ".join(f"@{b}: {d * 100:+.2f}" for b, d in diffs)
            lines.append(f"- {row['strategy']}: better at {wins}/{len(diffs)} budgets ({detail} points)")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["results"]:
        cost, acc = _curve(r["budgeted"])
        line = ax.plot(cost / 1e6, acc, label=r["strategy"], lw=1.5)[0]
        ax.scatter(np.array(r["exit_macs"]) / 1e6, r["anytime_accuracy"], color=line.get_color(), s=14, marker="o")
    lo, hi = report["summary"]["common_cost_range"]
    ax.axvspan(lo / 1e6, hi / 1e6, color="0.9", zorder=0, label="common range")
    ax.set_xlabel("average MACs per sample (millions)")
    ax.set_ylabel("test accuracy")
    s = report["setup"]
    ax.set_title(f"{s['dataset']} / {s['model']}: budgeted curves ({s['epochs']} epochs, seed {s['seed']})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_report(report: dict[str, Any], out: str | Path, to_markdown: Any, to_png: Any) -> None:
    """Write ``<out>.json``, ``<out>.md`` (``to_markdown(report)``) and ``<out>.png`` (``to_png(report, path)``);
    print the markdown. Shared by this script and ``fidelity.py``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), report)
    text = to_markdown(report)
    out.with_suffix(".md").write_text(text)
    to_png(report, out.with_suffix(".png"))
    print(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--root", default=None, help="dataset root (image_folder: the extracted tree)")
    parser.add_argument("--model", default="mecnn_mnist")
    parser.add_argument("--model_kwargs", default="{}", help="JSON keyword arguments of the model")
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES))
    parser.add_argument("--options", default="{}", help='JSON {strategy: {option: value}}, e.g. {"boost": {"r": 0.5}}')
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument("--warmup_epochs", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val_size", type=int, default=5000)
    parser.add_argument("--train_subset", type=int, default=0, help="train on this many samples (0 = all)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--budgets", default=",".join(str(b) for b in DEFAULT_BUDGETS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--out", default="benchmarks/results/strategies_fashion_mnist")
    parser.add_argument("--work_dir", default=None, help="run directories (default: a temporary directory)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    tmp = None
    if args.work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="adaptnn-strategies-")
        args.work_dir = tmp.name
    splits, train_set = load_data(args.dataset, args.root, args.val_size, args.seed, args.augment, args.train_subset)
    options = json.loads(args.options)
    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    results = []
    for name in names:
        log.info("training %s", name)
        results.append(run_strategy(name, options.get(name, {}), splits, train_set, args))
        log.info("%s: anytime %s", name, [round(a, 4) for a in results[-1]["anytime_accuracy"]])
    budgets = [float(b) for b in args.budgets.split(",")]
    hw = _hardware()
    report = {
        "command": command,
        "setup": {
            "dataset": args.dataset,
            "model": args.model,
            "model_kwargs": json.loads(args.model_kwargs),
            "epochs": args.epochs,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "optimizer": args.optimizer,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "augment": args.augment,
            "train_samples": len(train_set),
            "val_samples": len(splits.val),
            "test_samples": len(splits.test),
        },
        "hardware": hw,
        "results": results,
        "summary": summarise(results, budgets),
    }
    save_report(report, args.out, markdown, plot)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
