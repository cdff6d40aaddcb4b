"""Overlay several runs (and the policies of each) in one accuracy-vs-MACs plot and one table."""

from __future__ import annotations

import json
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from ..errors import DataError

HELP = "Compare evaluated runs and policies."


def build(parser: ArgumentParser) -> None:
    parser.add_argument("runs", type=str, nargs="+", help="Evaluated run directories (each with report.json).")
    parser.add_argument("--out", type=str, default="runs/compare", help="Where compare.json/compare.png go.")
    parser.add_argument(
        "--policies", type=bool, default=True, help="Also overlay each run's per-policy curves (report 'policies')."
    )


def _label(run: Path, used: set[str]) -> str:
    label = run.name or str(run)
    while label in used:
        label = f"{run.parent.name}/{label}"
    return label


def run(args: Namespace) -> None:
    from ..evaluation import curve_table, macs_curve, plot_curves
    from ..io import write_json

    curves: dict[str, tuple[list[float], list[float]]] = {}
    last_exit: dict[str, tuple[float, float]] = {}
    used: set[str] = set()
    for run_dir in args.runs:
        path = Path(run_dir) / "report.json"
        if not path.exists():
            raise DataError(f"{path} not found: evaluate the run first (adaptnn evaluate {run_dir})")
        report = json.loads(path.read_text())
        name = _label(Path(run_dir), used)
        used.add(name)
        last = report["anytime"][-1]
        curves[name] = macs_curve(report["budgeted"])
        last_exit[name] = (last["macs"], last["accuracy"])
        if args.policies:
            for label, entry in (report.get("policies") or {}).items():
                key = f"{name}:{label}"
                curves[key] = macs_curve(entry["curve"])
                last_exit[key] = (last["macs"], last["accuracy"])
    table = curve_table(curves, last_exit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", {"runs": list(args.runs), "table": table, "curves": curves})
    plot_curves(curves, out / "compare.png", title="test accuracy vs average MACs")
    rng = table[0]["auc_range"] if table else None
    print(
        "curve                              AUC     MACs@last-exit-acc  saved"
        + (f"   (AUC over {rng[0] / 1e6:.3f}-{rng[1] / 1e6:.3f}M MACs)" if rng else "   (curves do not overlap)")
    )
    for row in table:
        at = row["macs_at_last_exit_accuracy"]
        saved = row["macs_saved_at_last_exit_accuracy"]
        print(
            f"{row['label']:<34} "
            + (f"{100 * row['auc']:6.2f}%" if row["auc"] is not None else "   n/a ")
            + (f"  {at / 1e6:12.3f}M      {100 * saved:5.1f}%" if at is not None else "   not reached")
        )
    print(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")
