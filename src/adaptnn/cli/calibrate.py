"""Fit exit thresholds on the validation split and choose the operating point (budget, latency or guarantee)."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from jsonargparse import ActionYesNo, ArgumentParser, Namespace

from ._shared import add_run_access, run_access

HELP = "Calibrate exit thresholds."


def build(parser: ArgumentParser) -> None:
    from ..policies import POLICY_NAMES

    parser.add_argument("run_dir", type=str, help="A trained run directory.")
    parser.add_argument(
        "--tolerance",
        type=float | None,
        default=None,
        help="Largest validation-accuracy loss vs the last exit (fraction; default from the run's config).",
    )
    parser.add_argument(
        "--policy",
        type=str | None,
        default=None,
        help=f"Exit rule: one of {list(POLICY_NAMES)} (default: the training strategy's, e.g. boosted for boost).",
    )
    parser.add_argument("--temperature", action=ActionYesNo, default=False, help="Per-exit temperature scaling.")
    parser.add_argument("--budget_macs", type=float | None, default=None, help="Target average MACs per sample.")
    parser.add_argument("--budget_ms", type=float | None, default=None, help="Target average latency (ms/sample).")
    parser.add_argument(
        "--exit_latency_ms",
        type=list[float] | None,
        default=None,
        help="Cumulative latency to reach each exit (ms per sample) for --budget_ms; default: from the run's "
        "latency_profile.json (`adaptnn profile RUN_DIR`).",
    )
    parser.add_argument("--latency_batch_size", type=int, default=1, help="Batch size the latencies were measured at.")
    parser.add_argument(
        "--epsilon", type=float | None, default=None, help="Guarantee: accuracy drop vs the last exit <= epsilon..."
    )
    parser.add_argument("--delta", type=float, default=0.1, help="...with probability >= 1 - delta (Learn then Test).")
    parser.add_argument(
        "--legacy",
        action=ActionYesNo,
        default=False,
        help="Reference-code protocol: validation read with training augmentation, flat (envelope) test curve.",
    )
    add_run_access(parser)


def run(args: Namespace) -> None:
    from ..runs import calibrate_run

    calibration = calibrate_run(
        args.run_dir,
        tolerance=args.tolerance,
        policy=args.policy,
        temperature=args.temperature,
        budget_macs=args.budget_macs,
        budget_ms=args.budget_ms,
        exit_latency_ms=args.exit_latency_ms,
        latency_batch_size=args.latency_batch_size,
        epsilon=args.epsilon,
        delta=args.delta,
        legacy=args.legacy,
        **run_access(args),
    )
    point = calibration["operating_point"]
    method = calibration["calibrator"]["method"]
    print(
        f"operating point ({calibration['policy']}, {method}): thresholds "
        f"{[round(t, 4) if t is not None else None for t in point['thresholds']]}, validation accuracy "
        f"{100 * point['val_accuracy']:.2f}% (last exit {100 * calibration['last_exit_val_accuracy']:.2f}%), "
        f"validation avg MACs {point['val_avg_macs'] / 1e6:.3f}M"
    )
    if method == "accuracy_guarantee":
        cal = calibration["calibrator"]
        print(
            f"certified: accuracy drop <= {cal['epsilon']} with probability >= {1 - cal['delta']:.3f} "
            f"({cal['certified']}/{cal['candidates']} candidates certified on {cal['n_test']} samples)"
        )
    print(f"wrote {Path(args.run_dir) / 'calibration.json'}")


def interrupted(args: Namespace, argv: Sequence[str]) -> str:
    """Ctrl-C: calibration.json is written in one step, so it is the previous one (or absent)."""
    path = Path(args.run_dir) / "calibration.json"
    state = "unchanged" if path.exists() else "not written"
    return f"interrupted; {path} is {state}; run again with: adaptnn {shlex.join(argv)}"
