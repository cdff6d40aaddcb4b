"""Measure per-segment/head latency on this device and fit the latency model of a staged model."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from ._shared import add_run_access, run_access

HELP = "Profile latencies and fit/validate the latency model."


def build(parser: ArgumentParser) -> None:
    parser.add_argument("target", type=str, help="A trained run directory or a registered model name.")
    parser.add_argument(
        "--batch_sizes", type=list[int], default=[1, 2, 4, 8, 12, 16, 24, 32, 48, 64], help="Profiled sizes."
    )
    parser.add_argument(
        "--validate_batch_sizes", type=list[int], default=[3, 20, 40], help="Held-out sizes to check predictions on."
    )
    parser.add_argument("--budget", type=float, default=0.5, help="MACs fraction of the held-out dynamic runs.")
    parser.add_argument("--repeats", type=int, default=20, help="Timed calls per piece (median).")
    parser.add_argument("--threads", type=int | None, default=None, help="CPU threads to pin.")
    parser.add_argument("--device", type=str, default="cpu", help="cpu or cuda.")
    parser.add_argument("--num_samples", type=int, default=192, help="Input pool size.")
    parser.add_argument("--input_size", type=list[int] | None, default=None, help="Sample shape for model names.")
    parser.add_argument("--kwargs", type=dict | None, default=None, help="Model arguments for model names.")
    parser.add_argument(
        "--output", type=str | None, default=None, help="Profile path (default: RUN/latency_profile.json)."
    )
    add_run_access(parser)


def run(args: Namespace) -> None:
    from ..errors import ConfigError
    from ..io import RunLock
    from ..measure.latency import profile_latency, validate_latency_model
    from ..measure.speed import check_bench_options, thresholds_for_macs_fraction
    from ..policies import ConfidencePolicy
    from ..runs.targets import resolve_target
    from ..training import resolve_device

    check_bench_options(args.batch_sizes, num_threads=args.threads)
    check_bench_options(args.validate_batch_sizes, name="validate_batch_sizes")
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    if not 0 < args.budget <= 1.5:
        raise ConfigError(f"--budget must be a MACs fraction in (0, 1.5], got {args.budget}")
    target = resolve_target(
        args.target,
        num_samples=args.num_samples,
        input_size=args.input_size,
        model_kwargs=args.kwargs,
        **run_access(args),
    )
    device = resolve_device(args.device)
    latency_model = profile_latency(
        target.model,
        target.calibration_inputs,
        batch_sizes=args.batch_sizes,
        repeats=args.repeats,
        device=device,
        num_threads=args.threads,
    )
    thresholds, _ = thresholds_for_macs_fraction(target.model, target.calibration_inputs, args.budget)
    rows = validate_latency_model(
        target.model,
        latency_model,
        target.inputs,
        ConfidencePolicy(thresholds),
        batch_sizes=args.validate_batch_sizes,
        device=device,
        num_threads=args.threads,
    )
    latency_model.info["validation"] = {"budget": args.budget, "thresholds": thresholds, "rows": rows}
    output = args.output or (
        str(Path(target.run_dir) / "latency_profile.json") if target.run_dir else f"{target.name}.latency.json"
    )
    if target.run_dir is not None and Path(output).resolve().parent == Path(target.run_dir).resolve():
        with RunLock(target.run_dir):  # the run directory has one writer at a time
            latency_model.save(output)
    else:
        latency_model.save(output)
    print(
        f"latency model of {target.name} on {latency_model.info['device']}; cumulative ms to each exit at batch 1: "
        + ", ".join(f"{t:.3f}" for t in latency_model.exit_latency_ms(1))
    )
    print(f"{'batch':>5} {'measured ms':>12} {'predicted ms':>13} {'error':>7}   (held out, dynamic runs)")
    for r in rows:
        print(f"{r['batch_size']:>5} {r['measured_ms']:>12.3f} {r['predicted_ms']:>13.3f} {100 * r['error']:>6.1f}%")
    print(f"wrote {output}")
