"""Compare exit policies on one trained model: accuracy at equal MACs, and the accuracy-guarantee calibrator.

Trains one multi-exit model (joint loss), caches every exit's logits on the validation and test splits,
then for every policy family (max-softmax confidence, entropy, margin, patience, running-average and
boosted ensembles, learned; confidence-based ones also with per-exit temperature scaling):

* calibrates thresholds on the validation split to average-MACs budgets (fractions of the last exit's
  MACs) with :func:`adaptnn.calibration.calibrate_to_budget` and reports the test accuracy and test MACs;
* runs the budgeted-batch sweep and reports the area under the test accuracy-vs-MACs curve over the
  range every curve covers, and the MACs needed to match the last exit's test accuracy;
* runs the Learn-then-Test accuracy-guarantee calibrator (epsilon, delta) and reports the cost reached
  and the drop measured on the test split.
A realised ``run_dynamic`` pass checks simulated == real for every policy at one budget.

Example (CPU, a few minutes)::

    python benchmarks/policies.py --epochs 3 --train_subset 20000 --out benchmarks/results/policies_fashion_mnist
"""

from __future__ import annotations

import argparse
import logging
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from adaptnn import create_model
from adaptnn.calibration import calibrate_accuracy_guarantee, calibrate_to_budget
from adaptnn.data import DataConfig, build_datasets
from adaptnn.errors import BudgetError
from adaptnn.evaluation import collect_logits, macs_curve, plot_curves
from adaptnn.io import write_json
from adaptnn.policies import POLICY_NAMES, make_policy, simulate_exits
from adaptnn.runs import compare_policies
from adaptnn.runtime.cost import exit_macs
from adaptnn.training import TrainConfig, Trainer, seed_everything

log = logging.getLogger("benchmarks.policies")


def _hardware() -> list[str]:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()[:12]
    except OSError:
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--model", default="mecnn_mnist")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train_subset", type=int, default=20000, help="train on this many samples (0 = all)")
    parser.add_argument("--val_size", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.8])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.005, 0.01, 0.02])
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--out", default="benchmarks/results/policies_fashion_mnist")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(2)

    splits = build_datasets(DataConfig(name=args.dataset, val_size=args.val_size, seed=args.seed))
    train_set = splits.train
    if args.train_subset and args.train_subset < len(train_set):
        perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed))
        train_set = torch.utils.data.Subset(train_set, perm[: args.train_subset].tolist())
    seed_everything(args.seed)
    model = create_model(args.model, num_classes=splits.num_classes)
    cfg = TrainConfig(epochs=args.epochs, seed=args.seed, progress=False)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        Trainer(model, train_set, cfg, work).fit(resume=False)
    train_time = time.perf_counter() - started
    model = model.cpu().eval()
    val_logits, val_labels = collect_logits(model, splits.val, batch_size=512)
    test_logits, test_labels = collect_logits(model, splits.test, batch_size=512)
    costs = exit_macs(model, tuple(splits.input_size))
    k = len(costs)
    anytime = (test_logits.argmax(-1) == test_labels).double().mean(1).tolist()

    # accuracy at equal MACs: each policy calibrated on validation to the same budgets
    at_budget: dict[str, list[dict[str, Any]]] = {}
    families = {}
    for name in POLICY_NAMES:
        for temp in [False, True] if name in ("confidence", "entropy", "margin") else [False]:
            label = name + ("+ts" if temp else "")
            families[label] = make_policy(name, k, val_logits=val_logits, val_labels=val_labels, temperature=temp)
            rows = []
            for frac in args.budgets:
                try:
                    res = calibrate_to_budget(
                        families[label], val_logits, val_labels, costs, frac * costs[-1],
                        test_logits=test_logits, test_labels=test_labels,
                    )  # fmt: skip
                    rows.append({"budget_fraction": frac, "test_accuracy": res.test["accuracy"],
                                 "test_macs": res.test["avg_cost"], "val_accuracy": res.val["accuracy"],
                                 "val_macs": res.val["avg_cost"], "thresholds": res.thresholds})  # fmt: skip
                except BudgetError as err:
                    rows.append({"budget_fraction": frac, "error": str(err)})
            at_budget[label] = rows

    # realised check at the middle budget: run_dynamic makes the simulated decisions for every policy
    realised_ok: dict[str, bool] = {}
    x_test = torch.stack([splits.test[i][0] for i in range(min(2000, len(splits.test)))])
    mid = len(args.budgets) // 2
    for label, family in families.items():
        row = at_budget[label][mid]
        if "thresholds" not in row:
            continue
        policy = family.with_thresholds(row["thresholds"])
        out = model.run_dynamic(x_test, policy)
        sim_exit, _ = simulate_exits(policy, test_logits[:, : len(x_test)])
        realised_ok[label] = bool(torch.equal(out.exit_index, sim_exit))

    curves = compare_policies(val_logits, val_labels, test_logits, test_labels, costs, POLICY_NAMES)
    guarantee = []
    for eps in args.epsilons:
        try:
            res = calibrate_accuracy_guarantee(
                families["confidence"], val_logits, val_labels, costs, eps, args.delta,
                test_logits=test_logits, test_labels=test_labels,
            )  # fmt: skip
            guarantee.append(
                {
                    "epsilon": eps,
                    "delta": args.delta,
                    "val_macs": res.val["avg_cost"],
                    "test_macs": res.test["avg_cost"],
                    "macs_fraction_of_last": res.test["avg_cost"] / costs[-1],
                    "test_accuracy_change": res.test["accuracy_change_vs_last_exit"],
                    "test_risk": res.test["risk"],
                    "risk_upper_bound": res.details["risk_upper_bound"],
                    "certified": res.details["certified"],
                    "candidates": res.details["candidates"],
                }
            )
        except BudgetError as err:
            guarantee.append({"epsilon": eps, "delta": args.delta, "error": str(err)})

    report = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]),
        "hardware": _hardware(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dataset": args.dataset,
        "model": args.model,
        "epochs": args.epochs,
        "seed": args.seed,
        "train_samples": len(train_set),
        "val_samples": len(val_labels),
        "test_samples": len(test_labels),
        "train_time_s_shared_cpu": train_time,
        "exit_macs": costs,
        "anytime_test_accuracy": anytime,
        "accuracy_at_budget": at_budget,
        "realised_equals_simulated": realised_ok,
        "curves": curves,
        "accuracy_guarantee": guarantee,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), report)
    plot_curves(
        {lab: macs_curve(e["curve"]) for lab, e in curves.items()},
        out.with_suffix(".png"),
        title=f"{args.dataset} {args.model}, {args.epochs} epochs: budgeted curves per policy (test)",
    )
    lines = [f"# Exit policies on {args.dataset} / {args.model} ({args.epochs} epochs, seed {args.seed})", "",
             f"Command: `{report['command']}`", "",
             "Exit MACs: " + ", ".join(f"{c / 1e6:.3f}M" for c in costs)
             + "; anytime test accuracy: " + ", ".join(f"{100 * a:.2f}%" for a in anytime), "",
             "## Test accuracy at equal average MACs (thresholds calibrated on validation to the budget)", "",
             "| policy | " + " | ".join(f"{int(100 * f)}% MACs" for f in args.budgets)
             + " | AUC | MACs saved at last-exit acc. | realised == simulated |",
             "|---|" + "---|" * (len(args.budgets) + 3)]  # fmt: skip
    for label, rows in at_budget.items():
        cells = [f"{100 * r['test_accuracy']:.2f} ({r['test_macs'] / costs[-1]:.2f})" if "test_accuracy" in r else "n/a"
                 for r in rows]  # fmt: skip
        c = curves[label]
        saved = c["macs_saved_at_last_exit_accuracy"]
        lines.append(
            f"| {label} | " + " | ".join(cells)
            + " | " + ("n/a" if c["auc"] is None else f"{100 * c['auc']:.2f}")
            + f" | {'not reached' if saved is None else f'{100 * saved:.1f}%'} | {realised_ok.get(label, 'n/a')} |"
        )  # fmt: skip
    lines += ["", "Cells: test accuracy % (test MACs / last exit's MACs). AUC: mean test accuracy of the budgeted "
              "curve over the MACs range all curves cover.", "",
              f"## Accuracy guarantee (Learn then Test, confidence rule, delta = {args.delta})", "",
              "| epsilon | certified | test MACs / last | test accuracy change | test risk | risk bound |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for g in guarantee:
        if "error" in g:
            lines.append(f"| {g['epsilon']} | none | - | - | - | {g['error'][:80]}... |")
        else:
            lines.append(
                f"| {g['epsilon']} | {g['certified']}/{g['candidates']} | {g['macs_fraction_of_last']:.3f} | "
                f"{100 * g['test_accuracy_change']:+.2f} pts | {g['test_risk']:.4f} | {g['risk_upper_bound']:.4f} |"
            )
    hw = [" ".join(x.split()) for x in report["hardware"] if x.startswith(("Model name", "CPU(s)"))]
    lines += ["", "Hardware: " + "; ".join(hw) + " (shared with other jobs; no timings are reported)"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
