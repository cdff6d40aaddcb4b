"""Fit exit thresholds on the validation split (budgeted-batch sweep) and choose the operating point."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

HELP = "Calibrate exit thresholds."


def build(parser: ArgumentParser) -> None:
    parser.add_argument("run_dir", type=str, help="A trained run directory.")
    parser.add_argument(
        "--tolerance",
        type=float | None,
        default=None,
        help="Largest validation-accuracy loss vs the last exit (fraction; default from the run's config).",
    )


def run(args: Namespace) -> None:
    from ..runs import calibrate_run

    calibration = calibrate_run(args.run_dir, tolerance=args.tolerance)
    point = calibration["operating_point"]
    print(
        f"operating point p={point['p']}: thresholds {point['thresholds']}, validation accuracy "
        f"{100 * point['val_accuracy']:.2f}% (last exit {100 * calibration['last_exit_val_accuracy']:.2f}%), "
        f"validation avg MACs {point['val_avg_cost'] / 1e6:.3f}M"
    )
    print(f"wrote {Path(args.run_dir) / 'calibration.json'}")
