"""Early exit in onnxruntime on the CPU: the full model vs the ``graph`` and ``stages`` exports.

For each model (random weights and inputs, seeded: timing depends on the exit distribution, not on accuracy),
confidence thresholds are calibrated on separate random inputs so that the dynamic model spends about
``--budget`` of the full model's MACs. Three ONNX variants then run in onnxruntime (CPUExecutionProvider):

* **full**: ``model.forward`` (every segment, the last head only) exported with ``torch.onnx.export(dynamo=True)``
  and a dynamic batch dimension;
* **graph**: :func:`adaptnn.export.export_graph`, one graph with per-sample exits inside it, the thresholds a
  runtime input;
* **stages**: :func:`adaptnn.export.export_stages`, one graph per stage, run with real early exit by
  :class:`adaptnn.export.StagesRunner` (compaction in numpy between stages).

Before timing, every sample's exit under ``graph`` and ``stages`` is checked against ``model.run_dynamic``
(the script fails, after writing the figures, if one differs). The three variants are then timed interleaved
on the same batches with the shared engine :func:`adaptnn.measure.timing.interleaved_medians` (warm-up by
time, rotating order, median per batch). Reported per model and batch size: ms per batch, realised speedup
(full / graph, full / stages), the MACs-ideal speedup (full-model MACs / average MACs of the exits taken, heads
on the way included), the ratio realised / ideal and the exit fractions. The load average is recorded before
and after each model.

Allocator: as in ``benchmarks/speed.py``, the script re-executes itself with jemalloc preloaded unless
``--no-jemalloc`` is given (onnxruntime uses its own arena for tensors; the numpy compaction of ``stages`` and
PyTorch's calibration go through malloc).

Usage::

    python benchmarks/export.py --models msdnet_cifar10 --batch-sizes 1 64 --samples 128 --rounds 5
    python benchmarks/export.py --models timm:resnet50 --batch-sizes 1 16 --samples 16 --rounds 3 --append
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
JEMALLOC_CONF = "background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"
RESULTS = Path(__file__).parent / "results"
VARIANTS = ("full", "graph", "stages")

# model name -> input size (None: the model's own)
SUITE = {
    "msdnet_cifar10": [3, 32, 32],
    "timm:resnet50": [3, 224, 224],
}


def _maybe_reexec_with_jemalloc(enabled: bool) -> None:
    if not enabled or not os.path.exists(JEMALLOC) or JEMALLOC in os.environ.get("LD_PRELOAD", ""):
        return
    env = dict(os.environ, LD_PRELOAD=JEMALLOC, MALLOC_CONF=JEMALLOC_CONF)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _session_options(threads: int, spinning: bool):
    """The options of the full and graph sessions: those :class:`StagesRunner` gives each stage's session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    return options


def export_full(model, example, path: Path) -> Path:
    """``model.forward`` to ONNX with the dynamo exporter and a dynamic batch (input ``x``, output ``logits``)."""
    import warnings

    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["x"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
            dynamo=True,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    return path


def bench_model(name: str, input_size: list[int] | None, args, work: Path) -> dict:
    """Calibrate, export the three variants, check the exits, time them; the entry of one model."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from adaptnn.export import StagesRunner, export_graph, export_stages, policy_thresholds
    from adaptnn.measure.speed import full_model_macs, thresholds_for_macs_fraction
    from adaptnn.measure.timing import interleaved_medians, machine_info
    from adaptnn.policies import ConfidencePolicy
    from adaptnn.runs.targets import resolve_target

    load_before = _load()
    t0 = time.time()
    target = resolve_target(name, num_samples=args.samples, input_size=input_size)
    model = target.model.eval()
    shape = list(target.inputs.shape[1:])
    thresholds, calibrated = thresholds_for_macs_fraction(model, target.calibration_inputs, args.budget)
    policy = ConfidencePolicy(thresholds)
    num_exits = model.num_exits
    full_macs = full_model_macs(model, shape)
    print(f"  calibrated MACs fraction {calibrated:.3f} ({time.time() - t0:.1f} s)", flush=True)

    example = target.calibration_inputs[: max(2, min(8, args.samples))]
    folder = work / name.replace(":", "_")
    folder.mkdir(parents=True, exist_ok=True)
    # export_stages verifies its files against run_dynamic with an absolute logits tolerance (LOGITS_ATOL, 1e-4);
    # random-weight models with large logits can exceed it by float32 rounding alone: --verify-atol relaxes it
    import adaptnn.export.stages as stages_module

    default_atol = stages_module.LOGITS_ATOL
    if args.verify_atol is not None:
        stages_module.LOGITS_ATOL = max(default_atol, args.verify_atol)
    t1 = time.time()
    full_path = export_full(model, example, folder / "full.onnx")
    graph_path = export_graph(model, policy, example, folder / "graph.onnx")
    stages_dir = export_stages(model, policy, example, folder / "stages", overwrite=True)
    export_s = time.time() - t1
    print(f"  exported full, graph, stages ({export_s:.1f} s)", flush=True)

    options = _session_options(args.threads, args.spinning)
    providers = ["CPUExecutionProvider"]
    full_sess = ort.InferenceSession(str(full_path), options, providers=providers)
    graph_sess = ort.InferenceSession(str(graph_path), options, providers=providers)
    runner = StagesRunner(stages_dir, thresholds, intra_op_threads=args.threads, spinning=args.spinning)
    full_in = full_sess.get_inputs()[0].name
    graph_thr = policy_thresholds(policy, num_exits).numpy().astype(np.float32)

    def run_full(x):
        return full_sess.run(None, {full_in: x})

    def run_graph(x):
        return graph_sess.run(None, {"x": x, "thresholds": graph_thr})

    def run_stages(x):
        return runner.run(x)

    variants = {"full": run_full, "graph": run_graph, "stages": run_stages}
    results = []
    for bs in args.batch_sizes:
        count = (args.samples // bs) * bs
        if count == 0:
            print(f"  batch {bs}: skipped (more than --samples {args.samples})", flush=True)
            continue
        xs = target.inputs[:count]
        batches = [np.ascontiguousarray(xs[i : i + bs].numpy(), dtype=np.float32) for i in range(0, count, bs)]
        # correctness first: every sample's exit in both exports equals run_dynamic's
        ref_exit, graph_exit, stages_exit, graph_macs, ref_macs = [], [], [], [], []
        full_err = graph_err = 0.0
        for i, x in enumerate(batches):
            ref = model.run_dynamic(xs[i * bs : (i + 1) * bs], policy)
            g_logits, g_exit, g_macs = run_graph(x)
            _, s_exit, _ = run_stages(x)
            with torch.inference_mode():
                want_full = model(xs[i * bs : (i + 1) * bs]).numpy()
            full_err = max(full_err, float(np.abs(run_full(x)[0] - want_full).max()))
            graph_err = max(graph_err, float(np.abs(g_logits - ref.logits.float().numpy()).max()))
            ref_exit.append(ref.exit_index.numpy())
            ref_macs.append(ref.macs.numpy())
            graph_exit.append(np.asarray(g_exit))
            stages_exit.append(np.asarray(s_exit))
            graph_macs.append(np.asarray(g_macs, dtype=np.float64))
        ref_exit_a, graph_exit_a, stages_exit_a = (np.concatenate(a) for a in (ref_exit, graph_exit, stages_exit))
        graph_macs_a, ref_macs_a = np.concatenate(graph_macs), np.concatenate(ref_macs)
        graph_ok = bool((graph_exit_a == ref_exit_a).all())
        stages_ok = bool((stages_exit_a == ref_exit_a).all())
        macs_ok = bool(np.allclose(graph_macs_a, ref_macs_a, rtol=1e-9))
        mismatches = {
            "graph": int((graph_exit_a != ref_exit_a).sum()),
            "stages": int((stages_exit_a != ref_exit_a).sum()),
        }

        medians = interleaved_medians(variants, batches, rounds=args.rounds, warmup_s=args.warmup_s)
        per_batch = {v: sum(medians[v]) / len(batches) for v in VARIANTS}
        avg_macs = float(graph_macs_a.mean())
        ideal = full_macs / avg_macs
        fractions = np.bincount(ref_exit_a, minlength=num_exits) / count
        row = {
            "batch_size": bs,
            "num_samples": count,
            "num_batches": len(batches),
            **{f"{v}_ms_per_batch": per_batch[v] for v in VARIANTS},
            "realised_speedup_graph": per_batch["full"] / per_batch["graph"],
            "realised_speedup_stages": per_batch["full"] / per_batch["stages"],
            "ideal_speedup": ideal,
            "ratio_graph": per_batch["full"] / per_batch["graph"] / ideal,
            "ratio_stages": per_batch["full"] / per_batch["stages"] / ideal,
            "avg_macs": avg_macs,
            "macs_fraction": avg_macs / full_macs,
            "exit_fractions": fractions.tolist(),
            "exits_match_run_dynamic": graph_ok and stages_ok,
            "graph_macs_match_run_dynamic": macs_ok,
            "exit_mismatches": mismatches,
            "full_max_abs_logit_error": full_err,
            "graph_max_abs_logit_error": graph_err,
            "per_batch_ms": medians,
        }
        results.append(row)
        print(
            f"  batch {bs:>3}: full {per_batch['full']:.2f} ms, graph {per_batch['graph']:.2f} ms, stages "
            f"{per_batch['stages']:.2f} ms | realised graph {row['realised_speedup_graph']:.2f}x, stages "
            f"{row['realised_speedup_stages']:.2f}x, ideal {ideal:.2f}x | ratio graph {row['ratio_graph']:.3f}, "
            f"stages {row['ratio_stages']:.3f}",
            flush=True,
        )
    return {
        "model": name,
        "input_size": shape,
        "budget": args.budget,
        "calibrated_macs_fraction": calibrated,
        "thresholds": thresholds,
        "num_exits": num_exits,
        "full_model_macs": full_macs,
        "exit_macs": model.exit_costs(example).tolist(),
        "export_s": export_s,
        "stages_verify_logits_atol": stages_module.LOGITS_ATOL,
        "stages_verify_logits_atol_default": default_atol,
        "rounds": args.rounds,
        "warmup_s": args.warmup_s,
        "threads": args.threads,
        "machine": machine_info("cpu"),
        "load_average_before": load_before,
        "load_average_after": _load(),
        "elapsed_s": time.time() - t0,
        "results": results,
    }


def write_markdown(out: dict, path: Path) -> None:
    """The human-readable table of an export-speed result (also usable on a saved JSON)."""
    entries = out["entries"]
    machine = entries[0]["machine"] if entries else {}
    md = [
        f"# Early exit in onnxruntime on {machine.get('processor', 'CPU')} ({out['threads']} threads)",
        "",
        f"Command: `{out['command']}`",
        "",
        f"onnxruntime {out['onnxruntime']} (CPUExecutionProvider, intra-op threads {out['threads']}, inter-op 1, "
        f"spinning {'on' if out.get('spinning', True) else 'off'} in every session), "
        f"torch {machine.get('torch', '?')}, {out['allocator']}; budget {out['budget']} of the full model's MACs; "
        "random weights and inputs; warm-up by time, then medians per batch over rounds, "
        "variants interleaved on the same batches.",
        "",
        "full = `model.forward` exported (dynamo, dynamic batch); graph = `export_graph` (exits inside one graph); "
        "stages = `export_stages` + `StagesRunner`. realised = full / variant time; ideal = full-model MACs / "
        "average MACs of the exits taken; ratio = realised / ideal. exits = every sample's exit equals "
        "`run_dynamic`'s in both exports.",
        "",
        "| model | batch | full ms/batch | graph ms/batch | stages ms/batch | realised graph | realised stages "
        "| ideal | ratio graph | ratio stages | exit fractions | exits | load avg (1/5/15 min) before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        load = f"{'/'.join(map(str, e['load_average_before']))} -> {'/'.join(map(str, e['load_average_after']))}"
        for r in e["results"]:
            fractions = " ".join(f"{f:.2f}" for f in r["exit_fractions"])
            md.append(
                f"| {e['model']} | {r['batch_size']} | {r['full_ms_per_batch']:.2f} | {r['graph_ms_per_batch']:.2f} "
                f"| {r['stages_ms_per_batch']:.2f} | {r['realised_speedup_graph']:.2f}x "
                f"| {r['realised_speedup_stages']:.2f}x | {r['ideal_speedup']:.2f}x | {r['ratio_graph']:.3f} "
                f"| {r['ratio_stages']:.3f} | {fractions} | {'equal' if r['exits_match_run_dynamic'] else 'DIFFER'} "
                f"| {load} |"
            )
    md += ["", "Per model:", ""]
    for e in entries:
        md.append(
            f"- {e['model']} {e['input_size']}: {e.get('rounds', out['rounds'])} rounds, "
            f"{e.get('warmup_s', out['warmup_s'])} s warm-up, calibrated MACs fraction "
            f"{e['calibrated_macs_fraction']:.3f}, {e['num_exits']} exits, export {e['export_s']:.0f} s, "
            f"export_stages logits tolerance {e.get('stages_verify_logits_atol', 1e-4):g}; "
            f"`{e.get('command', out['command'])}`"
        )
    md += [
        "",
        f"Load average at start {out['load_average_start']}, at end {out['load_average_end']} (last run), on "
        f"{machine.get('cpu_count', '?')} logical CPUs. When it exceeds the thread count the machine was shared "
        "with other jobs: absolute times are inflated, the ratios (variants interleaved call by call) much less.",
    ]
    path.write_text("\n".join(md) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SUITE))
    parser.add_argument("--budget", type=float, default=0.5, help="target MACs fraction of the full model")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--samples", type=int, default=128, help="samples timed per batch size")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--no-jemalloc", action="store_true")
    parser.add_argument(
        "--spinning", action="store_true", help="let idle onnxruntime threads spin (default off, as in StagesRunner)"
    )
    parser.add_argument(
        "--verify-atol", type=float, default=None, help="relax export_stages' logits tolerance (default: the library's)"
    )
    parser.add_argument("--keep-exports", default=None, help="write the ONNX files here (default: a temp dir)")
    parser.add_argument("--output", default=None, help="default: benchmarks/results/export_cpu.json")
    parser.add_argument("--append", action="store_true", help="keep the other models' entries of --output")
    args = parser.parse_args()
    if args.threads < 1 or args.samples < 1 or args.rounds < 1 or any(b < 1 for b in args.batch_sizes):
        parser.error("--threads, --samples, --rounds and --batch-sizes must be positive")
    _maybe_reexec_with_jemalloc(not args.no_jemalloc)

    import onnxruntime
    import torch

    from adaptnn.io import to_jsonable

    torch.set_num_threads(args.threads)
    started, load_start = time.time(), _load()
    entries = []
    with tempfile.TemporaryDirectory(prefix="adaptnn_export_bench_") as tmp:
        work = Path(args.keep_exports) if args.keep_exports else Path(tmp)
        for name in args.models:
            print(f"== {name}", flush=True)
            entries.append(bench_model(name, SUITE.get(name), args, work))
    command = " ".join([Path(sys.executable).name, *sys.argv])
    for entry in entries:
        entry["command"] = command
    path = Path(args.output) if args.output else RESULTS / "export_cpu.json"
    if args.append and path.exists():
        previous = json.loads(path.read_text())
        kept = [e for e in previous["entries"] if e["model"] not in args.models]
        for e in kept:
            e.setdefault("command", previous["command"])
        entries = kept + entries
        command = "; ".join(dict.fromkeys([*previous["command"].split("; "), command]))
    out = {
        "command": command,
        "allocator": (
            f"jemalloc ({os.environ.get('MALLOC_CONF', 'default settings')})"
            if JEMALLOC in os.environ.get("LD_PRELOAD", "")
            else "glibc malloc"
        ),
        "threads": args.threads,
        "spinning": args.spinning,
        "onnxruntime": onnxruntime.__version__,
        "budget": args.budget,
        "rounds": args.rounds,
        "warmup_s": args.warmup_s,
        "load_average_start": load_start,
        "load_average_end": _load(),
        "elapsed_s": time.time() - started,
        "entries": entries,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(out), indent=2, allow_nan=False) + "\n")  # inf thresholds -> null
    write_markdown(out, path.with_suffix(".md"))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    # every sample's exit must equal run_dynamic's (checked before timing; the figures are written first)
    bad = [
        f"{e['model']} batch {r['batch_size']}: {r['exit_mismatches']} samples differ, graph MACs equal: "
        f"{r['graph_macs_match_run_dynamic']}"
        for e in entries
        for r in e["results"]
        if not (r["exits_match_run_dynamic"] and r["graph_macs_match_run_dynamic"])
    ]
    assert not bad, "exits differ from run_dynamic: " + "; ".join(bad)


if __name__ == "__main__":
    main()
