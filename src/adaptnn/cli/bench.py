"""Time the full model against real early exit at chosen compute budgets and batch sizes."""

from __future__ import annotations

import json
from pathlib import Path

from jsonargparse import ActionYesNo, ArgumentParser, Namespace

from ._shared import add_run_access, run_access

HELP = "Realised vs ideal speedup of early exit (wall clock)."


def build(parser: ArgumentParser) -> None:
    parser.add_argument("target", type=str, help="A trained run directory or a registered model name.")
    parser.add_argument(
        "--budgets", type=list[float], default=[0.5], help="Target average MACs as fractions of the full model."
    )
    parser.add_argument("--batch_sizes", type=list[int], default=[1, 8, 64], help="Batch sizes to time.")
    parser.add_argument("--num_samples", type=int, default=256, help="Samples timed per batch size.")
    parser.add_argument("--rounds", type=int, default=5, help="Timed passes (median per batch).")
    parser.add_argument("--warmup_s", type=float, default=2.0, help="Warm-up seconds per batch size.")
    parser.add_argument("--threads", type=int | None, default=None, help="CPU threads to pin (default: torch's).")
    parser.add_argument("--device", type=str, default="cpu", help="cpu or cuda.")
    parser.add_argument("--channels_last", action=ActionYesNo, default=False, help="Use channels_last.")
    parser.add_argument(
        "--compile", action=ActionYesNo, default=False, help="torch.compile segments and heads (dynamic shapes)."
    )
    parser.add_argument(
        "--cuda_graphs", action=ActionYesNo, default=False, help="Run through CUDA graphs at bucketed batch sizes."
    )
    parser.add_argument(
        "--dtype", type=str | None, default=None, help="Run in this dtype: float32, bfloat16 or float16 (GPU)."
    )
    parser.add_argument("--input_size", type=list[int] | None, default=None, help="Sample shape for model names.")
    parser.add_argument("--kwargs", type=dict | None, default=None, help="Model arguments for model names.")
    parser.add_argument("--output", type=str | None, default=None, help="Write the JSON here.")
    parser.add_argument("--json", action=ActionYesNo, default=False, help="Print JSON instead of a table.")
    add_run_access(parser)


def run(args: Namespace) -> None:
    import torch

    from ..errors import ConfigError
    from ..io import write_json
    from ..measure.speed import bench_at_budget, check_bench_options
    from ..runs.targets import resolve_target
    from ..training import resolve_device

    check_bench_options(args.batch_sizes, rounds=args.rounds, warmup_s=args.warmup_s, num_threads=args.threads)
    if not args.budgets or any(not 0 < b <= 1.5 for b in args.budgets):
        raise ConfigError(f"--budgets must be MACs fractions in (0, 1.5], got {args.budgets}")
    target = resolve_target(
        args.target,
        num_samples=args.num_samples,
        input_size=args.input_size,
        model_kwargs=args.kwargs,
        **run_access(args),
    )
    device = resolve_device(args.device)
    dtype = None
    if args.dtype is not None:
        if args.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype must be float32, bfloat16 or float16, got {args.dtype!r}")
        dtype = getattr(torch, args.dtype)
    if args.compile:
        target.model.compile_parts()
    runs = [
        bench_at_budget(
            target.model,
            target.inputs,
            target.calibration_inputs,
            budget,
            batch_sizes=args.batch_sizes,
            rounds=args.rounds,
            warmup_s=args.warmup_s,
            device=device,
            num_threads=args.threads,
            channels_last=args.channels_last,
            dtype=dtype,
            cuda_graphs=args.cuda_graphs,
        )
        | {"compiled": args.compile}
        for budget in args.budgets
    ]
    out = {"target": target.name, "runs": runs}
    if args.output:
        write_json(args.output, out)
    elif target.run_dir is not None:
        write_json(Path(target.run_dir) / "speed.json", out)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(
        f"{target.name} on {runs[0]['machine']['device']} ({runs[0]['machine']['processor']}, "
        f"{runs[0]['machine']['torch_threads']} threads)"
    )
    print(
        f"{'budget':>6} {'batch':>5} {'full ms':>9} {'dyn ms':>9} {'realised':>8} {'ideal':>6} {'ratio':>6}"
        f" {'p99 full':>9} {'p99 dyn':>8}"
    )
    for r in runs:
        for e in r["results"]:
            lat = e.get("latency_ms")
            tail = f" {lat['full']['p99']:>9.3f} {lat['dynamic']['p99']:>8.3f}" if lat else ""
            print(
                f"{r['budget']:>6.2f} {e['batch_size']:>5} {e['full_ms_per_batch']:>9.3f} "
                f"{e['dynamic_ms_per_batch']:>9.3f} {e['realised_speedup']:>7.2f}x {e['ideal_speedup']:>5.2f}x "
                f"{e['ratio']:>6.2f}{tail}"
            )
