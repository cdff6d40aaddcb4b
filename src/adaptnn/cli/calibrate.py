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
    parser.add_argument(
        "--latency_batch_size",
        type=int,
        default=1,
        help="Batch size the ms budget is for (> 1: held to the latency of mixed-exit batches).",
    )
    parser.add_argument(
        "--knob",
        type=str,
        default="none",
        help="Deployment knob chosen jointly with the exit thresholds for --budget_macs/--budget_ms: none, tome "
        "(ToMe r) or evit (keep rate) on token ViTs (no reduction always competes), variant on elastic runs.",
    )
    parser.add_argument(
        "--knob_values",
        type=list[float | str] | None,
        default=None,
        help="Values to try: ToMe r (default [2,4,6,8]), EViT keep rates ([0.9,0.7,0.5]), variant names "
        "(w0.5_d2; default every member of the checkpoint).",
    )
    parser.add_argument("--threads", type=int | None, default=None, help="torch threads while timing (--knob).")
    parser.add_argument(
        "--latency_repeats", type=int, default=10, help="Timed passes per piece of each setting's profile (--knob)."
    )
    parser.add_argument(
        "--measure_samples",
        type=int,
        default=512,
        help="Test inputs run for real to report predicted vs measured ms of the choice (--knob, ms; 0: skip).",
    )
    parser.add_argument(
        "--refit",
        action=ActionYesNo,
        default=True,
        help="After the check, re-make the choice once from profiles re-anchored to the speed it measured, and "
        "check again (--knob, ms; --no_refit: one choice, one check).",
    )
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
    from ..errors import ConfigError
    from ..runs import calibrate_run
    from ..runs.calibrate import KnobTiming
    from ..runs.knobs import KNOBS

    if args.knob not in KNOBS:
        raise ConfigError(f"--knob must be one of {list(KNOBS)}, got {args.knob!r}")
    if args.latency_repeats < 1 or args.measure_samples < 0:
        raise ConfigError(
            f"--latency_repeats must be >= 1 and --measure_samples >= 0; got {args.latency_repeats}, "
            f"{args.measure_samples}"
        )
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
        knob=args.knob,
        knob_values=args.knob_values,
        timing=KnobTiming(
            repeats=args.latency_repeats,
            threads=args.threads,
            measure_samples=args.measure_samples,
            refit=args.refit,
        ),
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
    if "knob" in calibration:
        print(knob_summary(calibration))
    print(f"wrote {Path(args.run_dir) / 'calibration.json'}")


def knob_summary(calibration: dict) -> str:
    """The chosen knob setting, every setting's best point, and for ms budgets predicted vs measured ms."""
    cal = calibration["calibrator"]
    ms = "latency_batch_size" in cal
    word = "avg_latency_ms" if ms else "avg_macs"
    scale, unit = (1.0, "ms/sample") if ms else (1e-6, "M MACs")
    per = ", ".join(
        f"{p['knob']} {100 * p['accuracy']:.2f}% at {scale * p[word]:.4g}" if "accuracy" in p else f"{p['knob']} -"
        for p in cal["per_knob"]
    )
    lines = [f"knob {cal['knob']}: chose {calibration['knob']['label']} (best per setting, {unit}: {per})"]
    check = calibration.get("latency_check")
    if check:
        lines.append(
            f"batch {check['batch_size']}: predicted {check['predicted_ms_per_batch']:.3f} ms, measured "
            f"{check['measured_ms_per_batch']:.3f} ms per batch ({100 * check['error']:+.1f}%; latency model with "
            f"the exit counts {100 * check['latency_model_error']:+.1f}%) on {check['samples']} test samples"
            + (
                ""
                if check.get("drift") is None
                else f"; the machine is {check['drift']:.2f}x as slow as when profiled: "
                f"{100 * check['error_drift_corrected']:+.1f}% corrected"
            )
        )
    refit = (check or {}).get("refit")
    if refit:
        first = refit["first_check"]
        lines.append(
            f"first check {100 * first['error']:+.1f}% ({refit['first_choice']}, machine {refit['factor']:.2f}x "
            "as slow as profiled): "
            + (
                f"nothing fits at that speed ({refit['infeasible']}); the first choice stays"
                if "infeasible" in refit
                else "the choice above was re-made from profiles re-anchored to it"
            )
        )
    return "\n".join(lines)


def interrupted(args: Namespace, argv: Sequence[str]) -> str:
    """Ctrl-C: calibration.json is written in one step, so it is the previous one (or absent)."""
    path = Path(args.run_dir) / "calibration.json"
    state = "unchanged" if path.exists() else "not written"
    return f"interrupted; {path} is {state}; run again with: adaptnn {shlex.join(argv)}"
