"""``adaptnn calibrate --knob ... --budget_ms``: predicted vs measured latency of the jointly chosen knob + exits, CPU.

For each trained run and knob (a token ViT with ToMe / EViT, an elastic run with its members) and each batch size,
the run is copied (the original stays read-only) and calibrated with :func:`adaptnn.runs.calibrate_run` exactly as
``adaptnn calibrate RUN --knob K --budget_ms X --latency_batch_size B --threads 1`` does:

1. an unconstrained budget (the most accurate setting and thresholds), then budgets at ``--fractions`` of the
   default setting's last-exit latency (no token reduction / the largest member, as profiled by the calibrator);
2. each choice is run for real (``run_dynamic``, ``--measure_samples`` test images, batches of B, median of 5
   timed calls per batch) and compared with the prediction the budget was held to (``latency_check``); as in the
   CLI, the choice is then re-made once from the profiles re-anchored to that check's drift and checked again
   (the table's error is the second check's, ``first`` the first's; ``--no_refit``: one choice, one check);
3. the last choice of each run is evaluated (``adaptnn evaluate``): realised == simulated decisions, test accuracy.

Hardware, thread count and the load average (before and after every calibration) are recorded.

    python benchmarks/calibrate_knobs.py --vit_run /tmp/vitrun/vit_fmnist --elastic_run runs/elastic_fmnist
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from adaptnn.errors import BudgetError
from adaptnn.io import write_json
from adaptnn.measure.timing import machine_info
from adaptnn.runs import calibrate_run, evaluate_run
from adaptnn.runs.calibrate import KnobTiming

RESULTS = Path(__file__).resolve().parent / "results"


def _row(name: str, knob: str, b: int, budget: float, cal: dict[str, Any], load: tuple, wall: float) -> dict:
    c, check = cal["calibrator"], cal.get("latency_check", {})
    refit = check.get("refit") or {}
    return {
        "run": name,
        "knob": knob,
        "batch_size": b,
        "budget_ms_per_sample": budget,
        "chosen": cal["knob"]["label"],
        "thresholds": cal["operating_point"]["thresholds"],
        "val_accuracy": cal["operating_point"]["val_accuracy"],
        "val_avg_macs": cal["operating_point"]["val_avg_macs"],
        "predicted_val_ms_per_sample": c["val"]["avg_latency_ms"],
        "prediction": check.get("prediction", "linear"),
        "predicted_ms_per_batch": check.get("predicted_ms_per_batch"),
        "measured_ms_per_batch": check.get("measured_ms_per_batch"),
        "error": check.get("error"),
        "latency_model_error": check.get("latency_model_error"),
        "linear_error": check.get("linear_error", check.get("error")),
        "drift": check.get("drift"),
        "error_drift_corrected": check.get("error_drift_corrected"),
        "test_exit_fractions": check.get("exit_fractions"),
        # the first check, before the choice was re-made at the speed it measured (KnobTiming.refit)
        "refit_factor": refit.get("factor"),
        "first_choice": refit.get("first_choice"),
        "first_error": refit.get("first_check", {}).get("error"),
        "refit_infeasible": refit.get("infeasible"),
        "per_knob": c["per_knob"],
        "load_before": load[0],
        "load_after": os.getloadavg()[0],
        "wall_s": wall,
    }


def bench_run(name: str, src: Path, knob: str, values: list | None, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work) / name
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(src, work)
    timing = KnobTiming(
        repeats=args.latency_repeats, threads=args.threads, measure_samples=args.measure_samples, rounds=5,
        refit=args.refit,
    )  # fmt: skip
    rows, settings = [], {}
    for b in args.batch_sizes:
        budgets: list[float] = [1e6]
        i = 0
        while i < len(budgets):
            load, t0 = os.getloadavg(), time.perf_counter()
            try:
                cal = calibrate_run(
                    work, knob=knob, knob_values=values, budget_ms=budgets[i], latency_batch_size=b, timing=timing,
                    progress=False,
                )  # fmt: skip
            except BudgetError as err:  # the budget came from an earlier profile; the load may have moved since
                print(f"{name} {knob} b={b} budget {budgets[i]:.4g} ms/sample: {err}", flush=True)
                rows.append({"run": name, "knob": knob, "batch_size": b, "budget_ms_per_sample": budgets[i],
                             "infeasible": str(err), "load_before": load[0]})  # fmt: skip
                i += 1
                continue
            rows.append(_row(name, knob, b, budgets[i], cal, load, time.perf_counter() - t0))
            r = rows[-1]
            print(
                f"{name} {knob} b={b} budget {budgets[i]:.4g} ms/sample -> {r['chosen']} val acc "
                f"{100 * r['val_accuracy']:.2f}%: predicted {r['predicted_ms_per_batch']:.3f} ms, measured "
                f"{r['measured_ms_per_batch']:.3f} ms per batch ({100 * r['error']:+.1f}%), load {load[0]:.2f}",
                flush=True,
            )
            if i == 0:
                settings[b] = cal["calibrator"]["settings"]
                full = settings[b][0]["exit_latency_ms"][-1]
                budgets += [f * full for f in args.fractions]
            i += 1
    report = evaluate_run(work, progress=False, policies=[])
    op = report["operating_point"]
    return {
        "rows": rows,
        "settings": {str(b): s for b, s in settings.items()},
        "evaluate": {
            "chosen": report.get("knob", {}).get("label"),
            "realised_equals_simulated": op["realised_equals_simulated"],
            "test_accuracy": op["realised"]["accuracy"],
            "test_avg_macs": op["realised"]["avg_macs"],
            "last_exit_test_accuracy": report["anytime"][-1]["accuracy"],
        },
    }


def _first(row: dict[str, Any]) -> str:
    """The first check's error (and the first choice when the re-fit changed it), or "-" without re-fitting."""
    if row.get("first_error") is None:
        return "-"
    text = f"{100 * row['first_error']:+.1f}%"
    if row.get("refit_infeasible"):
        return text + " (nothing fits now: kept)"
    return text if row.get("first_choice") == row["chosen"] else f"{text} ({row['first_choice']})"


def to_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# `adaptnn calibrate --knob ... --budget_ms`: predicted vs measured (CPU)",
        "",
        f"{m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']}, threads {report['threads']}; load average "
        f"{report['load_start']:.2f} at the start, {report['load_end']:.2f} at the end (a shared machine).",
        f"Command: `{report['command']}`",
        "",
        "Budget in ms per sample at the batch size; `pred`/`meas` are ms per batch of the chosen knob + thresholds "
        "on held-out test images (`run_dynamic`, median of 5 calls per batch); error = pred/meas - 1 of the "
        "prediction the calibrator held the budget to (at batch > 1: the latency model of each batch's exit counts, "
        "`LM`; at batch 1 both are the exits' measured latencies); linear = the per-sample average of the exits' "
        "latencies (what the calibrator used before it re-fitted to the LM at batch > 1); drift = the deployed model's "
        "last-exit `run_dynamic` now / when profiled (same batch size; the load of a shared machine moves between "
        "the two), and the drift-corrected error scales the prediction by it. With re-fitting (the default, "
        "`KnobTiming.refit`) that check is the *first* one: the choice is re-made once from the profiles scaled by "
        "its drift and checked again, and the table's prediction, error and drift are the second check's; "
        "`first` is the first check's error (and the first choice when it differed).",
        "",
        "| run | knob | batch | budget ms/sample | chosen | val acc | pred ms | meas ms | error | LM error "
        "| linear error | drift | error, drift-corrected | first | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for part in report["runs"].values():
        for r in part["rows"]:
            if "infeasible" in r:
                lines.append(f"| {r['run']} | {r['knob']} | {r['batch_size']} | {r['budget_ms_per_sample']:.4g} | "
                             f"infeasible now: {r['infeasible'][:90]} ||||||||| {r['load_before']:.1f} |")  # fmt: skip
                continue
            budget = "none" if r["budget_ms_per_sample"] >= 1e6 else f"{r['budget_ms_per_sample']:.4g}"
            lines.append(
                f"| {r['run']} | {r['knob']} | {r['batch_size']} | {budget} | {r['chosen']} | "
                f"{100 * r['val_accuracy']:.2f}% | {r['predicted_ms_per_batch']:.3f} | "
                f"{r['measured_ms_per_batch']:.3f} | "
                f"{100 * r['error']:+.1f}% | {100 * r['latency_model_error']:+.1f}% | "
                f"{100 * r['linear_error']:+.1f}% | {r['drift']:.2f} | "
                f"{100 * r['error_drift_corrected']:+.1f}% | {_first(r)} | {r['load_before']:.1f} |"
            )
    lines += ["", "Per-setting last-exit latency (ms/sample, measured in the engine) and validation accuracy:", ""]
    for name, part in report["runs"].items():
        for b, settings in part["settings"].items():
            cells = ", ".join(
                f"{s['knob']} {s['exit_latency_ms'][-1]:.4g} ms / {100 * s['last_exit_val_accuracy']:.2f}%"
                for s in settings
            )
            lines.append(f"- {name}, batch {b}: {cells}")
    lines += ["", "`adaptnn evaluate` of the last choice of each run:", ""]
    for name, part in report["runs"].items():
        e = part["evaluate"]
        lines.append(
            f"- {name}: {e['chosen']}, realised == simulated: {e['realised_equals_simulated']}, test accuracy "
            f"{100 * e['test_accuracy']:.2f}% (last exit {100 * e['last_exit_test_accuracy']:.2f}%), "
            f"{e['test_avg_macs'] / 1e6:.3f} M MACs"
        )
    rows = [r for p in report["runs"].values() for r in p["rows"] if r.get("error") is not None]
    errors = [abs(r["error"]) for r in rows]
    fixed = [abs(r["error_drift_corrected"]) for r in rows]
    firsts = [abs(r["first_error"]) for r in rows if r.get("first_error") is not None]
    within = sum(e <= 0.10 for e in errors)
    lines += [
        "",
        f"Largest |error|: {100 * max(errors):.1f}% raw ({within} of {len(errors)} within 10%), "
        f"{100 * max(fixed):.1f}% drift-corrected, over {len(errors)} choices (target: within 10%)"
        + (
            f"; first checks (before re-fitting): largest {100 * max(firsts):.1f}%, "
            f"{sum(e <= 0.10 for e in firsts)} of {len(firsts)} within 10%."
            if firsts
            else "."
        ),
    ]
    return "\n".join(lines) + "\n"


def plot(reports: list[dict[str, Any]], path: Path) -> None:
    """Every choice's prediction error (final check filled, first check hollow) with the +-10% target band, a panel
    per batch size; several reports (repeated runs) are drawn side by side, one colour per run."""
    import io

    from matplotlib.figure import Figure

    from adaptnn.io import atomic_write_bytes

    rows = [
        (i, r) for i, rep in enumerate(reports) for run in rep["runs"].values() for r in run["rows"] if "error" in r
    ]
    sizes = sorted({r["batch_size"] for _, r in rows})
    fig = Figure(figsize=(5 * max(1, len(sizes)), 4))
    axes = fig.subplots(1, max(1, len(sizes)), squeeze=False)[0]
    names = sorted({r["run"] for _, r in rows})
    for ax, size in zip(axes, sizes, strict=False):
        sel = [(i, r) for i, r in rows if r["batch_size"] == size]
        ax.axhspan(-10, 10, color="green", alpha=0.08, label="target: within 10%")
        ax.axhline(0, color="k", lw=0.5)
        for rep in range(len(reports)):
            xs = [x for x, (i, _) in enumerate(sel) if i == rep]
            pts = [r for i, r in sel if i == rep]
            ax.plot(xs, [100 * r["error"] for r in pts], "o", color=f"C{rep}", label=f"run {rep + 1}: final check")
            first = [(x, r["first_error"]) for x, r in zip(xs, pts, strict=True) if r.get("first_error") is not None]
            if first:
                ax.plot([x for x, _ in first], [100 * e for _, e in first], "o", mfc="none", color=f"C{rep}", ms=7,
                        label=f"run {rep + 1}: first check")  # fmt: skip
        ticks = [x for x, (_, r) in enumerate(sel) if x == 0 or sel[x - 1][1]["run"] != r["run"]]
        ax.set_xticks(ticks, [sel[x][1]["run"] for x in ticks], fontsize=7)
        worst = max([12.0] + [100 * abs(r.get(key) or 0.0) + 2 for _, r in sel for key in ("error", "first_error")])
        ax.set_ylim(-worst, worst)
        ax.set_ylabel("predicted / measured - 1 (%)")
        ax.set_title(f"batch {size}: {sum(abs(r['error']) <= 0.10 for _, r in sel)} of {len(sel)} within 10%")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, loc="lower left")
    fig.suptitle(f"calibrate --budget_ms, {len(names)} runs x knobs, {len(reports)} repetition(s)", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


def read_results(path: Path) -> dict[str, Any]:
    """A saved result of this benchmark (for ``--replot``), or a one-line exit naming what is wrong with it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"--replot {path}: cannot read it as JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
        raise SystemExit(f"--replot {path}: not a calibrate_knobs result (expected an object with 'runs')")
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vit_run", default=None, help="a trained token-ViT run (e.g. vit_tiny_conv_fmnist)")
    parser.add_argument("--vit_knobs", default="tome:2,4,6,8;evit:0.9,0.7,0.5", help="knob:values;...")
    parser.add_argument("--elastic_run", default=None, help="a trained elastic run (strategy sorted)")
    parser.add_argument("--work", default="/tmp/calibrate_knobs", help="where the runs are copied to")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.8, 0.6], help="budgets vs default latency")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--latency_repeats", type=int, default=10)
    parser.add_argument(
        "--no_refit", dest="refit", action="store_false", help="one choice, one check (no re-anchoring to the check)"
    )
    parser.add_argument("--measure_samples", type=int, default=384)
    parser.add_argument("--out", default=str(RESULTS / "calibrate_knobs_cpu"))
    parser.add_argument(
        "--replot", type=Path, nargs="+", default=None, help="only draw OUT.png from these saved results (repeats)"
    )
    args = parser.parse_args(argv)
    if args.replot:
        plot([read_results(path) for path in args.replot], Path(args.out).with_suffix(".png"))
        return
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "machine": machine_info(),
        "threads": args.threads,
        "load_start": os.getloadavg()[0],
        "command": "python benchmarks/calibrate_knobs.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "runs": {},
    }
    jobs = []
    if args.vit_run:
        for spec in args.vit_knobs.split(";"):
            knob, values = spec.split(":")
            jobs.append((f"vit_{knob}", Path(args.vit_run), knob, [float(v) for v in values.split(",")]))
    if args.elastic_run:
        jobs.append(("elastic", Path(args.elastic_run), "variant", None))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, src, knob, values in jobs:  # saved after every run: a long benchmark keeps what it measured
        report["runs"][name] = bench_run(name, src, knob, values, args)
        report["load_end"] = os.getloadavg()[0]
        write_json(out.with_suffix(".json"), report)
        text = to_markdown(report)
        out.with_suffix(".md").write_text(text)
        plot([report], out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
