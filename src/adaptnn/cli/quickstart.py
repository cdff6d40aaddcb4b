"""Train, calibrate and evaluate the embedded default (digits, 4-exit CNN)."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ActionYesNo, ArgumentParser, Namespace

from ._shared import summarise_report

HELP = "Run the embedded default end to end (what `make demo` runs)."


def build(parser: ArgumentParser) -> None:
    parser.add_argument("--run_dir", type=str, default="runs/quickstart", help="Output directory.")
    parser.add_argument("--epochs", type=int | None, default=None, help="Override the number of epochs.")
    parser.add_argument(
        "--tolerance",
        type=float | None,
        default=None,
        help="Override calibration.tolerance (largest validation-accuracy loss vs the last exit).",
    )
    parser.add_argument("--fresh", action=ActionYesNo, default=False, help="Discard an earlier run in run_dir.")


def run(args: Namespace) -> None:
    from ..runs import evaluate_run, quickstart_config, train_run

    config = quickstart_config()
    if args.epochs is not None:
        config.train.epochs = args.epochs
    if args.tolerance is not None:
        config.calibration.tolerance = args.tolerance
    run_dir = Path(args.run_dir)
    train_run(config, run_dir, overwrite=args.fresh)
    (run_dir / "calibration.json").unlink(missing_ok=True)
    report = evaluate_run(run_dir)
    print(summarise_report(report))
    print(f"wrote {run_dir / 'report.json'} and {run_dir / 'report.png'}")
