"""Issue 12's fidelity check: do BoostNet, L2W-DEN and IMTA beat joint training on the reference CIFAR recipe?

The recipe: ``msdnet_cifar10`` with 5 blocks (step 2, base 4, even: exits at about 15 / 24 / 32 / 40 / 47 M MACs),
CIFAR-10 as an image folder (``../shared/data/cifar10-jpg.tar.gz``, extracted once under /tmp), 5,000 training
images held out for validation, SGD lr 0.1 momentum 0.9 weight decay 1e-4, batch 64, cosine, no warm-up,
3 epochs. Every strategy is trained from the same initial weights with the same data order for each seed
(:func:`strategies.run_strategy`, the one side-by-side engine of ``benchmarks/strategies.py``), evaluated on the
test split, and scored by its budgeted curve (thresholds fitted on validation, :mod:`adaptnn.calibration.budgeted`)
and ``auc_mean_acc``: the mean accuracy over [first exit MACs, last exit MACs] of the curve anchored at the first
and last exits' accuracies (:func:`strategies.anchored_mean_accuracy`).

Controlled runs change one thing against the defaults: ``--no-nesterov`` (plain momentum),
``--wd_norm_bias`` (weight decay on norms and biases too), ``--rescale_scope`` (boost/imta), ``--r`` and
``--gradient_rescaling`` (boost), ``--exit_weights``, ``--init`` (the MSDNet weight initialisation),
``--min_lr_ratio`` (1.0: a constant learning rate, what
the reference BoostNet script's per-epoch multistep schedule amounts to over 3 epochs with its default milestones);
``--options`` passes any strategy option as JSON.

``imta_isc`` is IMTA's stage two (collaborative exit classifiers with one-for-all distillation on the frozen
stage-one network): it starts from the ``imta`` run of the same seed in ``--work_dir`` (list ``imta`` before it,
or keep that run directory), trains ``--epochs`` more epochs, and its record holds both stages' training times.
Writes ``<out>.json``, ``<out>.md`` and ``<out>.png``.

Full run (3 seeds, all strategies; hours on a 2-core CPU, minutes on a GPU)::

    python benchmarks/fidelity.py --seeds 0,1,2 --out benchmarks/results/fidelity_cifar10

Controlled-run table (merges reports, trains nothing)::

    python benchmarks/fidelity.py --controlled A.json B.json --out benchmarks/results/fidelity_cifar10_controlled

A long run is saved after every (strategy, seed); run the same command again with ``--resume`` to train only
what is missing (the report must have the same setup); with a ``--work_dir``, a (strategy, seed) that was cut
short goes on from its last epoch checkpoint there (its record says how many epochs were ``resumed_epochs``).
Strategies trained in parallel processes (or on other machines) into separate reports are joined into one table
by ``--merge A.json B.json --out ...`` (same setup but the seeds and strategies; every report records each
strategy's effective options, its defaults filled in). Every record names the CPU it was trained on: two CPU
models round floats differently, so the same seed follows another path on each, and ``--cpu LABEL`` keeps only the
records of one model, for a table whose every pair is controlled.

Smoke run (proves the pipeline only)::

    python benchmarks/fidelity.py --strategies joint,boost --seeds 0 --epochs 1 --train_subset 256 \\
        --test_subset 500 --out /tmp/fidelity_smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptnn.layers import inline_collaboration
from adaptnn.models import load_model
from adaptnn.runtime import StagedModel
from adaptnn.strategies import resolved_options

sys.path.insert(0, str(Path(__file__).resolve().parent))
import strategies as engine  # noqa: E402  (benchmarks/strategies.py: the side-by-side training engine)

log = logging.getLogger("benchmarks.fidelity")

STRATEGIES = ("joint", "boost", "l2w", "imta", "imta_isc", "distill")
MODEL_KWARGS = {"n_blocks": 5, "step": 2, "base": 4, "step_mode": "even"}
#: the model's own defaults of the switches a report may set (a run label names only what differs)
MODEL_DEFAULTS = {"init": "torch_default"}
ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"


def ensure_extracted(root: Path, archive: Path) -> Path:
    """``root`` holding ``train/`` and ``test/``: the archive is extracted there unless it already is."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    if not archive.is_file():
        raise SystemExit(f"no image folder at {root} and no archive at {archive}; pass --root or --archive")
    log.info("extracting %s into %s", archive, root)
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return root


def strategy_options(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The options of strategy ``name`` from the switches (unset switches keep the strategy's defaults)."""
    options = dict(json.loads(args.options).get(name, {}))
    if name in ("boost", "imta") and args.rescale_scope is not None:
        options.setdefault("rescale_scope", args.rescale_scope)
    if name == "boost":
        if args.r is not None:
            options.setdefault("r", args.r)
        if args.gradient_rescaling is not None:
            options.setdefault("gradient_rescaling", args.gradient_rescaling)
    return options


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe's MSDNet with its init spelled out (``--init``, else the model's default), so a report says which."""
    return dict(MODEL_KWARGS, init=args.init or MODEL_DEFAULTS["init"])


def stage_two_builder(run_args: argparse.Namespace) -> Callable[[], StagedModel]:
    """``imta_isc`` (IMTA stage two) starts from the stage-one ``imta`` run of the same seed in ``--work_dir``."""
    path = Path(run_args.work_dir) / "imta" / "checkpoints" / "last.safetensors"
    if not path.is_file():
        raise SystemExit(
            f"imta_isc starts from the stage-one imta run of seed {run_args.seed}, expected at {path}; run "
            "--strategies imta,imta_isc with one --work_dir"
        )
    spec = {"name": run_args.model, "kwargs": {**json.loads(run_args.model_kwargs), "collaboration": "inline"}}

    def build() -> StagedModel:
        model = inline_collaboration(load_model(path))
        model.model_spec = spec
        return model

    return build


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields of the recipe and of the controlled-run switches that are set."""
    out: dict[str, Any] = {"momentum": args.momentum, "min_lr_ratio": args.min_lr_ratio}
    if args.nesterov is not None:
        out["nesterov"] = args.nesterov
    if args.wd_norm_bias is not None:
        out["weight_decay_norm_bias"] = args.wd_norm_bias
    if args.exit_weights is not None:
        text = args.exit_weights
        out["exit_weights"] = text if text in ("uniform", "linear") else [float(w) for w in text.split(",")]
    return out


def record(result: dict[str, Any], seed: int) -> dict[str, Any]:
    """The per-(strategy, seed) entry of the JSON: exit accuracies, budgeted curve, ``auc_mean_acc``."""
    cost, acc = engine._curve(result["budgeted"])
    return {
        "strategy": result["strategy"],
        "seed": seed,
        "options": result["options"],
        "exit_macs": result["exit_macs"],
        "exit_test_accuracy": result["anytime_accuracy"],
        "raw_head_test_accuracy": result["raw_head_accuracy"],
        "budgeted_curve": {"avg_macs": cost.tolist(), "test_accuracy": acc.tolist()},
        "auc_mean_acc": engine.anchored_mean_accuracy(result),
        "train_time_s": result["train_time_s"],
        "resumed_epochs": result.get("resumed_epochs", 0),
        "train_loss": result["train_loss"],
        "policy_check": result["policy_check"],
    }


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per strategy: medians over seeds, and paired differences to ``joint`` on the same seed (points)."""
    by_name: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        by_name.setdefault(r["strategy"], {})[r["seed"]] = r
    joint = by_name.get("joint", {})
    rows = []
    for name, runs in by_name.items():
        row: dict[str, Any] = {"strategy": name, "seeds": sorted(runs)}
        for key, pick in (
            ("auc_mean_acc", lambda r: r["auc_mean_acc"]),
            ("first_exit", lambda r: r["exit_test_accuracy"][0]),
            ("last_exit", lambda r: r["exit_test_accuracy"][-1]),
        ):
            row[f"median_{key}"] = statistics.median(pick(r) for r in runs.values())
            paired = [pick(r) - pick(joint[s]) for s, r in runs.items() if s in joint]
            row[f"median_delta_{key}_vs_joint"] = statistics.median(paired) if paired and name != "joint" else None
        row["paired_seeds_vs_joint"] = sorted(s for s in runs if s in joint) if name != "joint" else []
        row["paired_seeds_across_cpus"] = [
            s for s in row["paired_seeds_vs_joint"] if _cpu(runs[s]) != _cpu(joint[s])
        ]  # fmt: skip
        row["auc_mean_acc_per_seed"] = {s: runs[s]["auc_mean_acc"] for s in sorted(runs)}
        rows.append(row)
    return rows


def _cpu(record: dict[str, Any]) -> str:
    hardware = record.get("hardware")  # a report is data from disk: a missing or malformed entry is "unknown"
    return engine.cpu_label(hardware) if isinstance(hardware, dict) else "unknown"


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value * 100:+.2f}" if signed else f"{value * 100:.2f}"


def verdict(row: dict[str, Any]) -> str:
    """One line: does this strategy beat joint in mean accuracy over budgets and at the first-exit budget?"""
    mean, first = row["median_delta_auc_mean_acc_vs_joint"], row["median_delta_first_exit_vs_joint"]
    if mean is None or first is None:
        return ""
    beats = "beats joint" if mean > 0 and first > 0 else "does not beat joint"
    across = row.get("paired_seeds_across_cpus")
    return (
        f"{row['strategy']} {beats} on the seeds both ran, {row['paired_seeds_vs_joint']}: "
        f"mean acc {_pct(mean, True)}, first exit {_pct(first, True)} points"
        + (f" (seeds {across} paired across CPU models)" if across else "")
    )


def _hardware_line(report: dict[str, Any]) -> str:
    """Where the records were trained: every CPU model among them, then the (first) report's own hardware line."""
    hw = report["hardware"]
    load = ", ".join(f"{x:.2f}" for x in hw["loadavg"])
    cpus = sorted({_cpu(r) for r in report["records"]})
    where = "merged report; records trained on " if "merged_from" in report else "records trained on "
    own = "the first merged report's run" if "merged_from" in report else "this run"
    return f"Hardware: {where}{'; '.join(cpus)}; {own}: {hw['summary']}, load average at the end {load}."


def markdown(report: dict[str, Any]) -> str:
    s = report["setup"]
    macs = report["records"][0]["exit_macs"]
    options = s.get("effective_strategy_options", s["strategy_options"])  # reports before it: the passed options
    lines = ["# Fidelity: strategies vs joint on the reference MSDNet CIFAR recipe (issue 12)", ""]
    lines += [f"Command: `{report['command']}`", ""]
    if "merged_from" in report:
        lines += ["Merged from the reports of:", ""] + [f"- `{m['command']}`" for m in report["merged_from"]] + [""]
    lines += [
        f"{s['model']} {s['model_kwargs']}; {s['dataset']} at {s['root']}; train {s['train_samples']}, val "
        f"{s['val_samples']}, test {s['test_samples']}; SGD lr {s['lr']} momentum {s['momentum']} wd "
        f"{s['weight_decay']}, batch {s['batch_size']}, cosine, warm-up {s['warmup_epochs']}, {s['epochs']} epochs; "
        f"seeds planned {s['seeds']} (per strategy, the table lists those trained); "
        f"switches {s['train_overrides']}; strategy options (defaults filled in) {options}.",
        "",
        _hardware_line(report),
        "",
        "Exit MACs: " + ", ".join(f"{c / 1e6:.1f}M" for c in macs),
        "",
        "Accuracies in %, medians over seeds; mean acc = area under the budgeted test curve (anchored at the first "
        "and last exits) over [first, last exit MACs] / width; deltas are paired with joint on the same seed.",
        "",
        "| strategy | mean acc | first exit | last exit | delta mean acc | delta first exit | per seed mean acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["summary"]:
        per_seed = ", ".join(f"{k}: {_pct(v)}" for k, v in row["auc_mean_acc_per_seed"].items())
        lines.append(
            f"| {row['strategy']} | {_pct(row['median_auc_mean_acc'])} | {_pct(row['median_first_exit'])} | "
            f"{_pct(row['median_last_exit'])} | {_pct(row['median_delta_auc_mean_acc_vs_joint'], True)} | "
            f"{_pct(row['median_delta_first_exit_vs_joint'], True)} | {per_seed} |"
        )
    verdicts = [verdict(row) for row in report["summary"] if row["strategy"] != "joint"]
    if any(verdicts):
        lines += [
            "",
            "Against joint (paired medians over seeds; the reference BoostNet beat its joint by about +1.0):",
            "",
        ]
        lines += [f"- {v}" for v in verdicts if v]
    lines += ["", "Per run, test accuracy of every exit (the strategy's predictions):", ""]
    for r in report["records"]:
        accs = " / ".join(_pct(a) for a in r["exit_test_accuracy"])
        lines.append(
            f"- {r['strategy']} seed {r['seed']}: {accs}; mean acc {_pct(r['auc_mean_acc'])}; trained on {_cpu(r)}"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours: dict[str, Any] = {}
    for r in report["records"]:
        colour = colours.setdefault(r["strategy"], f"C{len(colours)}")
        curve = r["budgeted_curve"]
        first = next(q for q in report["records"] if q["strategy"] == r["strategy"]) is r
        label = r["strategy"] if first else None
        ax.plot(np.array(curve["avg_macs"]) / 1e6, curve["test_accuracy"], color=colour, lw=1.2, label=label)
        ax.scatter(np.array(r["exit_macs"]) / 1e6, r["exit_test_accuracy"], color=colour, s=12)
    s = report["setup"]
    ax.set_xlabel("average MACs per sample (millions)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"MSDNet CIFAR-10 recipe: budgeted curves ({s['epochs']} epochs, seeds {s['seeds']})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: setup keys that may differ between the reports ``--merge`` joins (the rest must be equal)
MERGED_SETUP_KEYS = ("seeds", "strategy_options", "effective_strategy_options")


def merge(paths: list[str], command: str, cpu: str | None = None) -> dict[str, Any]:
    """One fidelity report of the records of same-setup reports (e.g. strategies trained in parallel processes).

    The reports must agree on every setup key but the seeds and the strategies run; a strategy in two reports must
    have the same options there, and a (strategy, seed) may appear only once. ``cpu`` keeps only the records
    trained on that CPU model (:func:`strategies.cpu_label`): the same seed on another model is another float path.
    """
    if len(paths) < 2:
        raise SystemExit(f"--merge needs at least two reports, got {len(paths)}")
    reports = []
    for path in paths:
        try:
            report = json.loads(Path(path).read_text())
            if not isinstance(report["setup"], dict) or not isinstance(report["records"], list):
                raise TypeError("its setup must be an object and its records a list")
            report["setup"]["seeds"], report["command"], report["hardware"]  # noqa: B018  (keys merge reads)
            if not all(isinstance(r["strategy"], str) and isinstance(r["seed"], int) for r in report["records"]):
                raise TypeError("every record needs a strategy name and an integer seed")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SystemExit(f"--merge: {path} is not a fidelity report ({err})") from None
        reports.append(report)
    first = reports[0]["setup"]
    setup = {k: v for k, v in first.items() if k not in MERGED_SETUP_KEYS}
    merged_options: dict[str, dict[str, Any]] = {key: {} for key in MERGED_SETUP_KEYS[1:]}
    seeds: set[int] = set()
    records: dict[tuple[str, int], dict[str, Any]] = {}
    for path, report in zip(paths, reports, strict=True):
        theirs = {k: v for k, v in report["setup"].items() if k not in MERGED_SETUP_KEYS}
        if theirs != setup:
            changed = sorted(k for k in set(theirs) | set(setup) if theirs.get(k) != setup.get(k))
            raise SystemExit(f"--merge: {path} was made with another setup than {paths[0]} (differs in {changed})")
        seeds.update(report["setup"]["seeds"])
        for key, merged in merged_options.items():
            for name, options in report["setup"].get(key, {}).items():
                if merged.setdefault(name, options) != options:
                    raise SystemExit(
                        f"--merge: {path} ran {name} with {key} {options}, another report with {merged[name]}"
                    )
        for r in report["records"]:
            if cpu is not None and _cpu(r) != cpu:
                continue
            if (r["strategy"], r["seed"]) in records:
                raise SystemExit(f"--merge: {r['strategy']} seed {r['seed']} is in more than one report ({path})")
            records[(r["strategy"], r["seed"])] = r
    if cpu is not None and not records:
        found = sorted({_cpu(r) for report in reports for r in report["records"]})
        raise SystemExit(f"--merge --cpu: no record was trained on {cpu!r}; the reports' records name {found}")
    if cpu is not None:
        setup["cpu"] = cpu
    order = {name: i for i, name in enumerate(STRATEGIES)}
    ordered = [records[k] for k in sorted(records, key=lambda k: (k[1], order.get(k[0], len(order)), k[0]))]
    setup.update(seeds=sorted(seeds), **merged_options)
    sources = [{"path": path, "command": report["command"]} for path, report in zip(paths, reports, strict=True)]
    return {"command": command, "merged_from": sources, "setup": setup, "hardware": reports[0]["hardware"],
            "records": ordered, "summary": summarise(ordered)}  # fmt: skip


def run_label(setup: dict[str, Any], strategy: str) -> str:
    """What a run changed against adaptnn's defaults: its recipe switches and the strategy's options."""
    recipe = {"momentum", "min_lr_ratio"}  # always recorded; a switch only when the cosine does not decay to 0
    overrides = setup["train_overrides"]
    switches = {k: v for k, v in overrides.items() if k not in recipe or (k == "min_lr_ratio" and v != 0.0)}
    if "model_kwargs" in setup:  # reports from before ``init`` existed were trained with He weights
        model = {"init": "he", **setup["model_kwargs"]}
        switches.update({k: v for k, v in model.items() if k not in MODEL_KWARGS and v != MODEL_DEFAULTS.get(k)})
    parts = [f"{k}={v}" for k, v in sorted(switches.items())]
    parts += [f"{k}={v}" for k, v in sorted(setup["strategy_options"].get(strategy, {}).items())]
    return ", ".join(parts) or "defaults"


def controlled(
    paths: list[str], seeds: Sequence[int] | None = None, strategies: Sequence[str] | None = None
) -> dict[str, Any]:
    """One table of every (report, strategy, seed) in the ``paths`` reports: the controlled runs side by side.

    ``seeds`` and ``strategies`` (``None``: all) keep only those records, e.g. one seed of a 3-seed report.
    """
    rows, hardware = [], []
    for path in paths:
        report = json.loads(Path(path).read_text())
        threads = report["hardware"]["summary"].partition("(")[2]  # "2 CPUs, 1 torch threads)"
        for r in report["records"]:
            if (seeds is not None and r["seed"] not in seeds) or (
                strategies is not None and r["strategy"] not in strategies
            ):
                continue
            rows.append({
                "report": Path(path).stem,
                "label": run_label(report["setup"], r["strategy"]),
                "strategy": r["strategy"],
                "seed": r["seed"],
                "epochs": report["setup"]["epochs"],
                "train_samples": report["setup"]["train_samples"],
                "auc_mean_acc": r["auc_mean_acc"],
                "exit_test_accuracy": r["exit_test_accuracy"],
                "raw_head_test_accuracy": r["raw_head_test_accuracy"],
                "train_time_s": r["train_time_s"],
                "resumed_epochs": r.get("resumed_epochs", 0),
                "stage_one_train_time_s": r.get("stage_one_train_time_s"),
                "cpu": _cpu(r),
            })  # fmt: skip
            hw = r.get("hardware", report["hardware"])  # a record's own: the machine and load while it trained
            where = f"{engine.cpu_label(hw)} ({threads}" if threads else engine.cpu_label(hw)
            hardware.append(f"{where} (load {hw['loadavg'][0]:.2f})")
    return {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "reports": paths,
            "hardware": sorted(set(hardware)), "rows": rows}  # fmt: skip


def _train_seconds(row: dict[str, Any]) -> str:
    """The training time of a controlled row, saying what it leaves out (epochs trained earlier, stage one)."""
    text = f"{row['train_time_s']:.0f}"
    if row.get("resumed_epochs"):
        text += f" (after {row['resumed_epochs']} resumed epochs)"
    if row.get("stage_one_train_time_s") is not None:
        text += f" + {row['stage_one_train_time_s']:.0f} stage one"
    return text


def controlled_markdown(table: dict[str, Any]) -> str:
    lines = [
        "# Fidelity controlled runs (issue 12): one switch at a time against adaptnn's defaults",
        "",
        f"Command: `{table['command']}`; hardware: {'; '.join(table['hardware'])}.",
        "",
        "Accuracies in %; mean acc = area under the budgeted test curve over [first, last exit MACs] / width; "
        "exits = the strategy's predictions (boost: the additive ensemble); raw heads = each head alone.",
        "",
        "| report | strategy | seed | switches | mean acc | first exit | last exit | exits | raw heads | train s "
        "| cpu |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table["rows"]:
        exits = " / ".join(_pct(a) for a in r["exit_test_accuracy"])
        raw = " / ".join(_pct(a) for a in r["raw_head_test_accuracy"])
        lines.append(
            f"| {r['report']} | {r['strategy']} | {r['seed']} | {r['label']} | {_pct(r['auc_mean_acc'])} | "
            f"{_pct(r['exit_test_accuracy'][0])} | {_pct(r['exit_test_accuracy'][-1])} | {exits} | {raw} | "
            f"{_train_seconds(r)} | {r.get('cpu', 'unknown')} |"
        )
    lines += [
        "",
        "Runs on different CPU models do not follow one float path: a pair across them is as loose as two seeds.",
    ]
    return "\n".join(lines) + "\n"


def controlled_plot(table: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.4 * len(table["rows"]) + 1.5))
    labels = [f"{r['strategy']} s{r['seed']} [{r['label']}]" for r in table["rows"]]
    ax.barh(range(len(labels)), [r["auc_mean_acc"] * 100 for r in table["rows"]], color="C0")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    lo = min(r["auc_mean_acc"] for r in table["rows"]) * 100
    ax.set_xlim(max(0.0, lo - 3), None)
    ax.set_xlabel("mean test accuracy over the budget range (%)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--seeds", default="0,1,2", help="training seeds (initial weights and data order)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train_subset", type=int, default=0, help="train on this many samples (0 = all 45,000)")
    parser.add_argument("--test_subset", type=int, default=0, help="evaluate on this many test samples (0 = all)")
    parser.add_argument("--root", default="/tmp/adaptnn-cifar10-jpg", help="extracted image folder (made if absent)")
    parser.add_argument("--archive", default=str(ARCHIVE), help="the cifar10-jpg.tar.gz to extract into --root")
    parser.add_argument("--val_size", type=int, default=5000)
    parser.add_argument("--split_seed", type=int, default=0, help="seed of the validation split (fixed across seeds)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight_decay", type=float, default=1e-4)
    parser.add_argument("--warmup_epochs", type=float, default=0.0)
    parser.add_argument(
        "--min_lr_ratio", type=float, default=0.0, help="final lr / lr of the cosine (1.0 = constant lr, no decay)"
    )
    # controlled-run switches (unset: the library's defaults)
    parser.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--wd_norm_bias", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--rescale_scope", choices=("state", "head_inputs"), default=None)
    parser.add_argument("--r", type=float, default=None, help="boost's r")
    parser.add_argument("--gradient_rescaling", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--exit_weights", default=None, help="'uniform', 'linear' or comma-separated weights")
    parser.add_argument(
        "--init", choices=("he", "torch_default"), default=None,
        help="MSDNet weight init (default: the model's, torch_default, what the reference codes run; he: He fan-out)",
    )  # fmt: skip
    parser.add_argument("--options", default="{}", help="JSON {strategy: {option: value}}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--out", default="benchmarks/results/fidelity_cifar10")
    parser.add_argument("--work_dir", default=None, help="run directories (default: a temporary directory)")
    parser.add_argument(
        "--resume", action="store_true",
        help="keep the (strategy, seed) records already in <out>.json (same setup) and train only the others; "
        "a run cut short in --work_dir goes on from its last epoch checkpoint",
    )  # fmt: skip
    parser.add_argument(
        "--controlled", nargs="+", default=None, metavar="JSON",
        help="train nothing: merge these reports into one controlled-run table at --out (only the records of "
        "--seeds and --strategies)",
    )  # fmt: skip
    parser.add_argument(
        "--merge", nargs="+", metavar="REPORT",
        help="train nothing: join same-setup reports (e.g. strategies run in parallel processes) into one at --out",
    )  # fmt: skip
    parser.add_argument(
        "--cpu", default=None, metavar="LABEL",
        help="with --merge: keep only the records trained on this CPU (as the per-run list names it, e.g. 'AMD EPYC "
        "family 23 model 1'), so every pair in the table shares one float path",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        parser.error(f"--min_lr_ratio is the final lr as a fraction of --lr, in [0, 1]; got {args.min_lr_ratio}")
    return args


def split_list(text: str, kind: type) -> list[Any]:
    """The comma-separated items of a switch (``--seeds 0,1`` or ``--strategies joint,boost``), blanks dropped."""
    try:
        return [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise SystemExit(f"expected comma-separated {kind.__name__} values, got {text!r}") from None


def resumed_records(out: Path, setup: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of ``<out>.json`` when it was made with the same ``setup`` (none when it does not exist)."""
    path = out.with_suffix(".json")
    if not path.is_file():
        return []
    try:
        earlier = json.loads(path.read_text())
        records, their_setup = earlier["records"], earlier["setup"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"--resume: {path} is not a fidelity report ({err})") from None
    ours = json.loads(json.dumps(setup))  # compared as JSON: tuples and lists alike
    if their_setup != ours:
        changed = sorted(k for k in set(ours) | set(their_setup) if ours.get(k) != their_setup.get(k))
        raise SystemExit(f"--resume: {path} was made with another setup (differs in {changed}); use another --out")
    return list(records)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.controlled:
        table = controlled(args.controlled, split_list(args.seeds, int), split_list(args.strategies, str))
        engine.save_report(table, args.out, controlled_markdown, controlled_plot)
        return table
    if args.merge:
        command = "python " + " ".join(
            shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
        )
        report = merge(args.merge, command, cpu=args.cpu)
        engine.save_report(report, args.out, markdown, plot)
        return report
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    root = ensure_extracted(Path(args.root), Path(args.archive))
    splits, train_set = engine.load_data("image_folder", str(root), args.val_size, args.split_seed, True, 0)
    if args.test_subset and args.test_subset < len(splits.test):
        perm = torch.randperm(len(splits.test), generator=torch.Generator().manual_seed(args.split_seed))
        splits.test = torch.utils.data.Subset(splits.test, perm[: args.test_subset].tolist())
    tmp = tempfile.TemporaryDirectory(prefix="adaptnn-fidelity-") if args.work_dir is None else None
    names, seeds = split_list(args.strategies, str), split_list(args.seeds, int)
    overrides = train_overrides(args)
    setup = {
        "dataset": "image_folder (CIFAR-10 JPEG)",
        "root": str(root),
        "model": "msdnet_cifar10",
        "model_kwargs": model_kwargs(args),
        "epochs": args.epochs,
        "seeds": seeds,
        "split_seed": args.split_seed,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "warmup_epochs": args.warmup_epochs,
        "schedule": "cosine",
        "train_overrides": overrides,
        "strategy_options": {n: strategy_options(n, args) for n in names},
        # what each strategy ran with, its defaults filled in: a report stays true after a default changes
        "effective_strategy_options": {n: resolved_options(n, **strategy_options(n, args)) for n in names},
        "train_samples": min(args.train_subset or len(train_set), len(train_set)),
        "val_samples": len(splits.val),
        "test_samples": len(splits.test),
    }
    records = resumed_records(Path(args.out), setup) if args.resume else []
    done = {(r["strategy"], r["seed"]) for r in records}

    def save() -> dict[str, Any]:
        report = {"command": command, "setup": setup, "hardware": engine._hardware(), "records": records,
                  "summary": summarise(records)}  # fmt: skip
        engine.save_report(report, args.out, markdown, plot)
        return report

    for seed in seeds:
        subset = train_set
        if args.train_subset and args.train_subset < len(train_set):  # the same subset for every strategy
            perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
            subset = torch.utils.data.Subset(train_set, perm[: args.train_subset].tolist())
        for name in names:
            if (name, seed) in done:
                log.info("seed %d: %s already in %s.json (--resume)", seed, name, args.out)
                continue
            run_args = argparse.Namespace(
                **vars(args),
                seed=seed,
                model="msdnet_cifar10",
                model_kwargs=json.dumps(model_kwargs(args)),
                optimizer="sgd",
            )
            run_args.work_dir = str(Path(args.work_dir or tmp.name) / f"seed{seed}")
            log.info("seed %d: training %s", seed, name)
            options = strategy_options(name, args)
            build = stage_two_builder(run_args) if name == "imta_isc" else None
            result = engine.run_strategy(
                name, options, splits, subset, run_args, overrides, resume=args.resume, build_model=build
            )
            records.append(dict(record(result, seed), hardware=engine._hardware()))  # the load while it trained
            if name == "imta_isc":  # its full cost: stage one (the imta run it starts from) + stage two
                first = [r["train_time_s"] for r in records if (r["strategy"], r["seed"]) == ("imta", seed)]
                records[-1]["stage_one_train_time_s"] = first[0] if first else None
            log.info("%s seed %d: mean acc %.4f", name, seed, records[-1]["auc_mean_acc"])
            save()  # after every (strategy, seed): hours of training are never lost; --resume goes on from here
    if tmp is not None:
        tmp.cleanup()
    return save()


if __name__ == "__main__":
    main()
