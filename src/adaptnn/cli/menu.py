"""Measure every member of an elastic run and print its menu: accuracy, MACs and measured milliseconds per member.

For each valid variant of the run's checkpoint: validation accuracy (last exit, and every exit), MACs of the
member's plain forward pass (``adaptnn.runtime.cost``), and milliseconds per batch at each ``--batch_sizes``
measured on its materialised (plain, smaller) network with the timing engine (all members interleaved, medians).
Writes ``RUN_DIR/menu.json`` and ``RUN_DIR/menu.png`` (accuracy vs ms and vs MACs, Pareto members marked).
``--budget_ms`` / ``--budget_macs`` pick the most accurate member that fits; with ``--joint`` the member and its
early-exit thresholds are chosen together by the knob engine (:func:`adaptnn.runs.knobs.joint_choice`, each member
one knob setting, as ``adaptnn calibrate --knob variant`` does), for average MACs or for measured ms (each member's
per-exit latency profile at ``--budget_batch``, anchored to interleaved full passes:
:func:`adaptnn.runs.knobs.settings_exit_ms`).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, NamedTuple

from jsonargparse import ActionYesNo, ArgumentParser, Namespace

from ._shared import add_run_access, run_access

HELP = "Measure every member of an elastic run (accuracy, MACs, ms) and pick one for a budget."


class MemberLogits(NamedTuple):
    """Every member's validation ``forward_all`` logits with its cumulative exit MACs, and the labels."""

    options: dict[str, tuple[Any, list[float]]]  # member name -> (logits [K, N, C], K exit MACs)
    labels: Any  # [N]


def build(parser: ArgumentParser) -> None:
    parser.add_argument("run_dir", type=str, help="A trained run directory of an elastic model.")
    parser.add_argument("--budget_ms", type=float | None, default=None, help="Milliseconds per batch allowed.")
    parser.add_argument("--budget_batch", type=int, default=64, help="Batch size --budget_ms refers to.")
    parser.add_argument("--budget_macs", type=float | None, default=None, help="MACs per sample allowed.")
    parser.add_argument(
        "--joint", action=ActionYesNo, default=False, help="Choose member and exit thresholds together."
    )
    parser.add_argument("--batch_sizes", type=list[int], default=[1, 64], help="Batch sizes to time.")
    parser.add_argument("--rounds", type=int, default=5, help="Timed calls per member and batch.")
    parser.add_argument("--warmup_s", type=float, default=1.0, help="Warm-up seconds before timing.")
    parser.add_argument("--threads", type=int | None, default=None, help="torch threads while timing.")
    add_run_access(parser)


def run(args: Namespace) -> None:
    from ..errors import ConfigError
    from ..io.jsonfile import write_json
    from ..layers.elastic import ElasticStagedModel
    from ..measure.timing import machine_info, pinned_threads
    from ..runs.rundir import load_run, require_trained

    run_dir = Path(args.run_dir)
    batch_sizes = sorted({int(b) for b in args.batch_sizes})
    if not batch_sizes or batch_sizes[0] < 1:
        raise ConfigError(f"--batch_sizes must be positive integers, got {args.batch_sizes}")
    if args.budget_ms is not None and args.budget_batch not in batch_sizes:
        batch_sizes = sorted({*batch_sizes, int(args.budget_batch)})
    if args.joint and args.budget_macs is None and args.budget_ms is None:
        raise ConfigError("--joint chooses member and exit thresholds for a budget; give --budget_macs or --budget_ms")
    require_trained(run_dir)
    loaded = load_run(run_dir, **run_access(args))
    model = loaded.model
    if not isinstance(model, ElasticStagedModel):
        raise ConfigError(
            f"{run_dir} holds a {type(model).__name__}, not an elastic model; train one such as elastic_cnn_mnist"
        )
    with pinned_threads(args.threads):
        rows, logits = build_menu(model, loaded.splits.val, batch_sizes, rounds=args.rounds, warmup_s=args.warmup_s)
        info = machine_info()
    menu: dict[str, Any] = {"rows": rows, "batch_sizes": batch_sizes, "machine": info, "split": "val"}
    write_json(run_dir / "menu.json", menu)
    plot_menu(rows, batch_sizes[-1], run_dir / "menu.png")
    print(format_menu(rows, batch_sizes))
    print(f"wrote {run_dir / 'menu.json'} and {run_dir / 'menu.png'}")
    # after the menu is written: a budget nothing fits still leaves it
    choice = _choose(args, rows, logits, model, loaded.splits.val)
    if choice is not None:
        write_json(run_dir / "menu.json", {**menu, "choice": choice})
        print(choice["summary"])


def build_menu(
    model: Any, dataset: Any, batch_sizes: list[int], *, rounds: int = 5, warmup_s: float = 1.0, timing_batches: int = 3
) -> tuple[list[dict[str, Any]], MemberLogits]:
    """Rows of the menu (one per member) and every member's validation logits and exit MACs (for ``--joint``)."""
    import torch

    from ..calibration.variants import pareto_front
    from ..errors import DataError
    from ..evaluation.logits import collect_logits
    from ..measure.timing import interleaved_medians
    from ..runtime.cost import cost_breakdown

    if len(dataset) == 0:
        raise DataError("the validation split is empty; the menu needs it for accuracy and timing batches")
    model.eval()
    sample_shape = tuple(torch.as_tensor(dataset[0][0]).shape)
    rows: list[dict[str, Any]] = []
    options: dict[str, tuple[Any, list[float]]] = {}
    labels = None
    plains: dict[str, Any] = {}
    for variant in model.variants:
        with model.use_variant(variant):
            logits, labels = collect_logits(model, dataset)
            breakdown = cost_breakdown(model, sample_shape)
            plains[variant.name] = model.materialise().eval()
        correct = (logits.argmax(-1) == labels[None]).float().mean(dim=1)  # [K]
        options[variant.name] = (logits, [float(c) for c in breakdown.exit_macs])
        rows.append(
            {
                "variant": variant.name,
                "width": variant.width,
                "depth": variant.depth,
                "accuracy": float(correct[-1]),
                "exit_accuracy": [float(a) for a in correct],
                "macs": float(sum(breakdown.segment_macs) + breakdown.head_macs[-1]),
                "exit_macs": list(breakdown.exit_macs),
                "params": sum(p.numel() for p in plains[variant.name].parameters()),
            }
        )
    n = len(dataset)
    for b in batch_sizes:
        batches = []
        for i in range(timing_batches):
            idx = [(i * b + j) % n for j in range(b)]
            batches.append(torch.stack([torch.as_tensor(dataset[k][0]) for k in idx]))

        def member(plain: Any):
            def call(x: torch.Tensor) -> None:
                with torch.inference_mode():
                    plain(x)

            return call

        # one block per member: each is timed with its own weights in the caches, as it runs when deployed
        ms = interleaved_medians(
            {name: member(p) for name, p in plains.items()}, batches, rounds=rounds, warmup_s=warmup_s,
            blocks=[[name] for name in plains],
        )  # fmt: skip
        for row in rows:
            row[f"ms_b{b}"] = statistics.median(ms[row["variant"]])
    for key in ["macs", *(f"ms_b{b}" for b in batch_sizes)]:
        for row, on in zip(rows, pareto_front(rows, key), strict=True):
            row[f"pareto_{key}"] = on
    return rows, MemberLogits(options, labels)


def joint_choice(
    rows: list[dict[str, Any]],
    logits: MemberLogits,
    budget: float,
    *,
    exit_ms: dict[str, list[float]] | None = None,
    batch: int | None = None,
    latency_models: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The member and confidence-exit thresholds with the best validation accuracy within an average ``budget``.

    The choice is :func:`adaptnn.runs.knobs.joint_choice` (THE knob engine, each member one setting; shared with
    ``adaptnn calibrate --knob variant``). Without ``exit_ms`` the budget is average MACs per sample (each member's
    exit MACs); with it, ``exit_ms`` is each member's cumulative ms per sample of each exit at batch ``batch`` and
    ``budget`` the ms per batch of ``batch`` allowed; ``latency_models`` (per member) hold the choice to the latency
    model of mixed-exit batches (see :func:`adaptnn.runs.knobs.joint_choice`). Returns the menu's JSON: member,
    thresholds, policy, validation accuracy, average cost, every member's best point (or why it could not meet the
    budget), a summary.
    """
    from ..errors import ConfigError
    from ..policies import make_policy
    from ..runs.knobs import joint_choice as choose
    from ..runs.knobs import shown_thresholds

    options = logits.options
    per_sample = float(budget)
    if exit_ms is not None:
        if batch is None or batch < 1:
            raise ConfigError(f"joint_choice: exit_ms needs the batch size it was measured at (>= 1), got {batch!r}")
        options = {name: (lg, exit_ms[name]) for name, (lg, _) in logits.options.items()}
        per_sample = float(budget) / batch
    num_exits = len(next(iter(options.values()))[1])
    policy = make_policy("confidence", num_exits)
    result, choice = choose(
        policy, options, logits.labels, per_sample, unit="MACs" if exit_ms is None else "ms", batch=batch,
        latency_models=latency_models,
    )  # fmt: skip
    member = choice["knob"]
    row = next(r for r in rows if r["variant"] == member)
    per_member = [{"variant": p.pop("knob"), **p} for p in choice["per_knob"]]
    member_alone = f"{100 * row['accuracy']:.2f}% at {row['macs'] / 1e6:.3f} M"
    if exit_ms is None:
        unit = "MACs"
        cost = f"{result.val['avg_cost'] / 1e6:.3f} M average MACs (budget {budget / 1e6:.3f} M"
    else:
        unit = f"ms per sample at batch {batch}"
        source = (
            "the latency model of mixed-exit batches" if choice["prediction"] == "latency_model" else "exits' latencies"
        )
        predicted = choice["predicted_ms_per_batch"]
        cost = f"{predicted:.3f} ms per batch of {batch} predicted by {source} (budget {budget:.3f} ms"
        plain_ms = row.get(f"ms_b{batch}", exit_ms[member][-1] * batch)  # the plain member, measured by the menu
        member_alone = f"{100 * row['accuracy']:.2f}% at {plain_ms:.3f} ms"
    return {
        "variant": member,
        "width": row.get("width"),
        "depth": row.get("depth"),
        "thresholds": result.thresholds,
        "policy": choice["policy"],
        "accuracy": choice["accuracy"],
        "avg_cost": choice["avg_cost"],
        "exit_fractions": choice["exit_fractions"],
        "full_accuracy": row["accuracy"],
        "full_macs": row["macs"],
        "unit": unit,
        **({"budget_macs": float(budget)} if exit_ms is None else {"budget_ms": float(budget), "budget_batch": batch}),
        **({} if exit_ms is None else {"predicted_ms": choice["predicted_ms_per_batch"], "exit_ms": exit_ms[member]}),
        "per_member": per_member,
        "summary": f"chosen: {member} with exit thresholds {shown_thresholds(result.thresholds)}: validation "
        f"accuracy {100 * result.val['accuracy']:.2f}% at {cost}; the member alone: {member_alone})",
    }


def _member_exit_ms(args: Namespace, model: Any, dataset: Any) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Each member's cumulative ms per sample of each exit at ``--budget_batch`` (materialised, anchored), and its
    latency model."""
    from ..runs.knobs import settings_exit_ms, stack_inputs

    b = int(args.budget_batch)
    pool = stack_inputs(dataset, min(4 * b, max(b, 256)))
    members = {v.name: model.materialise(v).eval() for v in model.variants}
    return settings_exit_ms(
        members, pool, b, repeats=max(3, args.rounds), warmup_s=args.warmup_s, num_threads=args.threads
    )


def _choose(args: Namespace, rows: list[dict[str, Any]], logits: MemberLogits, model: Any, dataset: Any) -> dict | None:
    from ..calibration.variants import choose_variant

    if args.budget_ms is None and args.budget_macs is None:
        return None
    if args.budget_ms is not None and args.budget_macs is not None:
        from ..errors import ConfigError

        raise ConfigError("give --budget_ms or --budget_macs, not both")
    if args.joint and args.budget_macs is not None:
        return joint_choice(rows, logits, args.budget_macs)
    if args.joint:
        exit_ms, latency_models = _member_exit_ms(args, model, dataset)
        return joint_choice(
            rows, logits, args.budget_ms, exit_ms=exit_ms, batch=int(args.budget_batch), latency_models=latency_models
        )
    key, budget = (
        ("macs", args.budget_macs) if args.budget_macs is not None else (f"ms_b{args.budget_batch}", args.budget_ms)
    )
    row = choose_variant(rows, key, budget)
    unit = "M MACs" if key == "macs" else f"ms at batch {args.budget_batch}"
    value = row[key] / 1e6 if key == "macs" else row[key]
    limit = budget / 1e6 if key == "macs" else budget
    return {
        "variant": row["variant"],
        "cost_key": key,
        "predicted": row[key],
        "budget": budget,
        "accuracy": row["accuracy"],
        "summary": f"chosen: {row['variant']}: validation accuracy {100 * row['accuracy']:.2f}% at "
        f"{value:.3f} {unit} (budget {limit:.3f})",
    }


def format_menu(rows: list[dict[str, Any]], batch_sizes: list[int]) -> str:
    """The menu as a text table, Pareto members (in ms at the largest batch) marked with ``*``."""
    last = f"ms_b{batch_sizes[-1]}"
    head = f"{'variant':<10} {'val acc':>8} {'MMACs':>8} {'params':>9} " + " ".join(
        f"{'ms@' + str(b):>9}" for b in batch_sizes
    )
    lines = [head]
    for r in sorted(rows, key=lambda r: r["macs"]):
        mark = "*" if r.get(f"pareto_{last}") else " "
        times = " ".join(f"{r[f'ms_b{b}']:9.3f}" for b in batch_sizes)
        lines.append(
            f"{r['variant']:<9}{mark} {100 * r['accuracy']:7.2f}% {r['macs'] / 1e6:8.3f} {r['params']:9d} {times}"
        )
    lines.append(f"* = Pareto-optimal in accuracy vs {last}")
    return "\n".join(lines)


def plot_menu(rows: list[dict[str, Any]], batch: int, path: Path) -> None:
    """Accuracy vs measured ms (at ``batch``) and vs MACs, one point per member, Pareto members filled."""
    import io

    from matplotlib.figure import Figure

    from ..io.atomic import atomic_write_bytes

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], f"ms_b{batch}", f"ms per batch of {batch}"), (axes[1], "macs", "MACs")):
        for r in rows:
            x = r[key] / 1e6 if key == "macs" else r[key]
            filled = r.get(f"pareto_{key}", False)
            ax.plot([x], [100 * r["accuracy"]], "o", mfc="C0" if filled else "none", mec="C0")
            ax.annotate(r["variant"], (x, 100 * r["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label + (" (millions)" if key == "macs" else ""))
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("elastic menu (filled: Pareto-optimal)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())
