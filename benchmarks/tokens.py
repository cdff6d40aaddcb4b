"""Token reduction (ToMe, EViT) on CPU: MACs, measured ms per batch size, accuracy, and exits vs tokens vs both.

Parts (``--parts``, results merged into one JSON so parts can be run separately):

* ``knobs``: on a trained conv-stem ViT run (``--run_dir``, e.g. from ``src/adaptnn/configs/vit_fmnist.yaml``), per
  method and knob: last-exit MACs, ms at batch 1 / 64 / 256 measured interleaved with the unreduced model
  (:func:`adaptnn.measure.timing.interleaved_medians`), speed-up, realised/MACs-ideal ratio, test accuracy.
  The model has 49 patch tokens and 6 blocks, so ViT-B/16's ToMe ``r`` in {4, 8, 13, 16} (196 tokens, 12 blocks:
  removing 24/49/80/98% of the tokens by the last block) maps to ``r`` in {2, 4, 6, 8} here.
* ``joint``: exits alone vs tokens alone vs both at equal accuracy (validation accuracy within ``--tolerance`` of
  the full model): the knob and thresholds are chosen by :func:`adaptnn.calibration.calibrate_knob_and_exits`
  over a grid of budgets, in MACs and in ms (per-knob latency profiles at the batch size); then timed for real
  (``run_dynamic``) on the test split, interleaved, with the latency model's prediction next to the measurement.
* ``vits``: a random-weight ViT-S/16 (= DeiT-S shape) at 224x224, ToMe r=13 vs none, batch 1 and 64.
* ``graphs`` (``--device cuda``): CUDA graphs captured per (knob, bucket) (:class:`adaptnn.runtime.GraphedModel`,
  buckets ``--graph_batches``) for the trained ViT's knobs and a random-weight ViT-S/16's; the full model's ms,
  eager and graphed, at each bucket, timed interleaved with CUDA synchronisation; graphed vs eager outputs compared.
  Inputs are random (a fixed knob fixes every shape, so the time does not depend on the pixels); accuracy is the
  ``knobs`` part's. ViT-S/16 also runs ToMe r=13 without proportional attention (the attention bias's share of
  ToMe's overhead) and the *token floor*: the unreduced ViT-S/16 at smaller images (197 / 122 / 50 tokens), the
  most any token reduction can save at each batch size. On a CPU the part runs the graphs' CPU emulation (a smoke
  test, not a figure).

    python benchmarks/tokens.py --run_dir runs/vit_fmnist --threads 1
    python benchmarks/tokens.py --run_dir runs/vit_fmnist --parts graphs --device cuda \
        --out benchmarks/results/tokens_cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from adaptnn.calibration import calibrate_knob_and_exits
from adaptnn.data import build_datasets
from adaptnn.errors import BudgetError
from adaptnn.evaluation.logits import collect_logits
from adaptnn.layers.tokens import TokenKnob, set_token_knob
from adaptnn.measure.latency import profile_latency
from adaptnn.measure.timing import interleaved_medians, machine_info
from adaptnn.models import load_model
from adaptnn.policies import ConfidencePolicy
from adaptnn.runs.config import load_config
from adaptnn.runtime.cost import exit_macs

RESULTS = Path(__file__).resolve().parent / "results"
VIT_B_R = {2: 4, 4: 8, 6: 13, 7: 14, 8: 16}  # this model's r -> the ViT-B/16 r removing the same share of tokens


def knob_list() -> list[TokenKnob]:
    return [
        TokenKnob(),
        *(TokenKnob("tome", r) for r in VIT_B_R),
        *(TokenKnob("evit", k) for k in (0.9, 0.7, 0.5)),
    ]


def stack(ds, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(ds) if n is None else min(n, len(ds))
    xs, ys = zip(*(ds[i] for i in range(n)), strict=True)
    return torch.stack(xs), torch.as_tensor(ys)


def batches_of(x: torch.Tensor, size: int, count: int) -> list[torch.Tensor]:
    return [x[(torch.arange(size) + i * size) % x.shape[0]] for i in range(count)]


def timed_forward(models: dict[str, torch.nn.Module], x: torch.Tensor, size: int, count: int, rounds: int):
    """Per-knob total ms over ``count`` batches of ``size`` (forward of the full model), interleaved."""
    variants = {k: (lambda b, m=m: m(b)) for k, m in models.items()}
    with torch.inference_mode():
        med = interleaved_medians(variants, batches_of(x, size, count), rounds=rounds, warmup_s=1.0)
    return {k: float(np.sum(v)) / count for k, v in med.items()}


def part_knobs(args, out: dict) -> dict:
    config = load_config(args.run_dir / "config.yaml")
    ckpt = args.checkpoint or args.run_dir / "model.safetensors"
    model = load_model(ckpt).eval()
    splits = build_datasets(config.data)
    if args.limit:  # smoke runs: the first samples of each split only
        splits.val, splits.test = Subset(splits.val, range(args.limit)), Subset(splits.test, range(args.limit))
    if args.val_limit:  # calibration on part of the validation split (time)
        splits.val = Subset(splits.val, range(min(args.val_limit, len(splits.val))))
    shape = tuple(model.input_spec.shape)
    models = {}
    rows = []
    val_x, val_y = stack(splits.val)
    test_x, test_y = stack(splits.test)
    cache = {}
    for knob in knob_list():
        m = set_token_knob(copy.deepcopy(model), knob).eval()
        models[knob.label()] = m
        t0 = time.perf_counter()
        vl, _ = collect_logits(m, splits.val, batch_size=256, device="cpu", progress=False, desc="val")
        tl, _ = collect_logits(m, splits.test, batch_size=256, device="cpu", progress=False, desc="test")
        cache[knob.label()] = (vl, tl)
        macs = exit_macs(m, shape)
        rows.append(
            {
                "knob": knob.label(),
                "method": knob.method,
                "value": knob.value,
                "vit_b_equivalent_r": VIT_B_R.get(int(knob.value)) if knob.method == "tome" else None,
                "exit_macs": macs,
                "macs": macs[-1],
                "val_accuracy": float((vl[-1].argmax(-1) == val_y).float().mean()),
                "test_accuracy": float((tl[-1].argmax(-1) == test_y).float().mean()),
                "exit_test_accuracy": [float((t.argmax(-1) == test_y).float().mean()) for t in tl],
            }
        )
        print(
            f"{knob.label():12s} MACs {macs[-1] / 1e6:7.2f}M  test acc {rows[-1]['test_accuracy']:.4f}  "
            f"({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
    for size, count in ((1, 32), (64, 8), (256, 4)):
        ms = timed_forward(models, test_x, size, count, args.rounds)
        for row in rows:
            row[f"ms_b{size}"] = ms[row["knob"]]
        print(f"batch {size}: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()), flush=True)
    base = rows[0]
    for row in rows:
        row["macs_ratio"] = base["macs"] / row["macs"]
        row["accuracy_drop_pt"] = 100 * (base["test_accuracy"] - row["test_accuracy"])
        for size in (1, 64, 256):
            row[f"speedup_b{size}"] = base[f"ms_b{size}"] / row[f"ms_b{size}"]
            row[f"realised_over_ideal_b{size}"] = row[f"speedup_b{size}"] / row["macs_ratio"]
    out["knobs"] = {"run_dir": str(args.run_dir), "checkpoint": str(ckpt), "rows": rows}
    out["_cache"] = (models, cache, (val_x, val_y), (test_x, test_y), shape)
    return out


def _cheapest(options: dict, val_y: torch.Tensor, target: float, unit: str) -> dict | None:
    """Smallest budget (geometric grid) whose jointly chosen point reaches ``target`` validation accuracy."""
    policy = ConfidencePolicy([math.inf] * (next(iter(options.values()))[0].shape[0] - 1))
    lo = min(float(c[0]) for _, c in options.values())
    hi = max(float(c[-1]) for _, c in options.values())
    for budget in np.geomspace(lo, hi, 60):
        try:
            res = calibrate_knob_and_exits(policy, options, val_y, float(budget) * (1 + 1e-9), unit=unit)
        except BudgetError:
            continue
        if res.val["accuracy"] >= target:
            return {
                "budget": float(budget),
                "knob": res.details["knob"],
                "thresholds": res.thresholds,
                "val_accuracy": res.val["accuracy"],
                "val_avg_cost": res.val["avg_cost"],
                "policy": res.policy,
            }
    return None


def part_joint(args, out: dict) -> dict:
    models, cache, (val_x, val_y), (test_x, test_y), shape = out["_cache"]
    rows = {r["knob"]: r for r in out["knobs"]["rows"]}
    target = rows["none"]["val_accuracy"] - args.tolerance
    results = []
    for size in (1, 64):
        # per-knob latency profile at this batch size: the token count as one more axis of the latency model
        lat = {}
        for label, m in models.items():
            sizes = (1,) if size == 1 else (1, 8, 32, size)
            lm = profile_latency(m, val_x[:512], batch_sizes=sizes, repeats=args.profile_repeats, warmup_s=0.3)
            lat[label] = lm
        for unit in ("MACs", "ms"):

            def costs(label: str, unit: str = unit, lat: dict = lat, size: int = size) -> list[float]:
                if unit == "MACs":
                    return rows[label]["exit_macs"]
                # the profiles are measured one knob after the other, so load drift between them would bias the
                # choice: anchor each to the interleaved full-model time of its knob (same batches, same moment)
                scale = rows[label][f"ms_b{size}"] / lat[label].predict_full(size)
                return [scale * c for c in lat[label].exit_latency_ms(size)]

            modes = {
                "exits": {"none": (cache["none"][0], costs("none"))},
                "both": {k: (cache[k][0], costs(k)) for k in models},
            }
            # tokens alone: every sample at the last exit (the logits of the last exit at every position)
            modes["tokens"] = {
                k: (cache[k][0][-1:].repeat(len(cache[k][0]), 1, 1), [costs(k)[-1]] * len(cache[k][0])) for k in models
            }
            chosen = {name: _cheapest(opts, val_y, target, unit) for name, opts in modes.items()}
            count = 48 if size == 1 else 6  # timed batches: the first count * size test images
            variants, info = {"full": (lambda b, m=models["none"]: m(b))}, {}
            for name, ch in chosen.items():
                if ch is None:
                    continue
                m = models[ch["knob"]]
                if name == "tokens":  # tokens alone: the plain reduced model, every sample to the last exit
                    ch["policy"] = ConfidencePolicy([math.inf] * (m.num_exits - 1))
                    variants[name] = lambda b, m=m: m(b)
                else:
                    variants[name] = lambda b, m=m, pol=ch["policy"]: m.run_dynamic(b, pol, check_finite=False)
                pol = ch["policy"]
                with torch.inference_mode():
                    dyn = m.run_dynamic(test_x, pol)
                acc = float((dyn.logits.argmax(-1) == test_y).float().mean())
                fr = np.bincount(dyn.exit_index.numpy(), minlength=m.num_exits) / len(test_y)
                lm = lat[ch["knob"]]
                # the timed batches, each predicted from its own exit counts (what `calibrate --budget_ms` holds to)
                timed = dyn.exit_index[torch.arange(count * size) % len(test_y)]
                pred_ms = lm.predict_full(size) if name == "tokens" else lm.predict_batches(timed, size)
                info[name] = {k: v for k, v in ch.items() if k != "policy"} | {
                    "test_accuracy": acc,
                    "test_avg_macs": float(dyn.macs.mean()),
                    "exit_fractions": fr.tolist(),
                    "predicted_ms_per_batch": float(pred_ms),
                }
            with torch.inference_mode():
                med = interleaved_medians(variants, batches_of(test_x, size, count), rounds=args.rounds, warmup_s=1.0)
            ms = {k: float(np.mean(v)) for k, v in med.items()}
            for name in info:
                info[name]["measured_ms_per_batch"] = ms[name]
                info[name]["speedup_vs_full"] = ms["full"] / ms[name]
                info[name]["predicted_over_measured"] = info[name]["predicted_ms_per_batch"] / ms[name]
            full_pred = lat["none"].predict_full(size)
            results.append(
                {
                    "batch": size,
                    "unit": unit,
                    "full_ms_per_batch": ms["full"],
                    "full_predicted_ms": full_pred,
                    "modes": info,
                }
            )
            print(
                f"joint b{size} {unit}: full {ms['full']:.2f} ms; "
                + "; ".join(
                    f"{n} {v['knob']} {v['measured_ms_per_batch']:.2f} ms acc {v['test_accuracy']:.4f}"
                    for n, v in info.items()
                ),
                flush=True,
            )
    out["joint"] = {"tolerance": args.tolerance, "target_val_accuracy": target, "rows": results}
    return out


def part_vits(args, out: dict) -> dict:
    models = {k.label(): set_token_knob(_vits(), k).eval() for k in (TokenKnob(), TokenKnob("tome", 13))}
    macs = {k: exit_macs(m, (3, 224, 224))[-1] for k, m in models.items()}
    x = torch.randn(64, 3, 224, 224)
    rows = []
    for size, count in ((1, 8), (64, 1)):
        ms = timed_forward(models, x, size, count, args.vits_rounds)
        rows.append({"batch": size, "ms": ms, "speedup": ms["none"] / ms["tome_r13"]})
        print(f"ViT-S/16 b{size}: {ms}", flush=True)
    out["vits"] = {
        "model": "vit_small_patch16_224 (random weights)",
        "macs": macs,
        "macs_ratio": macs["none"] / macs["tome_r13"],
        "rows": rows,
    }
    return out


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VITS_GRAPH_KNOBS = (
    TokenKnob(),
    TokenKnob("tome", 8),
    TokenKnob("tome", 13),
    TokenKnob("tome", 16),
    TokenKnob("evit", 0.7),
)
# ToMe r=13 without proportional attention: splits ToMe's own overhead into the merges and the attention bias
VITS_NO_PROPORTIONAL = TokenKnob("tome", 13)
# the unreduced ViT-S/16 at smaller images: 197 / 122 / 50 tokens. ToMe r=13 carries 119 tokens on average over the
# 12 blocks, so the 176 px model's time is what ToMe r=13 could take with merges that cost nothing
FLOOR_IMAGE_SIZES = (224, 176, 112)


def _set_proportional(model: torch.nn.Module, on: bool) -> torch.nn.Module:
    from adaptnn.layers.tokens import TokenBlock

    for block in model.modules():
        if isinstance(block, TokenBlock):
            block.proportional = on
    return model


def _vits(image_size: int = 224) -> torch.nn.Module:
    """The random-weight ViT-S/16 (seed 0) as a token-reducible staged model at ``image_size``."""
    import timm

    from adaptnn.adapters.vit_tokens import token_vit

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=1000, img_size=image_size)
    return token_vit(vit.eval(), verify=False)


def part_graphs(args, out: dict) -> dict:
    from adaptnn.measure.timing import Timer
    from adaptnn.runtime import GraphedModel

    device = torch.device(args.device)
    sizes = sorted(set(args.graph_batches))
    dtype = DTYPES[args.dtype]
    timer = Timer(device)
    sets = []
    ckpt = args.checkpoint or args.run_dir / "model.safetensors"
    if ckpt.exists():
        trained = load_model(ckpt).eval()
        knobs = [(k.label(), k, True) for k in knob_list()]
        sets.append((f"trained ViT ({args.run_dir})", trained, tuple(trained.input_spec.shape), knobs))
    vits_variants = [(k.label(), k, True) for k in VITS_GRAPH_KNOBS]
    vits_variants.append((f"{VITS_NO_PROPORTIONAL.label()}_noprop", VITS_NO_PROPORTIONAL, False))
    sets.append(("vit_small_patch16_224 (random weights)", _vits(), (3, 224, 224), vits_variants))
    models = []
    for name, base, shape, knobs in sets:
        x = torch.randn(max(sizes) + 8, *shape, device=device, dtype=dtype)
        rows, variants = [], {}
        for label, knob, proportional in knobs:
            m = _set_proportional(set_token_knob(copy.deepcopy(base), knob), proportional).eval().to(device, dtype)
            t0 = time.perf_counter()
            g = GraphedModel(m, x[:8], buckets=sizes)
            capture_s = time.perf_counter() - t0
            with torch.inference_mode():
                probe = x[: min(64, max(sizes))]
                diff = float((g(probe) - m(probe)).abs().max())
            macs = exit_macs(m, shape, dtype=dtype)[-1]
            rows.append({"knob": label, "method": knob.method, "value": knob.value, "proportional": proportional,
                         "macs": macs,
                         "capture_s": capture_s, "graphs_vs_eager_max_abs_diff": diff, "ms": {}})  # fmt: skip
            variants[f"{label}|eager"], variants[f"{label}|graphs"] = m, g
            print(f"{name} {label}: captured {len(sizes)} buckets in {capture_s:.1f} s, max |graphs - eager| "
                  f"{diff:.2e}", flush=True)  # fmt: skip
        for size in sizes:
            count = max(1, min(16, 256 // size))
            batches = batches_of(x, size, count)
            with torch.inference_mode():
                med = interleaved_medians(variants, batches, rounds=args.rounds, warmup_s=1.0, timer=timer)
            for row in rows:
                row["ms"][str(size)] = {
                    mode: float(np.median(med[f"{row['knob']}|{mode}"])) for mode in ("eager", "graphs")
                }
            per = [f"{r['knob']} {r['ms'][str(size)]['eager']:.2f}/{r['ms'][str(size)]['graphs']:.2f}" for r in rows]
            print(f"  batch {size} (ms eager/graphs): " + ", ".join(per), flush=True)
        base_row = rows[0]
        for row in rows:
            row["macs_ratio"] = base_row["macs"] / row["macs"]
            row["speedup_graphs"] = {b: base_row["ms"][b]["graphs"] / row["ms"][b]["graphs"] for b in row["ms"]}
            row["speedup_eager"] = {b: base_row["ms"][b]["eager"] / row["ms"][b]["eager"] for b in row["ms"]}
            row["graphs_over_eager_speedup"] = {b: row["ms"][b]["eager"] / row["ms"][b]["graphs"] for b in row["ms"]}
        tome = [r for r in rows if r["method"] == "tome"]
        b1 = str(sizes[0])
        models.append({
            "model": name,
            "input_shape": list(shape),
            "rows": rows,
            "acceptance": {
                f"tome_graphed_b{b1}_ms_over_none_graphed": {r["knob"]: 1 / r["speedup_graphs"][b1] for r in tome},
                f"tome_graphed_b{b1}_no_slower_than_none": all(r["speedup_graphs"][b1] >= 1.0 for r in tome),
            },
        })  # fmt: skip
    out["graphs"] = {"device": str(device), "gpu": machine_info(device).get("gpu"), "batch_sizes": sizes,
                     "dtype": args.dtype, "rounds": args.rounds, "models": models,
                     "token_floor": token_floor(device, dtype, sizes, args.rounds, timer)}  # fmt: skip
    return out


def token_floor(device: torch.device, dtype: torch.dtype, sizes: list[int], rounds: int, timer) -> dict:
    """How the *unreduced* ViT-S/16's graphed time falls with its token count, per batch size.

    The most any token reduction can save at a batch size: a model that carries fewer tokens from the start, with
    no merge or ranking work at all. Where it barely falls (a GPU at batch 1 is launch- and latency-bound), a
    reduction can only add time.
    """
    from adaptnn.runtime import GraphedModel

    graphs, inputs, rows = {}, {}, []
    for px in FLOOR_IMAGE_SIZES:
        model = _vits(px).to(device, dtype)
        x = torch.randn(max(sizes) + 8, 3, px, px, device=device, dtype=dtype)
        graphs[px], inputs[px] = GraphedModel(model, x[:8], buckets=sizes), x
        tokens = (px // 16) ** 2 + 1
        rows.append({"image_size": px, "tokens": tokens, "macs": exit_macs(model, (3, px, px), dtype=dtype)[-1],
                     "ms": {}})  # fmt: skip
    for size in sizes:
        count = max(1, min(16, 256 // size))
        per_image = {px: batches_of(x, size, count) for px, x in inputs.items()}
        batches = [{px: b[i] for px, b in per_image.items()} for i in range(count)]
        variants = {str(px): (lambda xs, px=px: graphs[px](xs[px])) for px in graphs}
        with torch.inference_mode():
            med = interleaved_medians(variants, batches, rounds=rounds, warmup_s=1.0, timer=timer)
        for row in rows:
            row["ms"][str(size)] = float(np.median(med[str(row["image_size"])]))
        print(f"  token floor, batch {size} (graphed ms by tokens): "
              + ", ".join(f"{r['tokens']} {r['ms'][str(size)]:.3f}" for r in rows), flush=True)  # fmt: skip
    for row in rows:
        row["speedup_over_full_tokens"] = {b: rows[0]["ms"][b] / row["ms"][b] for b in row["ms"]}
    return {"model": "vit_small_patch16 (random weights, unreduced)", "rows": rows}


def _graphs_markdown(g: dict, lines: list[str]) -> None:
    emulated = g["device"] == "cpu"
    lines += [f"## CUDA graphs per (knob, bucket) on {g.get('gpu') or g['device']}"
              + (" (CPU emulation: a smoke test, not a figure)" if emulated else ""), "", _part_line(g), "",
              f"Full model, {g.get('dtype', 'fp32')}, ms per batch: eager / graphed (median of interleaved calls, "
              "CUDA synchronised); speed-up: the unreduced model's graphed ms over the knob's.", ""]  # fmt: skip
    for m in g["models"]:
        sizes = [str(b) for b in g["batch_sizes"]]
        lines += [f"### {m['model']}", "",
                  "| knob | MMACs | MACs ratio | " + " | ".join(f"b{b} eager / graphs ms | b{b} speed-up (graphs)"
                                                                for b in sizes) + " | max abs diff |",
                  "|---|---|---|" + "---|---|" * len(sizes) + "---|"]  # fmt: skip
        for r in m["rows"]:
            cells = " | ".join(f"{r['ms'][b]['eager']:.3f} / {r['ms'][b]['graphs']:.3f} | {r['speedup_graphs'][b]:.2f}"
                               for b in sizes)  # fmt: skip
            lines.append(f"| {r['knob']} | {r['macs'] / 1e6:.1f} | {r['macs_ratio']:.2f} | {cells} | "
                         f"{r['graphs_vs_eager_max_abs_diff']:.1e} |")  # fmt: skip
        acc = m["acceptance"]
        lines += ["", "Acceptance: " + "; ".join(f"{k}: {v}" for k, v in acc.items()), ""]
    floor = g.get("token_floor")
    if floor:
        sizes = [str(b) for b in g["batch_sizes"]]
        lines += ["### Token floor: the unreduced ViT-S/16 at fewer tokens (smaller images), graphed", "",
                  "What any token reduction could save at most at each batch size (fewer tokens from the start, no "
                  "merge work). ToMe r=13 carries 119 tokens on average over the 12 blocks (~ the 176 px model).", "",
                  "| image | tokens | MMACs | " + " | ".join(f"b{b} ms | b{b} speed-up" for b in sizes) + " |",
                  "|---|---|---|" + "---|---|" * len(sizes)]  # fmt: skip
        for r in floor["rows"]:
            cells = " | ".join(f"{r['ms'][b]:.3f} | {r['speedup_over_full_tokens'][b]:.2f}" for b in sizes)
            lines.append(f"| {r['image_size']} | {r['tokens']} | {r['macs'] / 1e6:.0f} | {cells} |")
        lines.append("")


def _part_line(part: dict) -> str:
    return (
        f"Measured with `{part.get('command')}`; load average before/after: {part.get('loadavg_before')} / "
        f"{part.get('loadavg_after')}."
    )


def write_markdown(out: dict, path: Path) -> None:
    m = out["machine"]
    where = f"{m['gpu']} (CUDA)" if m.get("gpu") else "CPU"
    lines = [
        f"# Token reduction on {where} (ToMe, EViT; exits vs tokens vs both)",
        "",
        f"Machine: {m['processor']}, {m['cpu_count']} cores, torch {m['torch']}, {out['threads']} thread(s). Each "
        "part below names its command and the load average around it (the machine was shared with other jobs).",
        "Timings are medians of interleaved calls (all variants on the same batches in one process, order rotated); "
        "the machine was shared with other jobs, so absolute ms are noisy but ratios are side by side.",
        "",
    ]
    if "knobs" in out:
        lines += [
            f"## Per knob, trained ViT ({out['knobs']['run_dir']}; Fashion-MNIST test, last exit)",
            "",
            "ToMe r here (49 patch tokens, 6 blocks) -> ViT-B/16 equivalent r (same share of tokens removed).",
            _part_line(out["knobs"]),
            "",
            "| knob | ViT-B r | MMACs | MACs ratio | test acc | drop (pt) | ms b1 | x b1 | ms b64 | x b64 | ms b256 "
            "| x b256 | realised/ideal b64 | realised/ideal b256 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in out["knobs"]["rows"]:
            lines.append(
                f"| {r['knob']} | {r['vit_b_equivalent_r'] or ''} | {r['macs'] / 1e6:.2f} | {r['macs_ratio']:.2f} | "
                f"{r['test_accuracy']:.4f} | {r['accuracy_drop_pt']:+.2f} | {r['ms_b1']:.2f} | {r['speedup_b1']:.2f} | "
                f"{r['ms_b64']:.1f} | {r['speedup_b64']:.2f} | {r['ms_b256']:.1f} | {r['speedup_b256']:.2f} | "
                f"{r['realised_over_ideal_b64']:.2f} | {r['realised_over_ideal_b256']:.2f} |"
            )
        lines.append("")
    if "joint" in out:
        j = out["joint"]
        lines += [
            "## Exits alone vs tokens alone vs both, at equal accuracy "
            f"(val accuracy >= {j['target_val_accuracy']:.4f}, i.e. full model - {100 * j['tolerance']:.1f} pt)",
            "",
            "Chosen on validation by `calibrate_knob_and_exits` (smallest budget on a grid reaching the target); "
            "timed with `run_dynamic` on test batches, interleaved with the full model. `pred/meas`: the per-knob "
            "latency model's prediction (raw profile) over the measured time; the ms budgets use the profiles "
            "anchored to the interleaved full-model times of the per-knob table (profiles are taken one knob "
            "after another).",
            _part_line(j),
            "",
            "| batch | budget in | mode | knob | val acc | test acc | test MMACs | ms/batch | speed-up vs full "
            "| pred/meas |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in j["rows"]:
            lines.append(
                f"| {row['batch']} | {row['unit']} | full | none | | | | {row['full_ms_per_batch']:.2f} | 1.00 | "
                f"{row['full_predicted_ms'] / row['full_ms_per_batch']:.2f} |"
            )
            for name, v in row["modes"].items():
                lines.append(
                    f"| {row['batch']} | {row['unit']} | {name} | {v['knob']} | {v['val_accuracy']:.4f} | "
                    f"{v['test_accuracy']:.4f} | {v['test_avg_macs'] / 1e6:.2f} | {v['measured_ms_per_batch']:.2f} | "
                    f"{v['speedup_vs_full']:.2f} | {v['predicted_over_measured']:.2f} |"
                )
        lines.append("")
    if "graphs" in out:
        _graphs_markdown(out["graphs"], lines)
    if "vits" in out:
        v = out["vits"]
        lines += [
            f"## {v['model']}, 224x224, ToMe r=13 (MACs ratio {v['macs_ratio']:.2f})",
            "",
            _part_line(v),
            "",
            "| batch | ms none | ms r=13 | speed-up |",
            "|---|---|---|---|",
        ]
        for r in v["rows"]:
            lines.append(f"| {r['batch']} | {r['ms']['none']:.1f} | {r['ms']['tome_r13']:.1f} | {r['speedup']:.2f} |")
        lines.append("")
    path.write_text("\n".join(lines))


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["knobs"]["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, marker in (("tome", "o"), ("evit", "s")):
        sel = [r for r in rows if r["method"] in (method, "none")]
        for size in (1, 64, 256):
            axes[0].plot(
                [r["macs_ratio"] for r in sel],
                [r[f"speedup_b{size}"] for r in sel],
                marker=marker,
                label=f"{method} b{size}",
            )
        axes[1].plot([r["ms_b64"] for r in sel], [100 * r["test_accuracy"] for r in sel], marker=marker, label=method)
    lim = max(r["macs_ratio"] for r in rows)
    axes[0].plot([1, lim], [1, lim], "k:", label="ideal (MACs)")
    axes[0].set_xlabel("MACs reduction (x)")
    axes[0].set_ylabel("measured speed-up (x)")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("ms per batch of 64")
    axes[1].set_ylabel("test accuracy (%)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run_dir", type=Path, default=Path("runs/vit_fmnist"))
    parser.add_argument("--checkpoint", type=Path, default=None, help="weights (default: RUN_DIR/model.safetensors)")
    parser.add_argument("--parts", default="knobs,joint,vits")
    parser.add_argument("--limit", type=int, default=0, help="smoke runs: only the first N val/test samples")
    parser.add_argument("--val_limit", type=int, default=0, help="calibrate on the first N validation samples only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--vits_rounds", type=int, default=3)
    parser.add_argument("--profile_repeats", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--device", default="cpu", help="graphs part: cuda (cpu: the graphs' emulation, a smoke test)")
    parser.add_argument("--graph_batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="graphs part: the models' dtype")
    parser.add_argument("--out", type=Path, default=RESULTS / "tokens_cpu")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is visible to torch here")
    if min(args.graph_batches) < 1:
        parser.error(f"--graph_batches are batch sizes >= 1, got {args.graph_batches}")
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    json_path = args.out.with_suffix(".json")
    out = json.loads(json_path.read_text()) if json_path.exists() else {}
    out.update(
        machine=machine_info(args.device),
        threads=args.threads,
        loadavg_before=[round(v, 2) for v in os.getloadavg()],
        command="python benchmarks/tokens.py " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    steps = [("knobs", part_knobs), ("joint", part_joint), ("vits", part_vits), ("graphs", part_graphs)]
    for name, part in steps:
        if name in parts or (name == "knobs" and "joint" in parts):
            before = [round(v, 2) for v in os.getloadavg()]
            part(args, out)
            out[name].update(command=out["command"], loadavg_before=before, loadavg_after=out_load())
            save(out, args.out)  # after every part: a long run keeps what it measured
    return 0


def out_load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def save(out: dict, prefix: Path) -> None:
    """Write the JSON (without the in-memory cache), the markdown table and the plot."""
    data = {k: v for k, v in out.items() if k != "_cache"}
    data["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(data, indent=1, default=float))
    write_markdown(data, prefix.with_suffix(".md"))
    if "knobs" in data:
        plot(data, prefix.with_suffix(".png"))
    print(f"wrote {prefix}.json/.md", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
