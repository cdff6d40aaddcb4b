"""The timing noise floor of this machine: one model's latency measured again and again over minutes.

Every figure that compares a prediction with a later measurement (``calibrate_knobs.py``'s ``--budget_ms`` check, the
ms anchors of the latency profiles) rests on two measurements taken minutes apart. This script times the same call
(a run's model, its last exit, batches of ``--batch`` validation images) as a median of ``--calls`` calls every
``--interval`` seconds for ``--seconds``, nothing else running, and reports the spread of those medians around their
overall median: p10 / p90 / min / max ratios. Two such measurements can disagree by the width of that band.

    python benchmarks/timing_noise.py --run_dir runs/vit_fmnist --batch 64 --seconds 240
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from adaptnn.errors import AdaptnnError
from adaptnn.measure.latency import exit_policy
from adaptnn.measure.timing import Timer, machine_info, median_ms, warm_up
from adaptnn.runs.knobs import stack_inputs
from adaptnn.runs.rundir import load_run

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run_dir", type=Path, default=Path("runs/vit_fmnist"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--calls", type=int, default=8, help="timed calls per sample (their median is one sample)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--seconds", type=float, default=240.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "timing_noise_cpu")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.calls < 1 or args.seconds <= 0:
        parser.error(
            f"--batch and --calls must be >= 1 and --seconds > 0, got {args.batch}, {args.calls}, {args.seconds}"
        )
    torch.set_num_threads(args.threads)
    try:
        run = load_run(args.run_dir)
    except AdaptnnError as err:  # a run directory is data: a missing or bad one is one line
        parser.error(f"--run_dir {args.run_dir}: {err}")
    model = run.model.eval()
    pool = stack_inputs(run.splits.val, 8 * args.batch)
    last = exit_policy(model.num_exits, model.num_exits - 1)
    batches = [pool[(i * args.batch) % len(pool) :][: args.batch] for i in range(8)]
    step = iter(range(10**9))

    def call() -> None:
        with torch.inference_mode():
            model.run_dynamic(batches[next(step) % len(batches)], last, check_finite=False)

    timer = Timer()
    load_before = [round(v, 2) for v in os.getloadavg()]
    warm_up(call, 2.0, timer)
    samples, stamps, t0 = [], [], time.time()
    while time.time() - t0 < args.seconds:
        samples.append(median_ms(timer, call, args.calls))
        stamps.append(round(time.time() - t0, 1))
        time.sleep(args.interval)
    base = statistics.median(samples)
    ratios = sorted(v / base for v in samples)

    def q(p: float) -> float:
        return ratios[min(len(ratios) - 1, int(p * len(ratios)))]

    beyond = sum(abs(r - 1) > 0.05 for r in ratios) / len(ratios)
    summary = {"samples": len(samples), "median_ms": base, "p10": q(0.1), "p90": q(0.9), "min": ratios[0],
               "max": ratios[-1], "share_beyond_5pct": beyond}  # fmt: skip
    command = "python benchmarks/timing_noise.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = {"machine": machine_info(), "threads": args.threads, "run_dir": str(args.run_dir), "batch": args.batch,
           "calls": args.calls, "interval_s": args.interval, "load_before": load_before,
           "load_after": [round(v, 2) for v in os.getloadavg()], "summary": summary, "series_ms": samples,
           "series_t_s": stamps, "command": command}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
    m = out["machine"]
    args.out.with_suffix(".md").write_text(
        f"# Timing noise floor ({m['processor']}, {m['cpu_count']} cores, {args.threads} thread(s))\n\n"
        f"Command: `{out['command']}`; load average before/after {load_before} / {out['load_after']}.\n\n"
        f"{summary['samples']} samples (each the median of {args.calls} last-exit calls at batch {args.batch}, one "
        f"every {args.interval:g} s), median {base:.2f} ms. Around that median: p10 {summary['p10']:.3f}, p90 "
        f"{summary['p90']:.3f}, min {summary['min']:.3f}, max {summary['max']:.3f}; "
        f"{100 * summary['share_beyond_5pct']:.0f}% of samples beyond +-5%.\n"
    )
    print(f"{summary}\nwrote {args.out.with_suffix('.json')} and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
