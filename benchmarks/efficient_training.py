"""Cheaper training: baseline vs EfficientTrain curriculum vs Deep Incubation, wall time, compute and accuracy.

Two settings (``--setting``):

* ``cnn`` (default) - data: a class-balanced subset of CIFAR-10 (the JPEG copy in
  ``../shared/data/cifar10-jpg.tar.gz``, extracted to ``--cifar``), upsampled once to ``--size`` pixels (default 96:
  the curriculum only saves time where a smaller input is much cheaper). Model: a 4-exit CNN (``mecnn_cifar``,
  stride-2 stages, global pooling heads). Every variant uses the same Trainer, optimizer, schedule (SGD, warm-up +
  cosine over its epochs) and the data's crop + flip.
* ``vit`` - data: a class-balanced subset of Fashion-MNIST (28 px, the Debian ``dataset-fashion-mnist`` files),
  model: the native 3-exit ViT ``vit_tiny_conv_fmnist`` (conv stem, 6 blocks of dim 64, token states between its
  segments), AdamW, warm-up + cosine, pad-2 crop + flip. Variants default to baseline, incubation and
  ``baseline_eq``: the baseline recipe with its epochs cut to the training compute incubation uses (its own full
  cosine schedule, so "baseline accuracy at equal compute" is a real short run, not a point of the long run).

Training compute: forward MACs per sample of the model being trained (every segment and exit head, from
``adaptnn.runtime.cost.cost_breakdown``) x 3 (forward + backward) x samples seen. For a hybrid (frozen meta parts
plus one target segment) this charges the frozen parts as if trained: an upper bound; ``macs_frozen_aware`` charges
frozen parts before the trained segment x 1 (forward only) and after it x 2 (no weight gradients).

* **baseline**: ``--epochs`` epochs at full size;
* **curriculum**: the same epochs, ``train.curriculum`` with stages 1/2, 2/3, 5/6 of the size and full size
  (low-pass crop; shares 1, 1, 1, 2 of the *measured* time; augmentation magnitude 0, so the only difference is
  the input size); the start-up step-time measurement is part of its wall time;
* **incubation**: the shallow meta model (``--meta-epochs``), one job per segment (``--stage-epochs`` each, run
  here one after the other in this process; the separate-process path is tested elsewhere), assembled and
  fine-tuned (``--finetune-epochs``); its cost is the sum of all phases (the jobs' compute, not their wall time).

After every epoch the last exit's test accuracy is measured (outside the timed training). Reported per seed and as
the median over seeds: final accuracy, training wall time, the time the variant needs to reach the baseline's final
accuracy (its first epoch at or above it) and the baseline's accuracy at the variant's total time (interpolated on
the baseline's per-epoch curve). Variants run one after the other within a seed, in rotating order. Threads,
CPU and load average (before and after every run) are recorded.

Usage::

    python benchmarks/efficient_training.py --per-class 200 --epochs 10 --seeds 0 1 2
    python benchmarks/efficient_training.py --setting vit --tag vit_cpu --per-class 600 --test-per-class 200 \
        --epochs 15 --meta-epochs 4 --stage-epochs 3 --finetune-epochs 4 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from adaptnn import create_model
from adaptnn.data import ArrayDataset, DataConfig
from adaptnn.data.sources import load_fashion_mnist_source
from adaptnn.data.transforms import make_transforms
from adaptnn.measure.timing import machine_info
from adaptnn.runtime.cost import cost_breakdown
from adaptnn.training import TrainConfig, Trainer
from adaptnn.training.config import CurriculumConfig
from adaptnn.training.incubation import assemble, build_meta_model, hybrid_model, train_meta, train_stage

RESULTS = Path(__file__).parent / "results"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def load_cifar(
    root: Path, per_class: int, test_per_class: int, size: int, augment: bool
) -> tuple[ArrayDataset, ArrayDataset]:
    """``per_class`` train and ``test_per_class`` test images of every class, upsampled to ``size`` (uint8)."""

    def read(split: str, n: int) -> tuple[torch.Tensor, list[int]]:
        classes = sorted(p.name for p in (root / split).iterdir())
        images, labels = [], []
        for c, name in enumerate(classes):
            for path in sorted((root / split / name).iterdir())[:n]:
                images.append(np.asarray(Image.open(path).convert("RGB")))
                labels.append(c)
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x.round().clamp(0, 255).to(torch.uint8), labels

    train_tf, eval_tf = make_transforms((size, size), MEAN, STD, augment=augment, pad=size // 8, flip=True)
    xtr, ytr = read("train", per_class)
    xte, yte = read("test", test_per_class)
    return ArrayDataset(xtr, ytr, train_tf), ArrayDataset(xte, yte, eval_tf)


def load_fmnist(per_class: int, test_per_class: int) -> tuple[ArrayDataset, ArrayDataset]:
    """The first ``per_class`` train and ``test_per_class`` test images of every Fashion-MNIST class (uint8)."""
    source = load_fashion_mnist_source(DataConfig(name="fashion_mnist"))
    train_tf, eval_tf = make_transforms((28, 28), source.mean, source.std, augment=True, pad=source.pad, flip=True)

    def pick(data: ArrayDataset, n: int, transform) -> ArrayDataset:
        x, y = data.images, torch.as_tensor(data.labels)
        keep = torch.cat([torch.nonzero(y == c).flatten()[:n] for c in range(10)]).sort().values
        return ArrayDataset(x[keep], y[keep].tolist(), transform)

    return pick(source.train, per_class, train_tf), pick(source.test, test_per_class, eval_tf)


def model(size: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("mecnn_cifar", input_size=[size, size], widths=[16, 32, 64, 128], strides=[2, 2, 2, 2], depth=1)


def vit_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("vit_tiny_conv_fmnist")


def forward_macs(net, input_shape: tuple[int, ...], trained: int | None = None) -> tuple[float, float]:
    """Per-sample forward MACs of every segment and head, and the frozen-aware training weight (see the docstring).

    Returns ``(forward, frozen_aware)``: ``3 * forward`` is the charged training cost per sample; ``frozen_aware``
    is already the per-sample training cost when only segment ``trained`` (and its heads) learn.
    """
    cost = cost_breakdown(net, input_shape)
    forward = float(sum(cost.segment_macs) + sum(cost.head_macs))
    if trained is None:
        return forward, 3 * forward
    weight = lambda j: 1 if j < trained else (3 if j == trained else 2)  # noqa: E731
    aware = sum(weight(j) * m for j, m in enumerate(cost.segment_macs))
    aware += sum(weight(net.exit_after[k]) * m for k, m in enumerate(cost.head_macs))
    return forward, float(aware)


def samples_per_epoch(n: int, batch_size: int) -> int:
    """Samples one epoch trains on (the Trainer drops the last partial batch when there is more than one)."""
    return n if n <= batch_size else (n // batch_size) * batch_size


@torch.no_grad()
def accuracy(net: torch.nn.Module, test: ArrayDataset) -> float:
    was = net.training
    net.eval()
    hits = 0
    for x, y in torch.utils.data.DataLoader(test, batch_size=250):
        hits += int((net(x).argmax(-1) == y).sum())
    net.train(was)
    return hits / len(test)


def train_timed(net, train, test, config: TrainConfig, run_dir: Path, input_shape: tuple[int, ...]) -> dict:
    """Fit with a test-accuracy probe after every epoch; the probe's time is left out of the training time.

    ``curve``: ``(seconds, accuracy)`` per epoch; ``macs_curve``: ``(training MACs so far, accuracy)``.
    """
    curve, macs_curve, probe_s = [], [], [0.0]
    per_epoch = 3 * forward_macs(net, input_shape)[0] * samples_per_epoch(len(train), config.batch_size)
    start = time.perf_counter()

    def after(trainer: Trainer) -> None:
        t0 = time.perf_counter()
        acc = accuracy(trainer.model, test)
        curve.append((t0 - start - probe_s[0], acc))
        macs_curve.append((per_epoch * len(curve), acc))
        probe_s[0] += time.perf_counter() - t0

    trainer = Trainer(net, train, config, run_dir, after_epoch=after)
    trainer.fit(resume=False)
    total = time.perf_counter() - start - probe_s[0]
    plan = trainer.curriculum.describe(len(trainer._batches(0))) if trainer.curriculum else None
    return {
        "curve": curve, "train_s": total, "final_acc": curve[-1][1], "plan": plan, "macs_curve": macs_curve,
        "train_macs": per_epoch * len(curve), "train_macs_frozen_aware": per_epoch * len(curve),
    }  # fmt: skip


def run_incubation(make, input_shape, seed, train, test, base: TrainConfig, work: Path, args) -> dict:
    """Meta model, one job per target segment (here one after the other, in this process), assembly, fine-tune."""
    target = make(seed)
    meta = build_meta_model(target, input_shape, seed=seed)
    spe = samples_per_epoch(len(train), base.batch_size)
    phases, macs, aware = {}, {}, {}
    t0 = time.perf_counter()
    train_meta(meta, train, base, work / "meta", args.meta_epochs, resume=False)
    phases["meta_s"] = time.perf_counter() - t0
    fwd, full = forward_macs(meta, input_shape)
    macs["meta"], aware["meta"] = 3 * fwd * spe * args.meta_epochs, full * spe * args.meta_epochs
    paths = []
    for i in range(len(target.segments)):
        t0 = time.perf_counter()
        job_target = make(seed)
        paths.append(
            train_stage(
                meta, job_target, i, train, base, work / f"job{i}", work / f"stage{i}.safetensors", args.stage_epochs
            )
        )
        phases[f"stage{i}_s"] = time.perf_counter() - t0
        fwd, frozen_aware = forward_macs(hybrid_model(meta, job_target, i), input_shape, trained=i)
        macs[f"stage{i}"] = 3 * fwd * spe * args.stage_epochs
        aware[f"stage{i}"] = frozen_aware * spe * args.stage_epochs
    assemble(target, paths)
    assembled_acc = accuracy(target, test)
    cfg = TrainConfig(**dict(base.__dict__, epochs=args.finetune_epochs))
    fine = train_timed(target, train, test, cfg, work / "finetune", input_shape)
    macs["finetune"], aware["finetune"] = fine["train_macs"], fine["train_macs"]
    phases["finetune_s"] = fine["train_s"]
    incubation_s = sum(v for k, v in phases.items() if k != "finetune_s")
    before = sum(v for k, v in macs.items() if k != "finetune")
    return {
        "curve": [(incubation_s + t, a) for t, a in fine["curve"]],
        "macs_curve": [(before + m, a) for m, a in fine["macs_curve"]],
        "train_s": incubation_s + fine["train_s"], "final_acc": fine["final_acc"], "phases": phases,
        "phase_macs": macs, "train_macs": sum(macs.values()), "train_macs_frozen_aware": sum(aware.values()),
        "assembled_acc": assembled_acc, "plan": None,
    }  # fmt: skip


def incubation_macs(make, input_shape, n_train: int, args) -> float:
    """Training MACs the incubation recipe will use (charged rule), computed before training (for ``baseline_eq``)."""
    target = make(0)
    meta = build_meta_model(target, input_shape)
    spe = samples_per_epoch(n_train, args.batch_size)
    total = 3 * forward_macs(meta, input_shape)[0] * spe * args.meta_epochs
    for i in range(len(target.segments)):
        total += 3 * forward_macs(hybrid_model(meta, target, i), input_shape)[0] * spe * args.stage_epochs
    return total + 3 * forward_macs(target, input_shape)[0] * spe * args.finetune_epochs


def data_pipeline_s(train: ArrayDataset, batch_size: int, repeats: int = 2) -> float:
    """Seconds of one epoch of the loader alone (decoding, per-sample transforms, collation): no model."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _batch in torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True):
            pass
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_to(curve: list, target_acc: float) -> float | None:
    return next((t for t, a in curve if a >= target_acc), None)


def acc_at(curve: list, seconds: float) -> float:
    """The baseline's accuracy at ``seconds`` (linear between epochs; 0 before the first)."""
    points = [(0.0, 0.0), *curve]
    for (t0, a0), (t1, a1) in zip(points, points[1:], strict=False):
        if seconds <= t1:
            return a0 + (a1 - a0) * (seconds - t0) / max(t1 - t0, 1e-9)
    return points[-1][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=["cnn", "vit"], default="cnn", help="see the module docstring")
    parser.add_argument("--cifar", default="/tmp/cifar10", help="extracted cifar10-jpg tree (train/, test/)")
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None, help="default: 0.05 (cnn, SGD), 1e-3 (vit, AdamW)")
    parser.add_argument("--weight-decay", type=float, default=None, help="default: 5e-4 (cnn), 0.05 (vit)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--variants", nargs="+", default=None,
        choices=["baseline", "curriculum", "incubation", "baseline_eq"],
        help="default: baseline curriculum incubation (cnn); baseline incubation baseline_eq (vit)",
    )  # fmt: skip
    parser.add_argument("--meta-epochs", type=int, default=3)
    parser.add_argument("--stage-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--tag", default="cpu")
    parser.add_argument(
        "--aug", choices=["sample", "batch"], default="sample",
        help="sample: the data's per-sample crop + flip (at full size, before the curriculum); batch: none per "
        "sample, the Trainer's batch jitter instead (after the curriculum's resize; baseline at magnitude --magnitude, "
        "curriculum growing to it)",
    )  # fmt: skip
    parser.add_argument("--magnitude", type=float, default=0.5)
    parser.add_argument("--render", help="re-summarise and re-render a saved results JSON (no training)")
    args = parser.parse_args()
    if args.render:
        report = json.loads(Path(args.render).read_text())
        report["summary"] = summarise(report["runs"])
        Path(args.render).write_text(json.dumps(report, indent=2) + "\n")
        Path(args.render).with_suffix(".md").write_text(markdown(report))
        print(markdown(report))
        return
    torch.set_num_threads(args.threads)
    vit = args.setting == "vit"
    if args.variants is None:
        args.variants = ["baseline", "incubation", "baseline_eq"] if vit else ["baseline", "curriculum", "incubation"]
    if args.lr is None:
        args.lr = 1e-3 if vit else 0.05
    if args.weight_decay is None:
        args.weight_decay = 0.05 if vit else 5e-4
    s = args.size
    if vit:
        train, test = load_fmnist(args.per_class, args.test_per_class)
        make, input_shape = vit_model, (1, 28, 28)
        data_desc = f"Fashion-MNIST {args.per_class}/class train = {len(train)}, {args.test_per_class}/class test = "
        data_desc += f"{len(test)}, 28 px"
        model_desc = "vit_tiny_conv_fmnist (native ViT: conv stem, 6 blocks dim 64, 2 heads, 3 exits)"
    else:
        train, test = load_cifar(Path(args.cifar), args.per_class, args.test_per_class, s, args.aug == "sample")
        make, input_shape = (lambda seed: model(s, seed)), (3, s, s)
        data_desc = f"CIFAR-10 (JPEG copy) {args.per_class}/class train = {len(train)}, {args.test_per_class}/class "
        data_desc += f"test = {len(test)}, upsampled 32 -> {s} px"
        model_desc = "mecnn_cifar (4 exits, widths 16-32-64-128, stride 2 per stage)"
    per_epoch_macs = 3 * forward_macs(make(0), input_shape)[0] * samples_per_epoch(len(train), args.batch_size)
    eq_epochs = max(1, round(incubation_macs(make, input_shape, len(train), args) / per_epoch_macs))
    full = input_shape[-1]
    stages = [{"size": full // 2}, {"size": 2 * full // 3}, {"size": 5 * full // 6}, {"size": None, "share": 2.0}]
    baseline_curriculum = CurriculumConfig()
    if args.aug == "batch":  # EfficientTrain: the augmentation grows with the input size
        for i, stage in enumerate(stages):
            stage["magnitude"] = round(args.magnitude * (i + 1) / len(stages), 4)
        baseline_curriculum = CurriculumConfig(stages=[{"size": None, "magnitude": args.magnitude}], balance="steps")
    data_s = data_pipeline_s(train, args.batch_size)
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    loads = []
    for n, seed in enumerate(args.seeds):
        base = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed, device="cpu", progress=False,
            warmup_epochs=1.0, weight_decay=args.weight_decay, optimizer="adamw" if vit else "sgd",
        )  # fmt: skip
        order = args.variants[n % len(args.variants) :] + args.variants[: n % len(args.variants)]
        for variant in order:
            loads.append(os.getloadavg()[0])
            with tempfile.TemporaryDirectory() as tmp:
                if variant in ("baseline", "baseline_eq"):
                    epochs = args.epochs if variant == "baseline" else eq_epochs
                    cfg = TrainConfig(**dict(base.__dict__, curriculum=baseline_curriculum, epochs=epochs))
                    out = train_timed(make(seed), train, test, cfg, Path(tmp), input_shape)
                elif variant == "curriculum":
                    cfg = TrainConfig(**dict(base.__dict__, curriculum=CurriculumConfig(stages=stages)))
                    out = train_timed(make(seed), train, test, cfg, Path(tmp), input_shape)
                else:
                    cfg = TrainConfig(**dict(base.__dict__, curriculum=baseline_curriculum))
                    out = run_incubation(make, input_shape, seed, train, test, cfg, Path(tmp), args)
            loads.append(os.getloadavg()[0])
            out["seed"] = seed
            runs[variant].append(out)
            print(
                f"seed {seed} {variant}: acc {out['final_acc']:.4f} in {out['train_s']:.1f} s, "
                f"{out['train_macs'] / 1e12:.2f} TMACs",
                flush=True,
            )
    summary = summarise(runs)
    info = machine_info("cpu")
    report = {
        "data": data_desc, "model": model_desc, "baseline_eq_epochs": eq_epochs if "baseline_eq" in args.variants
        else None, "args": vars(args), "machine": info, "load_average_1min": {"min": min(loads), "max": max(loads),
        "median": statistics.median(loads)}, "curriculum_stages": stages,
        "data_pipeline_s_per_epoch": data_s, "summary": summary, "runs": runs,
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"efficient_training_{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def summarise(runs: dict[str, list[dict]]) -> dict:
    base = {r["seed"]: r for r in runs.get("baseline", [])}
    out = {}
    for variant, items in runs.items():
        rows = []
        for r in items:
            b = base.get(r["seed"])
            row = {"seed": r["seed"], "final_acc": r["final_acc"], "train_s": r["train_s"]}
            if b is not None:
                # the recipe's own time to its final accuracy is its whole run (not an earlier epoch that touched it)
                reach = r["train_s"] if variant == "baseline" else time_to(r["curve"], b["final_acc"])
                row["time_to_baseline_acc_s"] = reach
                row["speedup_to_baseline_acc"] = None if reach is None else b["train_s"] / reach
                row["time_ratio"] = b["train_s"] / r["train_s"]
                row["baseline_acc_at_equal_time"] = acc_at(b["curve"], r["train_s"])
                if r.get("train_macs") and b.get("macs_curve"):
                    row["train_macs"] = r["train_macs"]
                    row["train_macs_frozen_aware"] = r.get("train_macs_frozen_aware")
                    row["macs_ratio"] = b["train_macs"] / r["train_macs"]
                    # a point of the baseline's long run (its lr not yet decayed there): a lower bound
                    row["baseline_acc_at_equal_macs"] = acc_at(b["macs_curve"], r["train_macs"])
                    row["acc_gap_to_baseline"] = r["final_acc"] - b["final_acc"]
            rows.append(row)

        def med(key: str, rows: list[dict] = rows) -> float:
            return statistics.median([x[key] for x in rows if x.get(key) is not None] or [float("nan")])

        out[variant] = {
            "per_seed": rows, "median_final_acc": med("final_acc"), "median_train_s": med("train_s"),
            "median_time_ratio": med("time_ratio") if base else None,
            "median_speedup_to_baseline_acc": med("speedup_to_baseline_acc") if base else None,
            "seeds_reaching_baseline_acc": sum(x.get("time_to_baseline_acc_s") is not None for x in rows),
            "median_baseline_acc_at_equal_time": med("baseline_acc_at_equal_time") if base else None,
        }  # fmt: skip
        if any("train_macs" in x for x in rows):
            out[variant].update(
                median_train_macs=med("train_macs"), median_train_macs_frozen_aware=med("train_macs_frozen_aware"),
                median_macs_ratio=med("macs_ratio"), median_acc_gap_to_baseline=med("acc_gap_to_baseline"),
                median_baseline_acc_at_equal_macs=med("baseline_acc_at_equal_macs"),
            )  # fmt: skip
    return out


def markdown(report: dict) -> str:
    m, load = report["machine"], report["load_average_1min"]
    fmt = lambda v, p="{:.3f}": "-" if v is None or v != v else p.format(v)  # noqa: E731
    model = report.get("model", "mecnn_cifar (4 exits, widths 16-32-64-128, stride 2 per stage)")
    optimizer = "AdamW" if report["args"].get("setting") == "vit" else "SGD"
    lines = [
        "# Efficient training: " + " vs ".join(report["summary"]),
        "",
        f"Data: {report['data']}. Model: {model}. {report['args']['epochs']} epochs ("
        f"{', '.join(v for v in report['summary'] if v in ('baseline', 'curriculum'))}), batch "
        f"{report['args']['batch_size']}, {optimizer} lr {report['args']['lr']}. "
        f"Machine: {m['processor']}, {m['cpu_count']} cores shared with other jobs, "
        f"torch threads {report['args']['threads']}, load average (1 min) median {load['median']:.1f} "
        f"(min {load['min']:.1f}, max {load['max']:.1f}).",
        "",
        "| variant | seeds | median final acc | median train s | baseline s / variant s | seeds reaching baseline acc "
        "| median speedup to baseline acc | baseline acc at variant's time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, s in report["summary"].items():
        lines.append(
            f"| {variant} | {len(s['per_seed'])} | {fmt(s['median_final_acc'])} | {fmt(s['median_train_s'], '{:.1f}')} "
            f"| {fmt(s['median_time_ratio'], '{:.2f}x')} | {s['seeds_reaching_baseline_acc']}/{len(s['per_seed'])} "
            f"| {fmt(s['median_speedup_to_baseline_acc'], '{:.2f}x')} | {fmt(s['median_baseline_acc_at_equal_time'])} |"
        )
    if any("median_train_macs" in s for s in report["summary"].values()):
        lines += [
            "",
            "Training compute (forward MACs per sample x 3 x samples seen; frozen-aware: frozen meta parts charged "
            "x1 before the trained segment, x2 after it):",
            "",
            "| variant | median TMACs | median TMACs frozen-aware | baseline MACs / variant MACs | median final acc "
            "- baseline (paired) | baseline run's acc at the variant's MACs |",
            "|---|---|---|---|---|---|",
        ]
        for variant, s in report["summary"].items():
            lines.append(
                f"| {variant} | {fmt(s.get('median_train_macs', 0) / 1e12, '{:.2f}')} | "
                f"{fmt((s.get('median_train_macs_frozen_aware') or 0) / 1e12, '{:.2f}')} | "
                f"{fmt(s.get('median_macs_ratio'), '{:.2f}x')} | {fmt(s.get('median_acc_gap_to_baseline'), '{:+.3f}')} "
                f"| {fmt(s.get('median_baseline_acc_at_equal_macs'))} |"
            )
        inc, eq = report["summary"].get("incubation"), report["summary"].get("baseline_eq")
        if inc and inc.get("median_macs_ratio") == inc.get("median_macs_ratio"):
            verdict = (
                f"Verdict: incubation reached the baseline's final accuracy in {inc['seeds_reaching_baseline_acc']}/"
                f"{len(inc['per_seed'])} seeds; median paired gap {inc['median_acc_gap_to_baseline']:+.3f} at "
                f"{inc['median_macs_ratio']:.2f}x less charged compute"
            )
            if eq:
                gap = inc["median_final_acc"] - eq["median_final_acc"]
                verdict += f"; against the baseline at (about) equal compute (baseline_eq) the gap is {gap:+.3f}"
            lines += ["", verdict + "."]
        if report.get("baseline_eq_epochs"):
            lines += [
                "",
                f"baseline_eq: the baseline recipe run for {report['baseline_eq_epochs']} epochs (its own warm-up + "
                "cosine), the nearest whole number of epochs to incubation's charged MACs: the baseline's accuracy "
                "at equal compute. The last column instead reads the long baseline run's per-epoch curve (learning "
                "rate not yet decayed there).",
            ]
    lines += [
        "",
        "Per seed:",
        "",
        "| variant | seed | final acc | train s | TMACs | time to baseline acc (s) |",
        "|---|---|---|---|---|---|",
    ]
    for variant, s in report["summary"].items():
        for r in s["per_seed"]:
            reach = r.get("time_to_baseline_acc_s")
            macs = "-" if r.get("train_macs") is None else f"{r['train_macs'] / 1e12:.2f}"
            lines.append(
                f"| {variant} | {r['seed']} | {r['final_acc']:.3f} | {r['train_s']:.1f} | {macs} | "
                f"{'not reached' if reach is None else f'{reach:.1f}'} |"
            )
    pipeline = report.get("data_pipeline_s_per_epoch")
    if pipeline is not None:
        aug = report["args"].get("aug", "sample")
        lines += [
            "",
            f"Data pipeline alone (loader, transforms, no model): {pipeline:.1f} s per epoch ({aug} augmentation).",
        ]
    plans = [r["plan"] for r in report["runs"].get("curriculum", []) if r.get("plan")]
    if plans:
        lines += ["", f"Curriculum plan (seed {report['runs']['curriculum'][0]['seed']}): {plans[0]}"]
    inc = report["runs"].get("incubation", [])
    if inc and "phase_macs" in inc[0]:
        names = list(inc[0]["phases"])
        lines += [
            "",
            "Incubation phases, wall s (TMACs charged); stage jobs run one after the other here (they are independent: "
            "on separate machines their wall time would be the slowest job's):",
            "",
            "| seed | " + " | ".join(names) + " | assembled acc (before fine-tune) | final acc |",
            "|---" * (len(names) + 3) + "|",
        ]
        for r in inc:
            cells = [f"{r['phases'][k]:.1f} ({r['phase_macs'][k.removesuffix('_s')] / 1e12:.2f})" for k in names]
            lines.append(
                f"| {r['seed']} | " + " | ".join(cells) + f" | {r['assembled_acc']:.3f} | {r['final_acc']:.3f} |"
            )
    elif inc:
        phases = {k: round(v, 1) for k, v in inc[0]["phases"].items()}
        lines += ["", f"Incubation phases (s, seed {inc[0]['seed']}): {phases}; assembled accuracy before fine-tuning "
                  f"{inc[0]['assembled_acc']:.3f}"]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
