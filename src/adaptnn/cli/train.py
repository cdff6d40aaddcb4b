"""Train a model; writes config.yaml, checkpoints and model.safetensors into the run directory."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ActionYesNo, ArgumentParser, Namespace

from ._shared import add_run_config, run_config_from_args, summarise_report

HELP = "Train a multi-exit model."


def build(parser: ArgumentParser) -> None:
    add_run_config(parser)
    parser.add_argument("--resume", action=ActionYesNo, default=True, help="Continue from checkpoints/last.")
    parser.add_argument("--overwrite", action=ActionYesNo, default=False, help="Start over with another config.")
    parser.add_argument("--evaluate", action=ActionYesNo, default=False, help="Calibrate and evaluate afterwards.")


def run(args: Namespace) -> None:
    from ..runs import evaluate_run, train_run

    train_run(run_config_from_args(args), args.run_dir, resume=args.resume, overwrite=args.overwrite)
    (Path(args.run_dir) / "calibration.json").unlink(missing_ok=True)  # thresholds of older weights
    if args.evaluate:
        print(summarise_report(evaluate_run(args.run_dir)))
