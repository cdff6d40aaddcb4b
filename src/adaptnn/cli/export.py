"""Export a calibrated run for other runtimes: ONNX, one file per stage plus manifest.json (``--mode stages``),
one graph with the exits inside (``--mode graph``) or batch-1 ``If`` branches (``--mode cond``).

The calibrated exit rule (``calibration.json``, any threshold rule; a stateful one's state travels as tensors) is
exported with the model. ``stages``: each stage file returns the next state, the exit's prediction and the
rule's score; ``manifest.json`` holds the thresholds, temperatures, exit MACs, input spec and state layout (run
it with ``adaptnn.export.StagesRunner``). ``graph``/``cond``: thresholds and temperatures are graph inputs. Up to
64 test samples are the example batch (``cond``: 8 of them, one by one), and the export is verified against
``run_dynamic`` with onnxruntime before anything is written.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ActionYesNo, ArgumentParser, Namespace

from ._shared import add_run_access, run_access

HELP = "Export a calibrated run to ONNX (per-stage files, one graph with in-graph exits, or batch-1 branches)."

MODES = ("stages", "graph", "cond")
EXAMPLE_SAMPLES = 64


def build(parser: ArgumentParser) -> None:
    parser.add_argument("run_dir", type=str, help="A trained and calibrated run directory.")
    parser.add_argument("--format", type=str, default="onnx", help="Export format (only onnx).")
    parser.add_argument(
        "--mode",
        type=str,
        default="stages",
        help="stages: one ONNX file per stage; graph: one graph, exits inside; cond: batch 1, If branches.",
    )
    parser.add_argument("--out", type=str | None, default=None, help="Output directory (default RUN_DIR/onnx_MODE).")
    parser.add_argument("--opset", type=int | None, default=None, help="ONNX opset (default: adaptnn's).")
    parser.add_argument("--overwrite", action=ActionYesNo, default=False, help="Replace an existing --out.")
    add_run_access(parser)


def run(args: Namespace) -> None:
    import torch
    from onnx.defs import onnx_opset_version

    from ..errors import ConfigError
    from ..export import DEFAULT_OPSET, export_cond, export_graph, export_stages
    from ..policies import policy_from_dict
    from ..runs import read_calibration
    from ..runs.rundir import load_run, require_trained

    if args.format != "onnx":
        raise ConfigError(f"--format {args.format!r} is not supported; use --format onnx")
    if args.mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {args.mode!r}")
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out is not None else run_dir / f"onnx_{args.mode}"
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    newest = onnx_opset_version()
    if not DEFAULT_OPSET <= opset <= newest:  # the dynamo exporter emits opset 18 or newer
        raise ConfigError(f"--opset must be between {DEFAULT_OPSET} and {newest} (this onnx), got {opset}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory for the export")
    require_trained(run_dir)
    calibration = read_calibration(run_dir / "calibration.json")
    policy = policy_from_dict(calibration["policy_spec"])
    loaded = load_run(run_dir, **run_access(args))
    loaded.model.eval()
    test = loaded.splits.test
    count = min(EXAMPLE_SAMPLES, len(test))
    if count == 0:
        raise ConfigError(f"{run_dir}: the test split is empty; export needs example inputs")
    example = torch.stack([torch.as_tensor(test[i][0]) for i in range(count)])
    if args.mode == "stages":
        export_stages(loaded.model, policy, example, out, opset=opset, overwrite=args.overwrite)
        what = f"{loaded.model.num_exits} stages"
    else:  # one file; graph: any batch size (verified on the example batch), cond: batch 1
        target = out / ("model.onnx" if args.mode == "graph" else "model_cond.onnx")
        if target.exists() and not args.overwrite:
            raise ConfigError(f"{target} exists; pass --overwrite to replace it")
        exporter = export_graph if args.mode == "graph" else export_cond
        exporter(loaded.model, policy, example, target, opset=opset)  # cond: traced on 1, verified on 8 samples
        what = f"one {args.mode} graph ({target.name})"
    thresholds = [None if t == float("inf") else round(t, 4) for t in policy.thresholds]
    print(
        f"exported {what} ({policy.name} rule, thresholds {thresholds}) to {out}; "
        f"verified against run_dynamic on {count if args.mode != 'cond' else min(8, count)} test sample(s)"
    )
