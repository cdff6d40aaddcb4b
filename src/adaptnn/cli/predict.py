"""Predict a split of a calibrated run through the stage-level serving engine; writes predictions, exits, a report.

The split's samples enter the engine in input batches while earlier rows are still running, so deep stages run
on the pooled survivors of many batches (the engine of ``adaptnn serve``, without HTTP). Writes one row per
sample (index, prediction, exit, MACs, label when known) as JSON or CSV, and a throughput report beside it.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ActionYesNo, ArgumentParser, Namespace

from ._shared import add_run_access, run_access

HELP = "Predict a dataset split of a calibrated run with the stage-level early-exit engine."

SPLITS = ("test", "val", "train")
FORMATS = ("json", "csv")


def build(parser: ArgumentParser) -> None:
    parser.add_argument("run_dir", type=str, help="A trained and calibrated run directory.")
    parser.add_argument("--data", type=str, default="test", help="Split to predict: test, val or train.")
    parser.add_argument(
        "--out", type=str | None, default=None, help="Output file (default RUN_DIR/predictions_SPLIT.FORMAT)."
    )
    parser.add_argument("--format", type=str | None, default=None, help="json or csv (default: from --out, else json).")
    parser.add_argument("--backend", type=str, default="torch", help="torch, or onnx (RUN_DIR/onnx_stages).")
    parser.add_argument("--max_batch", type=int, default=64, help="Most rows in one stage batch.")
    parser.add_argument("--max_inflight", type=int, default=1024, help="Most rows inside the engine at once.")
    parser.add_argument("--scheduler", type=str, default="fill", help="fill (pool survivors), oldest or deadline.")
    parser.add_argument("--limit", type=int | None, default=None, help="Predict only the first N samples.")
    parser.add_argument("--progress", action=ActionYesNo, default=True, help="Show a progress bar.")
    add_run_access(parser)


def _format(args: Namespace) -> str:
    from ..errors import ConfigError

    fmt = args.format
    if fmt is None:
        fmt = "csv" if args.out is not None and str(args.out).lower().endswith(".csv") else "json"
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt


def run(args: Namespace) -> None:
    import torch

    from ..errors import ConfigError
    from ..io import atomic_write_text, write_json
    from ..serve.engine import Engine
    from ..serve.loading import load_served
    from ..serve.offline import stream_predict

    if args.data not in SPLITS:
        raise ConfigError(f"--data must be one of {', '.join(SPLITS)}, got {args.data!r}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    fmt = _format(args)
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out is not None else run_dir / f"predictions_{args.data}.{fmt}"
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name")
    served = load_served(run_dir, backend=args.backend, **run_access(args))
    dataset = getattr(served.run.splits, args.data)
    total = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    if total == 0:
        raise ConfigError(f"{run_dir}: the {args.data} split is empty")
    engine = Engine(served.backend, max_batch=args.max_batch, scheduler=args.scheduler, max_wait_ms=1e9)
    chunk = max(1, args.max_batch)

    def batches():
        for start in range(0, total, chunk):
            items = [dataset[i] for i in range(start, min(start + chunk, total))]
            x = torch.stack([torch.as_tensor(item[0]) for item in items])
            y = torch.tensor([int(item[1]) for item in items])
            yield x, y

    result = stream_predict(
        engine, batches(), total=total, max_inflight=max(args.max_inflight, chunk), progress=args.progress
    )
    rows = [
        {"index": i, "prediction": int(p), "exit": int(e), "macs": float(m), "label": int(y)}
        for i, (p, e, m, y) in enumerate(
            zip(result.prediction, result.exit_index, result.macs, result.labels, strict=True)  # type: ignore[arg-type]
        )
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        write_json(out, {"split": args.data, "backend": args.backend, "predictions": rows})
    else:
        lines = ["index,prediction,exit,macs,label"]
        lines += [f"{r['index']},{r['prediction']},{r['exit']},{r['macs']:.0f},{r['label']}" for r in rows]
        atomic_write_text(out, "\n".join(lines) + "\n")
    report = {
        "run_dir": str(run_dir),
        "split": args.data,
        "backend": args.backend,
        "policy": served.policy_name,
        "max_batch": args.max_batch,
        "threads": torch.get_num_threads(),
        **result.report(engine.num_exits),
    }
    report_path = out.with_name(out.stem + "_report.json")
    write_json(report_path, report)
    acc = f", accuracy {100 * report['accuracy']:.2f}%" if "accuracy" in report else ""
    print(
        f"predicted {report['samples']} {args.data} samples in {report['wall_s']:.2f}s "
        f"({report['samples_per_s']:.0f}/s, {args.backend}){acc}; exit fractions "
        f"{[round(f, 3) for f in report['exit_fractions']]}, avg MACs {report['avg_macs'] / 1e6:.3f}M"
    )
    print(f"wrote {out} and {report_path}")
