"""Realised vs ideal speedup of real early exit, and the latency model's error, on this machine.

For each model (random weights and inputs: timing depends on the exit distribution, not on accuracy),
thresholds are calibrated so that the dynamic model spends about ``--budget`` of the full model's MACs,
then the full model and ``run_dynamic`` are timed on the same batches, interleaved, after a warm-up by
time (see ``adaptnn.measure.speed``). The latency model is profiled on separate inputs and checked on held-out
batch sizes.

Allocator: PyTorch's CPU allocations go through glibc malloc by default, whose behaviour on these shared
VMs makes identical calls vary a lot (early exit allocates tensors of a new batch size at every exit).
Unless ``--no-jemalloc`` is given (and when Debian's libjemalloc2 is installed), the script re-executes itself
with ``LD_PRELOAD=libjemalloc.so.2`` and ``MALLOC_CONF`` = :data:`JEMALLOC_CONF`; the figures record which
allocator and settings were used. The settings keep freed memory (``dirty_decay_ms:-1,muzzy_decay_ms:-1``):
with jemalloc's default decay, activations of a large batch are returned to the OS after each call and
page-faulted back in on the next, which made MSDNet's full model 1.8x slower at batch 64 (470 vs 260 ms on
the 2-core EPYC) and flattered early exit, which allocates less.

Usage::

    python benchmarks/speed.py                       # default suite, writes benchmarks/results/speed_cpu.{json,md}
    python benchmarks/speed.py --models mecnn_cifar --batch-sizes 1 8 --rounds 3   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
JEMALLOC_CONF = "background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"
RESULTS = Path(__file__).parent / "results"

# model name -> (input size, model kwargs)
SUITE = {
    "msdnet_cifar100": ([3, 32, 32], {}),
    "timm:resnet50": ([3, 224, 224], {}),
    "mecnn_cifar": ([3, 32, 32], {}),
}


def _maybe_reexec_with_jemalloc(enabled: bool) -> None:
    if not enabled or not os.path.exists(JEMALLOC) or JEMALLOC in os.environ.get("LD_PRELOAD", ""):
        return
    env = dict(os.environ, LD_PRELOAD=JEMALLOC, MALLOC_CONF=JEMALLOC_CONF)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def write_markdown(out: dict, path: Path) -> None:
    """The human-readable table of a speed result (also usable on a saved JSON)."""
    entries, threads = out["entries"], out["threads"]
    machine = entries[0]["machine"]
    where = (
        f"{machine['gpu']} (torch {machine['torch']}, host {machine['processor']})"
        if machine.get("gpu")
        else f"{machine['processor']} ({threads} threads, {out['allocator']}, torch {machine['torch']})"
    )
    variant = ", ".join(
        [entries[0].get("dtype", "float32")]
        + (["channels_last"] if entries[0].get("channels_last") else [])
        + (["torch.compile (dynamic shapes)"] if out.get("compiled") else [])
        + (["CUDA graphs (bucketed batch sizes)"] if entries[0].get("cuda_graphs") else [])
        + ([f"engine: {out['engine']}"] if out.get("engine") else [])
    )
    md = [
        f"# Early-exit speed on {where}",
        "",
        f"Command: `{out['command']}`",
        "",
        f"Budget: {out.get('budget', 0.5)} of the full model's MACs; {variant}; random weights and inputs.",
        "",
        "realised = full / dynamic time; ideal = full / dynamic MACs; ratio = realised / ideal. "
        "time-ideal = full / oracle time (the same computation with exits known in advance: what the hardware "
        "allows); engine = oracle / dynamic time (the early-exit engine's own efficiency). "
        "realised = time-ideal x engine.",
        "",
        "| model | batch | full ms/batch | dynamic ms/batch | realised | ideal | ratio | time-ideal | engine "
        "| p99 full ms | p99 dyn ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        for r in e["results"]:
            lat = r.get("latency_ms")
            tail = f"{lat['full']['p99']:.2f} | {lat['dynamic']['p99']:.2f}" if lat else "- | -"
            md.append(
                f"| {e['model']} | {r['batch_size']} | {r['full_ms_per_batch']:.2f} | "
                f"{r['dynamic_ms_per_batch']:.2f} | {r['realised_speedup']:.2f}x | {r['ideal_speedup']:.2f}x | "
                f"{r['ratio']:.3f} | {r.get('time_ideal_speedup', float('nan')):.2f}x | "
                f"{r.get('engine_efficiency', float('nan')):.3f} | {tail} |"
            )
    if any("latency_model" in e for e in entries):
        md += [
            "",
            "Latency model on held-out batch sizes (dynamic runs):",
            "",
            "| model | batch | measured ms | predicted ms | error |",
            "|---|---|---|---|---|",
        ]
        for e in entries:
            for r in e.get("latency_model", {}).get("held_out", []):
                md.append(
                    f"| {e['model']} | {r['batch_size']} | {r['measured_ms']:.2f} | {r['predicted_ms']:.2f} | "
                    f"{100 * r['error']:+.1f}% |"
                )
    path.write_text("\n".join(md) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SUITE))
    parser.add_argument("--budget", type=float, default=0.5, help="target MACs fraction of the full model")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 1 8 64 (+256 on GPU)")
    parser.add_argument("--samples", type=int, default=128, help="samples timed per batch size")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile segments and heads (dynamic shapes)")
    parser.add_argument("--cuda-graphs", action="store_true", help="run everything through CUDA graphs (GPU)")
    parser.add_argument("--no-jemalloc", action="store_true")
    parser.add_argument("--no-latency-model", action="store_true")
    parser.add_argument("--output", default=None, help="default: benchmarks/results/speed_<device>.json")
    args = parser.parse_args()
    _maybe_reexec_with_jemalloc(not args.no_jemalloc)

    import torch

    from adaptnn.io import to_jsonable
    from adaptnn.measure.latency import profile_latency, validate_latency_model
    from adaptnn.measure.speed import bench_at_budget
    from adaptnn.policies import ConfidencePolicy
    from adaptnn.runs.targets import resolve_target

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    on_gpu = torch.device(args.device).type == "cuda"
    batch_sizes = args.batch_sizes or ([1, 8, 64, 256] if on_gpu else [1, 8, 64])
    dtype = getattr(torch, args.dtype) if args.dtype else None
    # latency model: profiled at powers of two and the midpoints between them from 8 up (time is not linear in
    # the batch size between far-apart knots), checked at sizes between the knots (never at a profiled size)
    profile_sizes = [
        b for b in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256) if b <= max(64, max(batch_sizes))
    ]
    held_out = [b for b in (3, 6, 20, 40, 56, 80, 160) if b < profile_sizes[-1] and b <= args.samples]
    started = time.time()
    entries = []
    for name in args.models:
        input_size, kwargs = SUITE.get(name, (None, {}))
        print(f"== {name}", flush=True)
        target = resolve_target(name, num_samples=args.samples, input_size=input_size, model_kwargs=kwargs)
        target.model.to(args.device, dtype)
        if args.compile:
            target.model.compile_parts()
        speed = bench_at_budget(
            target.model,
            target.inputs,
            target.calibration_inputs,
            args.budget,
            batch_sizes=batch_sizes,
            rounds=args.rounds,
            warmup_s=args.warmup_s,
            device=args.device,
            num_threads=threads,
            channels_last=args.channels_last,
            dtype=dtype,
            cuda_graphs=args.cuda_graphs,
        )
        thresholds = speed["thresholds"]
        entry = {"model": name, "input_size": list(target.inputs.shape[1:]), **speed}
        for r in speed["results"]:
            print(
                f"  batch {r['batch_size']:>3}: realised {r['realised_speedup']:.2f}x  ideal {r['ideal_speedup']:.2f}x"
                f"  ratio {r['ratio']:.3f}",
                flush=True,
            )
        if not args.no_latency_model:
            lm = profile_latency(
                target.model,
                target.calibration_inputs,
                batch_sizes=profile_sizes,
                repeats=max(5, args.rounds),
                device=args.device,
                num_threads=threads,
            )
            rows = validate_latency_model(
                target.model,
                lm,
                target.inputs,
                ConfidencePolicy(thresholds),
                batch_sizes=held_out,
                rounds=max(3, args.rounds),
                device=args.device,
                num_threads=threads,
            )
            entry["latency_model"] = {"held_out": rows, "exit_latency_ms_batch1": lm.exit_latency_ms(1)}
            for r in rows:
                print(
                    f"  latency model, batch {r['batch_size']:>3}: measured {r['measured_ms']:.2f} ms, "
                    f"predicted {r['predicted_ms']:.2f} ms ({100 * r['error']:+.1f}%)",
                    flush=True,
                )
        entries.append(entry)
    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "allocator": (
            f"jemalloc ({os.environ.get('MALLOC_CONF', 'default settings')})"
            if JEMALLOC in os.environ.get("LD_PRELOAD", "")
            else "glibc malloc"
        ),
        "threads": threads,
        "budget": args.budget,
        "compiled": args.compile,
        "elapsed_s": time.time() - started,
        "entries": entries,
    }
    path = Path(args.output) if args.output else RESULTS / f"speed_{torch.device(args.device).type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(out), indent=2, allow_nan=False) + "\n")  # inf thresholds -> null
    write_markdown(out, path.with_suffix(".md"))
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
