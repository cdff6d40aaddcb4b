"""Anytime, budgeted and realised evaluation of a run (and a policy comparison); writes report.json and report.png."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from ._shared import add_run_access, run_access, summarise_report

HELP = "Evaluate a run."


def build(parser: ArgumentParser) -> None:
    from ..policies import POLICY_NAMES

    parser.add_argument("run_dir", type=str, help="A trained run directory.")
    parser.add_argument(
        "--policies",
        type=list[str],
        default=list(POLICY_NAMES),
        help="Policy families whose budgeted curves are compared in the report ([] to skip).",
    )
    add_run_access(parser)


def run(args: Namespace) -> None:
    from ..runs import evaluate_run

    report = evaluate_run(args.run_dir, policies=args.policies, **run_access(args))
    print(summarise_report(report))
    for label, entry in (report.get("policies") or {}).items():
        saved = entry["macs_saved_at_last_exit_accuracy"]
        print(
            f"  {label:<14} AUC "
            + ("n/a   " if entry["auc"] is None else f"{100 * entry['auc']:.2f}%")
            + "  MACs saved at last-exit accuracy: "
            + ("not reached" if saved is None else f"{100 * saved:.1f}%")
        )
    print(f"wrote {Path(args.run_dir) / 'report.json'} and {Path(args.run_dir) / 'report.png'}")
