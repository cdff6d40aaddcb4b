"""Anytime, budgeted and realised evaluation of a run; writes report.json and report.png."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from ._shared import summarise_report

HELP = "Evaluate a run."


def build(parser: ArgumentParser) -> None:
    parser.add_argument("run_dir", type=str, help="A trained run directory.")


def run(args: Namespace) -> None:
    from ..runs import evaluate_run

    print(summarise_report(evaluate_run(args.run_dir)))
    print(f"wrote {Path(args.run_dir) / 'report.json'} and {Path(args.run_dir) / 'report.png'}")
