"""Train a model; writes config.yaml, checkpoints and model.safetensors into the run directory."""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from pathlib import Path

from jsonargparse import ActionYesNo, ArgumentParser, Namespace

from ._shared import add_run_config, run_config_from_args, summarise_report

HELP = "Train a multi-exit model."

_started = float("inf")  # when this process's `run` began (the interrupt hint compares checkpoint times with it)


def build(parser: ArgumentParser) -> None:
    add_run_config(parser)
    parser.add_argument("--resume", action=ActionYesNo, default=True, help="Continue from checkpoints/last.")
    parser.add_argument("--overwrite", action=ActionYesNo, default=False, help="Start over with another config.")
    parser.add_argument("--evaluate", action=ActionYesNo, default=False, help="Calibrate and evaluate afterwards.")


def run(args: Namespace) -> None:
    from ..runs import evaluate_run, train_run

    global _started
    _started = time.time()
    # train_run deletes calibration.json and the report itself when it writes new weights
    train_run(run_config_from_args(args), args.run_dir, resume=args.resume, overwrite=args.overwrite)
    if args.evaluate:
        print(summarise_report(evaluate_run(args.run_dir)))


def resume_command(args: Namespace, argv: Sequence[str]) -> str:
    """``argv`` as the command that continues the run: without ``--overwrite`` and ``--no_resume``."""
    tokens = [t for t in argv if t not in ("--overwrite", "--no_resume")]
    if args.overwrite and "--overwrite" not in argv:  # set by a --config file
        tokens.append("--no_overwrite")
    if not args.resume and "--no_resume" not in argv:
        tokens.append("--resume")
    return "adaptnn " + shlex.join(tokens)


def interrupted(args: Namespace, argv: Sequence[str]) -> str:
    """What Ctrl-C left in the run directory, and the command that continues from there."""
    from ..runs.config import load_config

    run_dir = Path(args.run_dir)
    checkpoint = run_dir / "checkpoints" / "last.safetensors"
    same = f"adaptnn {shlex.join(argv)}"
    try:
        ours = load_config(run_dir / "config.yaml").to_dict() == run_config_from_args(args).to_dict()
        committed_now = checkpoint.exists() and checkpoint.stat().st_mtime >= _started
    except Exception:  # the hint must not hide the interruption behind another error
        ours = committed_now = False
    start_over = args.overwrite or not args.resume
    if ours and checkpoint.exists() and (committed_now or not start_over):
        return f"interrupted; the last checkpoint in {run_dir} is intact; resume with: {resume_command(args, argv)}"
    if start_over and (run_dir / "config.yaml").exists():
        return (
            f"interrupted before the new run's first checkpoint; {run_dir} still holds the previous run, "
            f"unchanged; to start over again: {same}"
        )
    return f"interrupted before the first checkpoint; to start again: {same}"
