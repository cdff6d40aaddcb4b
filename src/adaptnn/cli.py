"""The ``adaptnn`` command line: quickstart, train, calibrate, evaluate, cost.

Built on jsonargparse: every option of the run config is a typed flag (``--train.epochs 5``), ``--config
FILE.yaml`` reads a YAML config (unknown keys are errors), ``--print_config`` prints the resolved config
and exits. Errors caused by the user (bad config, data, checkpoint, input) print one line and exit 2.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace

from . import __version__
from .errors import AdaptnnError

__all__ = ["main", "build_parser"]

log = logging.getLogger("adaptnn")


def _add_run_config(parser: ArgumentParser) -> None:
    from .config import CalibrationConfig, EvalConfig, ModelConfig
    from .data import DataConfig
    from .train import TrainConfig

    parser.add_argument("--config", action=ActionConfigFile, help="YAML run config (see configs/).")
    parser.add_argument("--run_dir", type=str, default="runs/default", help="Output directory of the run.")
    parser.add_class_arguments(DataConfig, "data", help="Dataset and validation split.")
    parser.add_class_arguments(ModelConfig, "model", help="Registered model name and its arguments.")
    parser.add_class_arguments(TrainConfig, "train", help="Optimisation.")
    parser.add_class_arguments(CalibrationConfig, "calibration", help="Operating-point selection.")
    parser.add_class_arguments(EvalConfig, "eval", help="Evaluation.")


def build_parser() -> ArgumentParser:
    """The full parser with one subcommand per workflow."""
    parser = ArgumentParser(
        prog="adaptnn",
        description="Dynamic (early-exit) neural networks: train, calibrate, evaluate, count cost.",
        exit_on_error=True,
    )
    parser.add_argument("--version", action="version", version=f"adaptnn {__version__}")
    parser.add_argument("--log_level", type=str, default="INFO", help="Logging level.")
    commands = parser.add_subcommands(dest="command")

    quick = ArgumentParser(description="Train, calibrate and evaluate the embedded default (digits, 4-exit CNN).")
    quick.add_argument("--run_dir", type=str, default="runs/quickstart", help="Output directory.")
    quick.add_argument("--epochs", type=int | None, default=None, help="Override the number of epochs.")
    quick.add_argument(
        "--tolerance",
        type=float | None,
        default=None,
        help="Override calibration.tolerance (largest validation-accuracy loss vs the last exit).",
    )
    quick.add_argument(
        "--fresh", action=ActionYesNo, default=False, help="Discard an earlier quickstart run in run_dir."
    )
    commands.add_subcommand("quickstart", quick, help="Run the embedded default end to end.")

    train = ArgumentParser(description="Train a model; writes config.yaml, checkpoints and model.safetensors.")
    _add_run_config(train)
    train.add_argument(
        "--resume", action=ActionYesNo, default=True, help="Continue from checkpoints/last when present."
    )
    train.add_argument(
        "--overwrite", action=ActionYesNo, default=False, help="Start over in a run_dir with another config."
    )
    train.add_argument("--evaluate", action=ActionYesNo, default=False, help="Calibrate and evaluate after training.")
    commands.add_subcommand("train", train, help="Train a multi-exit model.")

    calibrate = ArgumentParser(description="Fit exit thresholds on the validation split (budgeted-batch sweep).")
    calibrate.add_argument("run_dir", type=str, help="A trained run directory.")
    calibrate.add_argument(
        "--tolerance",
        type=float | None,
        default=None,
        help="Largest validation-accuracy loss vs the last exit (fraction; default from config).",
    )
    commands.add_subcommand("calibrate", calibrate, help="Calibrate exit thresholds.")

    evaluate = ArgumentParser(description="Anytime, budgeted and realised evaluation; writes report.json/png.")
    evaluate.add_argument("run_dir", type=str, help="A trained run directory.")
    commands.add_subcommand("evaluate", evaluate, help="Evaluate a run.")

    cost = ArgumentParser(description="Per-exit MACs and parameters of a registered model.")
    cost.add_argument("model", type=str, help="Registered model name (see `adaptnn cost --list`).")
    cost.add_argument(
        "--input_size",
        type=list[int] | None,
        default=None,
        help="One sample's shape, e.g. [3,32,32]; default: the model's own.",
    )
    cost.add_argument("--kwargs", type=dict | None, default=None, help="Model arguments, e.g. '{num_classes: 100}'.")
    cost.add_argument("--json", action=ActionYesNo, default=False, help="Print JSON instead of a table.")
    commands.add_subcommand("cost", cost, help="Count per-exit MACs.")

    models = ArgumentParser(description="List registered models.")
    models.add_argument("--pattern", type=str, default="*", help="fnmatch filter.")
    commands.add_subcommand("models", models, help="List registered models.")
    return parser


def _run_config(args: Namespace):
    from .config import RunConfig

    return RunConfig.from_dict(
        {
            "data": args.data.as_dict() if hasattr(args.data, "as_dict") else dict(args.data),
            "model": args.model.as_dict(),
            "train": args.train.as_dict(),
            "calibration": args.calibration.as_dict(),
            "eval": args.eval.as_dict(),
        }
    )


def _summary(report: dict) -> str:
    op = report["operating_point"]
    real, sim = op["realised"], op["simulated"]
    last = report["anytime"][-1]
    lines = ["exit  MACs(M)  accuracy"]
    lines += [f"{a['exit']:>4}  {a['macs'] / 1e6:7.3f}  {100 * a['accuracy']:7.2f}%" for a in report["anytime"]]
    lines.append(
        f"operating point p={op['p']}: realised accuracy {100 * real['accuracy']:.2f}% "
        f"(last exit {100 * last['accuracy']:.2f}%), avg MACs {real['avg_macs'] / 1e6:.3f}M "
        f"= {op['macs_reduction_vs_last_exit']:.2f}x fewer than the last exit"
    )
    lines.append(
        f"simulated: accuracy {100 * sim['accuracy']:.2f}%, avg MACs {sim['avg_macs'] / 1e6:.3f}M; "
        "realised == simulated: "
        f"{op['realised_equals_simulated']}"
    )
    lines.append(
        f"wall time on {real['device']} (batch {real['batch_size']}): dynamic {real['wall_time_s']:.3f}s vs full model "
        f"{real['full_model_wall_time_s']:.3f}s ({real['speedup']:.2f}x)"
    )
    lines.append(f"exit fractions: {[round(f, 3) for f in real['exit_fractions']]}")
    return "\n".join(lines)


def _cmd_quickstart(args: Namespace) -> None:
    from .runs import evaluate_run, quickstart_config, train_run

    config = quickstart_config()
    if args.epochs is not None:
        config.train.epochs = args.epochs
    if args.tolerance is not None:
        config.calibration.tolerance = args.tolerance
    run_dir = Path(args.run_dir)
    train_run(config, run_dir, overwrite=args.fresh)
    for stale in ("calibration.json",):
        (run_dir / stale).unlink(missing_ok=True)
    report = evaluate_run(run_dir)
    print(_summary(report))
    print(f"wrote {run_dir / 'report.json'} and {run_dir / 'report.png'}")


def _cmd_train(args: Namespace) -> None:
    from .runs import evaluate_run, train_run

    config = _run_config(args)
    train_run(config, args.run_dir, resume=args.resume, overwrite=args.overwrite)
    (Path(args.run_dir) / "calibration.json").unlink(missing_ok=True)
    if args.evaluate:
        print(_summary(evaluate_run(args.run_dir)))


def _cmd_calibrate(args: Namespace) -> None:
    from .runs import calibrate_run

    calibration = calibrate_run(args.run_dir, tolerance=args.tolerance)
    point = calibration["operating_point"]
    print(
        f"operating point p={point['p']}: thresholds {point['thresholds']}, validation accuracy "
        f"{100 * point['val_accuracy']:.2f}% (last exit {100 * calibration['last_exit_val_accuracy']:.2f}%), "
        f"validation avg MACs {point['val_avg_cost'] / 1e6:.3f}M"
    )
    print(f"wrote {Path(args.run_dir) / 'calibration.json'}")


def _cmd_evaluate(args: Namespace) -> None:
    from .runs import evaluate_run

    print(_summary(evaluate_run(args.run_dir)))
    print(f"wrote {Path(args.run_dir) / 'report.json'} and {Path(args.run_dir) / 'report.png'}")


def _cmd_cost(args: Namespace) -> None:
    from .cost import cost_breakdown
    from .errors import ConfigError
    from .models import create_model

    model = create_model(args.model, **(args.kwargs or {}))
    input_size = args.input_size
    if input_size is None:
        if model.input_spec is None or any(s is None for s in model.input_spec.shape):
            raise ConfigError(f"model {args.model!r} has no fixed input size; pass --input_size")
        input_size = list(model.input_spec.shape)
    breakdown = cost_breakdown(model, input_size)
    if args.json:
        print(json.dumps({"model": args.model, **breakdown.to_dict()}, indent=2))
        return
    print(f"{args.model}, one sample of shape {list(breakdown.input_size)} (MACs: conv + matmul; see adaptnn.cost)")
    print(f"{'exit':>4} {'segment MACs':>14} {'head MACs':>11} {'cumulative MACs':>16} {'share':>7} {'params':>10}")
    total = breakdown.exit_macs[-1]
    for k, seg_idx in enumerate(model.exit_after):
        first = model.exit_after[k - 1] + 1 if k else 0
        seg = sum(breakdown.segment_macs[first : seg_idx + 1])
        print(
            f"{k:>4} {seg:>14,.0f} {breakdown.head_macs[k]:>11,.0f} {breakdown.exit_macs[k]:>16,.0f} "
            f"{100 * breakdown.exit_macs[k] / total:>6.1f}% {breakdown.exit_params[k]:>10,}"
        )


def _cmd_models(args: Namespace) -> None:
    from .models import list_models

    print("\n".join(list_models(args.pattern)))


_COMMANDS = {
    "quickstart": _cmd_quickstart,
    "train": _cmd_train,
    "calibrate": _cmd_calibrate,
    "evaluate": _cmd_evaluate,
    "cost": _cmd_cost,
    "models": _cmd_models,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; ``argv`` lets tests run the CLI in-process. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        _COMMANDS[args.command](args[args.command])
    except AdaptnnError as err:
        print(f"adaptnn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact (resume with the same command)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
