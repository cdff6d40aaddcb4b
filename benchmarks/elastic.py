"""Elastic many-in-one networks on the CPU: one sorted checkpoint vs separately trained widths, member speed,
the menu's ``--budget_ms`` prediction, and per-sample layer skipping.

Parts (all in one process, ``torch.set_num_threads(--threads)``, load average recorded before and after each):

* **train**: ``elastic_cnn_mnist`` (widths x``--widths``, full depth) trained once with the ``sorted`` strategy
  (sandwich rule, one random member, in-place distillation) for ``--steps`` steps of ``--batch`` Fashion-MNIST
  images, vs one ``mecnn_mnist`` of each member's width trained with ``joint`` for the same steps (same data order,
  optimiser and schedule: the Trainer, seed 0). Test accuracy (last exit, first ``--eval`` test images) of every
  member and every separate network; wall time of the sorted run vs the sum of the separate runs.
* **steps**: one training step (forward, backward, SGD) of the sorted family vs one of each separate network, timed
  interleaved with :func:`adaptnn.measure.timing.interleaved_medians` (the Trainer wall times above are sequential
  and move with the load of a shared machine; this ratio does not). Also timed: ``separate_all``, the steps of
  all separate networks in one call, so that both sides of the main ratio are one timed call of the same work (a
  sum of the medians of short calls dodges more of a loaded machine's preemptions than the median of one long
  call). Each is timed twice, by wall clock and by this thread's CPU time (``time.thread_time``: what the step
  itself computes, not what the other processes of a shared machine take from it). ``sorted`` is the step the
  Trainer takes (one backward per member, :attr:`adaptnn.strategies.StepContext.backward`), ``sorted_summed``
  the former one backward of the summed member losses; both are also counted in minor page faults per step
  (``getrusage``, interleaved the same way) and in peak resident memory per step (``VmHWM`` reset through
  ``/proc/self/clear_refs``, minus the resident memory before the step) and in the peak of the tensors autograd
  holds for backward at once (:func:`peak_saved_mb`: the activation memory, whatever the allocator keeps).
* **speed**: the smallest and the largest member, materialised, timed interleaved at batch 64
  (:func:`adaptnn.measure.timing.interleaved_medians`).
* **menu / budget**: the menu of the sorted checkpoint (``adaptnn menu``'s :func:`build_menu`, batch 1 and 64);
  a ``--budget_ms`` between two members' times picks a member, which is then timed again in a separate
  interleaved run: predicted (menu) vs measured ms.
* **skip**: a ResNet-style body (stem + ``--skip-blocks`` basic blocks of 64 channels at 32x32) with a gate per
  block whose threshold keeps half of a calibration batch, at batch 8: dense body vs gathered skipping.

Allocator: glibc by default. ``--keep-freed-memory`` re-executes the script with glibc set to keep freed memory
(:data:`KEEP_FREED`: no heap trimming, no mmap'd blocks), glibc's analogue of the jemalloc settings of
``benchmarks/speed.py``. A sorted step holds every member's activations until its one backward, so its peak memory
is the members' sum; with glibc's defaults the memory freed after each step goes back to the OS and is
page-faulted in again on the next, which costs the sorted step more than the separate ones. Hence the Trainer's
sorted step back-propagates each member right after its forward: its peak is about one member's activations.
``--summed-too`` also trains the family with the summed backward in the **train** part (old vs new path).

Usage::

    python benchmarks/elastic.py --steps 300 --threads 1

Seeds can train in parallel processes (one core each) and be joined into one table afterwards:
``--merge results/A.json results/B.json --name C`` checks that the reports share the recipe and the CPU model
(a gap measured on another CPU's float path does not pair with these) and that no seed repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

RESULTS = Path(__file__).parent / "results"
# glibc malloc keeping freed memory: the largest mmap threshold (no block handed back by munmap) and no trimming
KEEP_FREED = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4000000000"}


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def fashion_mnist(n_train: int, val_size: int):
    from adaptnn.data import DataConfig, build_datasets

    splits = build_datasets(DataConfig(name="fashion_mnist", val_size=val_size, augment=False))
    return splits, torch.utils.data.Subset(splits.train, range(n_train))


def minor_faults() -> int:
    """Minor page faults of this thread so far (the step runs on it: ``torch.set_num_threads(1)``)."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> int:
    """Reset the process's peak resident memory (``VmHWM``) to the current one; returns the current one (KiB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def peak_rss_kb() -> int:
    """Peak resident memory (KiB) since the last :func:`reset_peak_rss`."""
    return _status_kb("VmHWM")


def peak_saved_mb(fn, *args) -> float:
    """Peak MiB of the tensors autograd holds for backward at once during ``fn(*args)`` (allocator-independent).

    Every tensor saved for backward is counted from its save until the graph releases it (a view counts its own
    elements; a tensor saved twice counts twice): the activation memory a step needs, whatever malloc keeps.
    """
    live, peak = [0], [0]

    class Saved:
        __slots__ = ("nbytes", "tensor")

        def __init__(self, tensor: Tensor) -> None:
            self.tensor, self.nbytes = tensor, tensor.numel() * tensor.element_size()
            live[0] += self.nbytes
            peak[0] = max(peak[0], live[0])

        def __del__(self) -> None:
            live[0] -= self.nbytes

    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.tensor):
        fn(*args)
    return peak[0] / 2**20


def summed_sorted(options: dict):
    """The ``sorted`` strategy with its former single backward of the summed member losses (for comparison)."""
    from adaptnn.strategies import SortedLoss

    class SummedSorted(SortedLoss):
        def training_step(self, ctx, x, y):
            return super().training_step(dataclasses.replace(ctx, backward=None), x, y)

    return SummedSorted(**options)


def train(
    model,
    train_set,
    strategy: str,
    options: dict,
    steps: int,
    batch: int,
    run_dir: Path,
    loss_fn=None,
    *,
    seed: int = 0,
    epochs: int = 1,
) -> dict[str, float]:
    """Wall and CPU seconds of this process, minor faults and peak resident memory (MiB) of one Trainer run
    (data loading in-process: no workers)."""
    from adaptnn.training import TrainConfig, Trainer

    cfg = TrainConfig(
        epochs=epochs,
        batch_size=batch,
        lr=0.05,
        warmup_epochs=0.05,
        device="cpu",
        progress=False,
        strategy=strategy,
        strategy_options=options,
        seed=seed,
    )
    rss = reset_peak_rss()
    faults, started, cpu = minor_faults(), time.perf_counter(), time.process_time()
    Trainer(model, train_set, cfg, run_dir, loss_fn=loss_fn).fit(resume=False)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    faults = minor_faults() - faults
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "minor_faults": faults,
        "peak_rss_mb": peak_rss_kb() / 1024,
        "rss_mb": rss / 1024,
    }


@torch.inference_mode()
def accuracy(model, dataset, n: int) -> float:
    from adaptnn.evaluation.logits import collect_logits

    logits, labels = collect_logits(model, torch.utils.data.Subset(dataset, range(min(n, len(dataset)))))
    return float((logits[-1].argmax(-1) == labels).float().mean())


def part_train(args, splits, train_set, tmp: Path, seed: int = 0) -> tuple[dict, object]:
    """Seed ``seed`` sets the initial weights (the same for the family and each separate network of a width) and the
    data order (the same for all of them)."""
    import adaptnn
    from adaptnn.layers.elastic import scaled

    base = (16, 32, 64, 128)
    out: dict = {"seed": seed, "load_before": load()}
    fit = {"seed": seed, "epochs": args.epochs}
    torch.manual_seed(seed)
    elastic = adaptnn.create_model("elastic_cnn_mnist", width_mults=args.widths, depths=[2])
    options = {"num_random": args.num_random, "distill": True}
    if args.summed_too:  # the former path first, from the same initial weights (a copy)
        summed = adaptnn.create_model("elastic_cnn_mnist", width_mults=args.widths, depths=[2])
        summed.load_state_dict(elastic.state_dict())
        run = train(
            summed, train_set, "sorted", options, args.steps, args.batch, tmp / "summed", summed_sorted(options), **fit
        )
        out["sorted_summed"] = run
        out["load_after_sorted_summed"] = load()
    run = train(elastic, train_set, "sorted", options, args.steps, args.batch, tmp / "sorted", **fit)
    out["sorted_wall_s"], out["sorted_cpu_s"] = run["wall_s"], run["cpu_s"]
    out["sorted_minor_faults"], out["sorted_peak_rss_mb"] = run["minor_faults"], run["peak_rss_mb"]
    out["load_after_sorted"] = load()
    if args.summed_too:
        diff = max((a - b).abs().max().item() for a, b in zip(elastic.parameters(), summed.parameters(), strict=True))
        out["sorted_vs_summed_max_weight_diff"] = diff
    members, separate, walls, cpus, faults, peaks = {}, {}, {}, {}, {}, {}
    elastic.eval()
    for v in elastic.variants:
        with elastic.use_variant(v):
            members[v.name] = accuracy(elastic, splits.test, args.eval)
    if args.summed_too:
        summed.eval()
        out["sorted_summed"]["test_acc"] = {}
        for v in summed.variants:
            with summed.use_variant(v):
                out["sorted_summed"]["test_acc"][v.name] = accuracy(summed, splits.test, args.eval)
    reused = {}
    if args.separate_from:  # the separate networks are deterministic (seed 0, same data order): reuse a run's figures
        earlier = json.loads(Path(args.separate_from).read_text())
        theirs = (earlier["steps"], earlier["batch"], earlier.get("epochs", 1), earlier["train"].get("seed", 0))
        if theirs != (args.steps, args.batch, args.epochs, seed):
            raise SystemExit(f"{args.separate_from} was run with other --steps/--batch/--epochs or seed")
        reused = {m["variant"]: m for m in earlier["train"]["members"]}
        out["separate_from"] = args.separate_from
    for w in args.widths:
        name = f"w{w:g}_d2"
        if name in reused:
            walls[name], separate[name] = reused[name]["separate_wall_s"], reused[name]["separate_test_acc"]
            cpus[name] = reused[name].get("separate_cpu_s")
            continue
        torch.manual_seed(seed)
        net = adaptnn.create_model("mecnn_mnist", widths=[scaled(c, w) for c in base])
        run = train(net, train_set, "joint", {}, args.steps, args.batch, tmp / f"sep_{w}", **fit)
        walls[name], cpus[name], faults[name], peaks[name] = (
            run["wall_s"],
            run["cpu_s"],
            run["minor_faults"],
            run["peak_rss_mb"],
        )
        separate[name] = accuracy(net.eval(), splits.test, args.eval)
        print(f"  {name}: sorted {100 * members[name]:.2f}%  separate {100 * separate[name]:.2f}%", flush=True)
    out["load_after_separate"] = load()
    out["members"] = [
        {
            "variant": name,
            "sorted_test_acc": members[name],
            "separate_test_acc": separate[name],
            "gap_pt": 100 * (members[name] - separate[name]),
            "separate_wall_s": walls[name],
            "separate_cpu_s": cpus[name],
            "separate_minor_faults": faults.get(name),
            "separate_peak_rss_mb": peaks.get(name),
        }
        for name in members
    ]
    if len(faults) == len(members):
        out["separate_minor_faults_total"] = sum(faults.values())
        out["separate_peak_rss_mb_max"] = max(peaks.values())
    if args.summed_too:
        t = out["sorted_summed"]
        t["wall_ratio_over_separate"] = t["wall_s"] / sum(walls.values())
        if all(c is not None for c in cpus.values()):
            t["cpu_ratio_over_separate"] = t["cpu_s"] / sum(cpus.values())
    out["separate_wall_s_total"] = sum(walls.values())
    out["wall_ratio_sorted_over_separate"] = out["sorted_wall_s"] / out["separate_wall_s_total"]
    if all(c is not None for c in cpus.values()):  # CPU time: what the runs computed, not what the load took
        out["separate_cpu_s_total"] = sum(cpus.values())
        out["cpu_ratio_sorted_over_separate"] = out["sorted_cpu_s"] / out["separate_cpu_s_total"]
    return out, elastic


def part_step_time(args, train_set) -> dict:
    """Training step time, sorted (one step of the family) vs each separate network, interleaved (load-robust)."""
    import adaptnn
    from adaptnn.layers.elastic import scaled
    from adaptnn.measure.timing import Timer, interleaved_medians
    from adaptnn.strategies import StepContext, get

    class ThreadCpuTimer(Timer):
        """Milliseconds of this thread's CPU time (``torch.set_num_threads(1)``: the step runs on this thread)."""

        def run(self, fn):
            start = time.thread_time()
            out = fn()
            return (time.thread_time() - start) * 1e3, out

    class MinorFaultCounter(Timer):
        """Minor page faults of one call (in place of milliseconds: the timing engine's interleaving, reused)."""

        def run(self, fn):
            start = minor_faults()
            out = fn()
            return float(minor_faults() - start), out

    torch.manual_seed(0)
    out: dict = {"load_before": load()}
    elastic = adaptnn.create_model("elastic_cnn_mnist", width_mults=args.widths, depths=[2]).train()
    nets = {
        w: adaptnn.create_model("mecnn_mnist", widths=[scaled(c, w) for c in (16, 32, 64, 128)]).train()
        for w in args.widths
    }
    sorted_loss, joint = get("sorted", num_random=args.num_random), get("joint")
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in [("sorted", elastic), *nets.items()]}
    counter = [0]

    def sorted_step(batch):  # the Trainer's step: one backward per member through ctx.backward
        x, y = batch
        opts["sorted"].zero_grad()
        counter[0] += 1
        ctx = StepContext(elastic, elastic.forward_all, 0.01, counter[0], 0, backward=Tensor.backward)
        out = sorted_loss.training_step(ctx, x, y)
        if not out.backward_done:
            out.loss.backward()
        opts["sorted"].step()

    def sorted_summed_step(batch):  # the former step: one backward of the summed member losses
        x, y = batch
        opts["sorted"].zero_grad()
        counter[0] += 1
        sorted_loss.training_step(StepContext(elastic, elastic.forward_all, 0.01, counter[0], 0), x, y).loss.backward()
        opts["sorted"].step()

    def separate_step(w):
        def fn(batch):
            x, y = batch
            opts[w].zero_grad()
            joint(nets[w].forward_all(x), y).backward()
            opts[w].step()

        return fn

    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch)
    batches = [b for _, b in zip(range(4), loader, strict=False)]
    separate = {f"w{w:g}_d2": separate_step(w) for w in args.widths}

    def separate_all(batch):
        for fn in separate.values():
            fn(batch)

    fns = {"sorted": sorted_step, "sorted_summed": sorted_summed_step, "separate_all": separate_all, **separate}
    for clock, timer in (("", Timer()), ("cpu_", ThreadCpuTimer())):
        ms = interleaved_medians(fns, batches, rounds=args.rounds, warmup_s=2.0, timer=timer)
        step = {k: statistics.median(v) for k, v in ms.items()}
        out[f"{clock}step_ms"] = step
        out[f"{clock}separate_step_ms_total"] = sum(step[k] for k in separate)
        for path in ("sorted", "sorted_summed"):
            out[f"{clock}step_ratio_{path}_over_separate"] = step[path] / out[f"{clock}separate_step_ms_total"]
            out[f"{clock}step_ratio_{path}_over_separate_all"] = step[path] / step["separate_all"]
        out[f"{clock}step_ratio_sorted_over_sorted_summed"] = step["sorted"] / step["sorted_summed"]
        out[f"load_after_{clock or 'wall_'}timing"] = load()
    faults = interleaved_medians(fns, batches, rounds=args.rounds, warmup_s=0.5, timer=MinorFaultCounter())
    out["minor_faults_per_step"] = {k: statistics.median(v) for k, v in faults.items()}
    peaks: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(args.rounds):  # peak resident memory of one call above the memory resident before it
        names = list(fns)[r % len(fns) :] + list(fns)[: r % len(fns)]
        for name in names:
            before = reset_peak_rss()
            fns[name](batches[r % len(batches)])
            peaks[name].append((peak_rss_kb() - before) / 1024)
    out["peak_rss_mb_above_before_per_step"] = {k: statistics.median(v) for k, v in peaks.items()}
    out["peak_saved_for_backward_mb_per_step"] = {k: peak_saved_mb(fn, batches[0]) for k, fn in fns.items()}
    out["load_after"] = load()
    return out


def part_speed_and_menu(args, splits, elastic) -> dict:
    from adaptnn.calibration.variants import choose_variant
    from adaptnn.cli.menu import build_menu, plot_menu
    from adaptnn.measure.timing import interleaved_medians

    out: dict = {"load_before": load()}
    val = torch.utils.data.Subset(splits.val, range(min(args.eval, len(splits.val))))
    batches = [torch.stack([splits.val[(i * 64 + j) % len(splits.val)][0] for j in range(64)]) for i in range(5)]
    plains = {v.name: elastic.materialise(v).eval() for v in (elastic.smallest, elastic.largest)}

    def call(m):
        def fn(x):
            with torch.inference_mode():
                m(x)

        return fn

    ms = interleaved_medians({k: call(m) for k, m in plains.items()}, batches, rounds=args.rounds, warmup_s=2.0)
    small, large = elastic.smallest.name, elastic.largest.name
    out["speed_b64_ms"] = {k: statistics.median(v) for k, v in ms.items()}
    out["speedup_smallest_vs_largest_b64"] = out["speed_b64_ms"][large] / out["speed_b64_ms"][small]
    rows, _ = build_menu(elastic, val, [1, 64], rounds=args.rounds, warmup_s=1.0)
    out["menu"] = rows
    plot_menu(rows, 64, RESULTS / f"{args.name}_menu.png")
    ordered = sorted(rows, key=lambda r: r["ms_b64"])
    lo, hi = ordered[len(ordered) // 2 - 1], ordered[len(ordered) // 2]
    budget = (lo["ms_b64"] * hi["ms_b64"]) ** 0.5
    chosen = choose_variant(rows, "ms_b64", budget)
    variant = next(v for v in elastic.variants if v.name == chosen["variant"])
    plain = elastic.materialise(variant).eval()
    again = interleaved_medians({"chosen": call(plain)}, batches, rounds=args.rounds, warmup_s=1.0)
    measured = statistics.median(again["chosen"])
    out["budget"] = {
        "budget_ms_b64": budget,
        "chosen": chosen["variant"],
        "predicted_ms": chosen["ms_b64"],
        "measured_ms": measured,
        "error_pct": 100 * (measured - chosen["ms_b64"]) / chosen["ms_b64"],
    }
    out["load_after"] = load()
    return out


def part_skip(args) -> dict:
    from adaptnn.layers.skip import GatedBlock, ResidualBlock, gated_blocks, record_gates
    from adaptnn.measure.timing import interleaved_medians

    torch.manual_seed(0)
    out: dict = {"load_before": load()}
    stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
    blocks = [ResidualBlock(64) for _ in range(args.skip_blocks)]
    dense = nn.Sequential(stem, *blocks).eval()
    gated = nn.Sequential(stem, *[GatedBlock(b, 64) for b in blocks]).eval()
    for g in gated_blocks(gated):
        nn.init.normal_(g.gate.fc.weight, std=1.0)
    calib = torch.randn(64, 3, 32, 32)
    with torch.no_grad():  # each block's threshold: the median logit of the calibration batch reaching it
        h = stem(calib)
        for g in gated_blocks(gated):
            g.threshold = float(g.gate(h).median())
            h = g(h)
    batches = [torch.randn(8, 3, 32, 32) for _ in range(6)]
    keep = []
    with torch.no_grad(), record_gates(gated) as records:
        for x in batches:
            gated(x)
    keep = float(torch.stack(records).float().mean())

    def call(m):
        def fn(x):
            with torch.inference_mode():
                m(x)

        return fn

    ms = interleaved_medians({"dense": call(dense), "skip": call(gated)}, batches, rounds=args.rounds, warmup_s=2.0)
    dense_ms, skip_ms = statistics.median(ms["dense"]), statistics.median(ms["skip"])
    out.update(
        {
            "batch": 8,
            "blocks": args.skip_blocks,
            "keep_fraction": keep,
            "dense_ms": dense_ms,
            "skip_ms": skip_ms,
            "speedup": dense_ms / skip_ms,
            "ideal_speedup_blocks_only": 1 / keep,
            "load_after": load(),
        }
    )
    return out


def epochs_text(res: dict) -> str:
    return f" x {res['epochs']} epochs" if res.get("epochs", 1) > 1 else ""


def seeds_markdown(res: dict) -> list[str]:
    """Per member: the gap to its separately trained network on every seed and the median over seeds."""
    runs = res["train_seeds"]
    names = [m["variant"] for m in runs[0]["members"]]
    gaps = {n: [next(m["gap_pt"] for m in run["members"] if m["variant"] == n) for run in runs] for n in names}
    seeds = [run["seed"] for run in runs]
    lines = [
        f"## Sorted checkpoint vs separately trained widths over seeds {seeds} ({res['steps']} steps of "
        f"{res['batch']}{epochs_text(res)} each)",
        "",
        "| member | " + " | ".join(f"gap seed {s} (pt)" for s in seeds) + " | median gap (pt) | median sorted acc |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    for n in names:
        accs = [next(m["sorted_test_acc"] for m in run["members"] if m["variant"] == n) for run in runs]
        cells = " | ".join(f"{g:+.2f}" for g in gaps[n])
        lines.append(f"| {n} | {cells} | {statistics.median(gaps[n]):+.2f} | {100 * statistics.median(accs):.2f}% |")
    walls = [run["wall_ratio_sorted_over_separate"] for run in runs]
    lines += ["", "Wall time sorted / separate per seed: " + ", ".join(f"{w:.2f}" for w in walls)]
    cpus = [run.get("cpu_ratio_sorted_over_separate") for run in runs]
    if all(c is not None for c in cpus):
        lines += ["", "CPU time sorted / separate per seed: " + ", ".join(f"{c:.2f}" for c in cpus)]
    loads = [run["load_before"][0] for run in runs] + [runs[-1]["load_after_separate"][0]]
    lines += ["", f"1-minute load average at each seed's start and at the end: {loads}", ""]
    return lines


def markdown(res: dict) -> str:
    lines = [f"# Elastic many-in-one networks (CPU, {res['machine']['torch_threads']} thread(s))", ""]
    lines.append(
        f"Machine: {res['machine']['processor']}, {res['machine']['cpu_count']} CPUs; command `{res['command']}`"
    )
    for part in res.get("merged_from", []):
        lines += ["", f"Merged from `{part['path']}`: `{part['command']}`"]
    lines += ["", f"Allocator: {res.get('allocator', 'glibc malloc (defaults)')}", ""]
    if len(res.get("train_seeds", [])) > 1:
        lines += seeds_markdown(res)
    if "train" in res:
        t = res["train"]
        lines += [
            f"## One sorted checkpoint vs separately trained widths ({res['steps']} steps of {res['batch']}"
            f"{epochs_text(res)}, seed {t.get('seed', 0)}, "
            f"sandwich: largest + smallest + {res.get('num_random', 1)} random member(s) per step)",
            "",
            "| member | sorted test acc | separate test acc | gap (pt) |",
            "|---|---|---|---|",
        ]
        for m in t["members"]:
            lines.append(
                f"| {m['variant']} | {100 * m['sorted_test_acc']:.2f}% | {100 * m['separate_test_acc']:.2f}% "
                f"| {m['gap_pt']:+.2f} |"
            )
        lines += [
            "",
            f"Wall time: sorted {t['sorted_wall_s']:.1f} s vs separate {t['separate_wall_s_total']:.1f} s "
            f"(ratio {t['wall_ratio_sorted_over_separate']:.2f}); load {t['load_before']} -> "
            f"{t['load_after_sorted']} -> {t['load_after_separate']}",
            "",
        ]
        if "cpu_ratio_sorted_over_separate" in t:
            lines += [
                f"CPU time of the process: sorted {t['sorted_cpu_s']:.1f} s vs separate "
                f"{t['separate_cpu_s_total']:.1f} s (ratio {t['cpu_ratio_sorted_over_separate']:.2f})",
                "",
            ]
        if "sorted_minor_faults" in t and "separate_minor_faults_total" in t:
            lines += [
                f"Minor page faults: sorted {t['sorted_minor_faults']} vs separate {t['separate_minor_faults_total']}; "
                f"peak resident memory: sorted {t['sorted_peak_rss_mb']:.0f} MiB, largest separate run "
                f"{t['separate_peak_rss_mb_max']:.0f} MiB",
                "",
            ]
        if "sorted_summed" in t:
            u = t["sorted_summed"]
            accs = ", ".join(f"{k} {100 * v:.2f}%" for k, v in u["test_acc"].items())
            lines += [
                f"Former path (one backward of the summed member losses), same run before it: wall {u['wall_s']:.1f} s "
                f"(ratio to separate {u['wall_ratio_over_separate']:.2f}), CPU {u['cpu_s']:.1f} s"
                + (f" (ratio {u['cpu_ratio_over_separate']:.2f})" if "cpu_ratio_over_separate" in u else "")
                + f", minor faults {u['minor_faults']}, peak resident memory {u['peak_rss_mb']:.0f} MiB; "
                f"test acc {accs}; largest weight difference to the per-member run "
                f"{t['sorted_vs_summed_max_weight_diff']:.2e} (load after {t['load_after_sorted_summed']})",
                "",
            ]
    if "steps_time" in res:
        st = res["steps_time"]
        for clock, label in (("", "wall clock"), ("cpu_", "thread CPU time")):
            if f"{clock}step_ms" not in st:
                continue
            steps = ", ".join(f"{k} {v:.1f}" for k, v in st[f"{clock}step_ms"].items())
            all_ratio = st.get(f"{clock}step_ratio_sorted_over_separate_all")
            after = st.get(f"load_after_{clock or 'wall_'}timing", st["load_after"])
            lines += [
                f"Training step time, interleaved, {label} (median ms per step of forward + backward + SGD): "
                f"{steps}; sorted / sum of separate = {st[f'{clock}step_ratio_sorted_over_separate']:.3f}"
                + ("" if all_ratio is None else f", sorted / separate_all = {all_ratio:.3f}")
                + (
                    ""
                    if f"{clock}step_ratio_sorted_over_sorted_summed" not in st
                    else f"; former summed backward: sorted_summed / separate_all = "
                    f"{st[f'{clock}step_ratio_sorted_summed_over_separate_all']:.3f}, sorted / sorted_summed = "
                    f"{st[f'{clock}step_ratio_sorted_over_sorted_summed']:.3f}"
                )
                + f" (load {st['load_before']} -> {after})",
                "",
            ]
        if "minor_faults_per_step" in st:
            faults = ", ".join(f"{k} {v:.0f}" for k, v in st["minor_faults_per_step"].items())
            peaks = ", ".join(f"{k} {v:.1f}" for k, v in st["peak_rss_mb_above_before_per_step"].items())
            lines += [
                f"Minor page faults per step (median, interleaved): {faults}",
                "",
                f"Peak resident memory of one step above the memory resident before it (MiB, median): {peaks}",
                "",
            ]
        if "peak_saved_for_backward_mb_per_step" in st:
            saved = ", ".join(f"{k} {v:.1f}" for k, v in st["peak_saved_for_backward_mb_per_step"].items())
            lines += [f"Peak memory of the tensors saved for backward at once, per step (MiB): {saved}", ""]
    if "speed" in res:
        s = res["speed"]
        lines += [
            "## Member speed and the menu",
            "",
            f"Smallest vs largest at batch 64: {s['speed_b64_ms']} ms -> speed-up "
            f"{s['speedup_smallest_vs_largest_b64']:.2f}x (load {s['load_before']} -> {s['load_after']})",
            "",
            "| variant | val acc | MMACs | ms@1 | ms@64 | Pareto (ms@64) |",
            "|---|---|---|---|---|---|",
        ]
        for r in sorted(s["menu"], key=lambda r: r["macs"]):
            lines.append(
                f"| {r['variant']} | {100 * r['accuracy']:.2f}% | {r['macs'] / 1e6:.3f} | {r['ms_b1']:.3f} "
                f"| {r['ms_b64']:.3f} | {'*' if r['pareto_ms_b64'] else ''} |"
            )
        b = s["budget"]
        lines += [
            "",
            f"--budget_ms {b['budget_ms_b64']:.3f} (batch 64) -> {b['chosen']}: predicted {b['predicted_ms']:.3f} ms, "
            f"measured again {b['measured_ms']:.3f} ms ({b['error_pct']:+.1f}%)",
            "",
        ]
    if "skip" in res:
        k = res["skip"]
        lines += [
            "## Per-sample layer skipping (ResNet-style body, batch 8)",
            "",
            f"{k['blocks']} gated basic blocks (64 ch, 32x32), keep fraction {k['keep_fraction']:.3f}: dense "
            f"{k['dense_ms']:.2f} ms, skipping {k['skip_ms']:.2f} ms -> {k['speedup']:.2f}x "
            f"(blocks-only ideal {k['ideal_speedup_blocks_only']:.2f}x; load {k['load_before']} -> {k['load_after']})",
            "",
        ]
    return "\n".join(lines)


MERGE_KEYS = ("steps", "batch", "epochs", "num_random")


def _is_train_run(run: object) -> bool:
    """A train part's record of one seed, as far as the merge reads it."""
    if not isinstance(run, dict) or not isinstance(run.get("seed"), int) or not isinstance(run.get("members"), list):
        return False
    return all(isinstance(m, dict) and isinstance(m.get("variant"), str) for m in run["members"])


def merge_reports(paths: list[str]) -> dict:
    """One report holding the train part of every report in ``paths``, its seeds in order.

    Refuses (one line) a report that is unreadable or has no train part, reports of different recipes
    (:data:`MERGE_KEYS`) or members, different CPU models, and a seed trained twice.
    """
    reports = []
    for path in paths:
        try:
            report = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise SystemExit(f"--merge: {path} is not a readable JSON report ({err})") from None
        runs = report.get("train_seeds") if isinstance(report, dict) else None
        if not isinstance(runs, list) or not runs or not all(_is_train_run(r) for r in runs):
            raise SystemExit(
                f"--merge: {path} has no train part (train_seeds, each with an integer seed and members that name "
                "their variant); expected a report of --parts train"
            )
        machine = report.get("machine")
        if not isinstance(machine, dict) or not {"processor", "cpu_count", "torch_threads"} <= machine.keys():
            raise SystemExit(f"--merge: {path} has no machine entry (processor, cpu_count, torch_threads)")
        reports.append(report)
    first = reports[0]
    members = [m["variant"] for m in first["train_seeds"][0]["members"]]
    for path, report in zip(paths[1:], reports[1:], strict=True):
        for key in MERGE_KEYS:
            if report.get(key) != first.get(key):
                raise SystemExit(f"--merge: {path} has {key} {report.get(key)!r}, {paths[0]} has {first.get(key)!r}")
        if report["machine"].get("processor") != first["machine"].get("processor"):
            raise SystemExit(
                f"--merge: {path} ran on {report['machine'].get('processor')!r}, {paths[0]} on "
                f"{first['machine'].get('processor')!r}; gaps pair only on one CPU model"
            )
        theirs = [m["variant"] for m in report["train_seeds"][0]["members"]]
        if theirs != members:
            raise SystemExit(f"--merge: {path} has members {theirs}, {paths[0]} has {members}")
    runs = sorted((run for report in reports for run in report["train_seeds"]), key=lambda run: run["seed"])
    seeds = [run["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--merge: a seed appears twice among {seeds}")
    merged = {key: first[key] for key in ("machine", "allocator", *MERGE_KEYS) if key in first}
    merged["merged_from"] = [
        {"path": path, "command": r.get("command", "?")} for path, r in zip(paths, reports, strict=True)
    ]
    merged["train_seeds"], merged["train"] = runs, runs[0]
    return merged


def seed_list(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; anything else is refused by the parser with one line."""
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per epoch (of --batch images)")
    parser.add_argument("--epochs", type=int, default=1, help="train part: epochs over the --steps x --batch images")
    parser.add_argument(
        "--seeds", type=seed_list, default="0", help="train part: comma-separated seeds (weights and data order)"
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num-random", type=int, default=1, help="random members per step besides the ends")
    parser.add_argument("--widths", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--eval", type=int, default=5000, help="test/val images for accuracy")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-blocks", type=int, default=6)
    parser.add_argument("--parts", nargs="+", default=["train", "speed", "steps", "skip"])
    parser.add_argument("--name", default="elastic_cpu")
    parser.add_argument("--separate-from", default=None, help="reuse the separate networks of an earlier results JSON")
    parser.add_argument("--keep-freed-memory", action="store_true", help="re-run with glibc keeping freed memory")
    parser.add_argument("--summed-too", action="store_true", help="train part: also the former summed backward")
    parser.add_argument("--merge", nargs="+", default=None, help="join these reports' train parts into --name")
    args = parser.parse_args(argv)
    if args.merge:
        merged = merge_reports(args.merge)
        merged["command"] = " ".join(["python", sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
        try:
            text = markdown(merged)
        except (KeyError, TypeError, ValueError) as err:  # a report is data: a field missing is one line
            raise SystemExit(
                f"--merge: a report lacks a field the table needs or holds the wrong type: {err!r}"
            ) from None
        save(merged, args.name)
        print(text)
        return 0
    if args.keep_freed_memory and any(os.environ.get(k) != v for k, v in KEEP_FREED.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, **KEEP_FREED))
    torch.set_num_threads(args.threads)
    from adaptnn.measure.timing import machine_info

    res: dict = {"command": " ".join(["python", *sys.argv]), "machine": machine_info(), "steps": args.steps}
    res["batch"] = args.batch
    res["num_random"] = args.num_random
    kept = {k: os.environ[k] for k in KEEP_FREED if k in os.environ}
    res["allocator"] = f"glibc malloc ({', '.join(f'{k}={v}' for k, v in kept.items()) or 'defaults'})" + (
        ""
        if kept
        else "; the train part's Trainer keeps freed memory itself (adaptnn.training.device.keep_freed_memory)"
    )
    if {"train", "speed", "steps"} & set(args.parts):
        splits, train_set = fashion_mnist(args.steps * args.batch, 5000)
    res["epochs"] = args.epochs
    if "train" in args.parts or "speed" in args.parts:
        seeds = args.seeds
        res["train_seeds"] = []
        for seed in seeds:  # saved after every seed: a long multi-seed run keeps what it finished
            with tempfile.TemporaryDirectory() as tmp:
                out, model = part_train(args, splits, train_set, Path(tmp), seed)
            res["train_seeds"].append(out)
            if seed == seeds[0]:
                res["train"], elastic = out, model  # the menu and speed parts use the first seed's family
            print(json.dumps(out["members"], indent=1), flush=True)
            save(res, args.name)
        if "speed" in args.parts:
            res["speed"] = part_speed_and_menu(args, splits, elastic)
    if "steps" in args.parts:
        res["steps_time"] = part_step_time(args, train_set)
    if "skip" in args.parts:
        res["skip"] = part_skip(args)
    save(res, args.name)
    print(markdown(res))
    return 0


def save(res: dict, name: str) -> None:
    """``results/<name>.json`` and ``.md``, each written whole to a temporary file and renamed over the old one."""
    RESULTS.mkdir(exist_ok=True)
    for suffix, text in ((".json", json.dumps(res, indent=1) + "\n"), (".md", markdown(res) + "\n")):
        tmp = RESULTS / f".{name}{suffix}.tmp"
        tmp.write_text(text)
        os.replace(tmp, RESULTS / f"{name}{suffix}")


if __name__ == "__main__":
    sys.exit(main())
