"""Plots a person can read: ``report.png`` (accuracy vs MACs, exit histogram) and curve overlays.

Figures are built with :class:`matplotlib.figure.Figure` directly, never through ``pyplot``: no backend is
selected and no global figure state is touched, so importing or calling this module changes nothing in the
user's matplotlib session. Files are written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ..io.atomic import atomic_write_bytes
from .curves import point_macs

__all__ = ["plot_report", "plot_curves"]


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """Plot accuracy vs average MACs (anytime exits, budgeted curve, realised point) and the exit histogram.

    ``report`` is a ``report.json`` (budgeted points carry ``avg_macs``; ``avg_cost`` in older reports).
    """
    fig = Figure(figsize=(11, 4.2))
    ax_curve, ax_hist = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    anytime = report["anytime"]
    ax_curve.plot(
        [a["macs"] / 1e6 for a in anytime],
        [100 * a["accuracy"] for a in anytime],
        "o--",
        color="tab:gray",
        label="anytime (each exit alone)",
    )
    for a in anytime:
        ax_curve.annotate(
            f"exit {a['exit']}",
            (a["macs"] / 1e6, 100 * a["accuracy"]),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize=8,
            color="tab:gray",
        )
    budgeted = sorted(report.get("budgeted", []), key=point_macs)
    if budgeted:
        ax_curve.plot(
            [point_macs(b) / 1e6 for b in budgeted],
            [100 * b["test_accuracy"] for b in budgeted],
            "-",
            color="tab:blue",
            label="budgeted batch (test)",
        )
    for label, entry in (report.get("policies") or {}).items():
        curve = sorted(entry["curve"], key=point_macs)
        ax_curve.plot(
            [point_macs(b) / 1e6 for b in curve],
            [100 * b["test_accuracy"] for b in curve],
            "-" if "+ts" not in label else ":",
            lw=0.9,
            alpha=0.7,
            label=f"{label} (test)",
        )
    op = report.get("operating_point")
    if op and op.get("realised"):
        realised = op["realised"]
        ax_curve.plot(
            [realised["avg_macs"] / 1e6],
            [100 * realised["accuracy"]],
            "*",
            ms=16,
            color="tab:red",
            label="realised (run_dynamic)",
        )
    ax_curve.set_xlabel("average MACs per sample (millions)")
    ax_curve.set_ylabel("test accuracy (%)")
    ax_curve.set_title("accuracy vs compute")
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(loc="lower right", fontsize=8)

    if op and op.get("realised"):
        fractions = op["realised"]["exit_fractions"]
        ks = list(range(len(fractions)))
        ax_hist.bar(ks, [100 * f for f in fractions], color="tab:red", alpha=0.7, label="realised")
        if op.get("simulated"):
            ax_hist.step(
                [k + 0.5 for k in [-1, *ks]],
                [0, *(100 * f for f in op["simulated"]["exit_fractions"])],
                where="pre",
                color="k",
                lw=1,
                label="simulated",
            )
        ax_hist.set_xticks(ks)
        ax_hist.set_xlabel("exit")
        ax_hist.set_ylabel("samples (%)")
        ax_hist.set_title("where test samples exit")
        ax_hist.legend(fontsize=8)
    else:
        ax_hist.axis("off")
    _save(fig, path)


def plot_curves(curves: dict[str, tuple[list[float], list[float]]], path: str | Path, *, title: str = "") -> None:
    """Overlay accuracy-vs-MACs curves (``label -> (avg MACs, accuracy)``) in one plot, atomically written."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for label, (costs, accs) in curves.items():
        pairs = sorted(zip(costs, accs, strict=True))
        ax.plot([c / 1e6 for c, _ in pairs], [100 * a for _, a in pairs], "-", marker=".", ms=3, lw=1, label=label)
    ax.set_xlabel("average MACs per sample (millions)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "accuracy vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def _save(fig: Figure, path: str | Path) -> None:
    """Render ``fig`` as PNG and write it atomically (the old plot stays until the new one is complete)."""
    import io

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())
