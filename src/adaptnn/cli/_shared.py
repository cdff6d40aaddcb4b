"""Helpers shared by several subcommands: the run-config options and the result summary."""

from __future__ import annotations

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from ..data import DataConfig
from ..runs.config import CalibrationConfig, EvalConfig, ModelConfig, RunConfig
from ..training import TrainConfig

__all__ = ["add_run_config", "run_config_from_args", "summarise_report"]


def add_run_config(parser: ArgumentParser) -> None:
    """Add ``--config``, ``--run_dir`` and one option group per section of :class:`RunConfig`."""
    parser.add_argument("--config", action=ActionConfigFile, help="YAML run config (see configs/).")
    parser.add_argument("--run_dir", type=str, default="runs/default", help="Output directory of the run.")
    parser.add_class_arguments(DataConfig, "data", help="Dataset and validation split.")
    parser.add_class_arguments(ModelConfig, "model", help="Registered model name and its arguments.")
    parser.add_class_arguments(TrainConfig, "train", help="Optimisation.")
    parser.add_class_arguments(CalibrationConfig, "calibration", help="Operating-point selection.")
    parser.add_class_arguments(EvalConfig, "eval", help="Evaluation.")


def run_config_from_args(args: Namespace) -> RunConfig:
    """The :class:`RunConfig` described by parsed options (strictly validated)."""
    return RunConfig.from_dict({section: args[section].as_dict() for section in RunConfig.__dataclass_fields__})


def summarise_report(report: dict) -> str:
    """A few human-readable lines about a ``report.json``."""
    op = report["operating_point"]
    real, sim = op["realised"], op["simulated"]
    last = report["anytime"][-1]
    lines = ["exit  MACs(M)  accuracy"]
    lines += [f"{a['exit']:>4}  {a['macs'] / 1e6:7.3f}  {100 * a['accuracy']:7.2f}%" for a in report["anytime"]]
    lines.append(
        f"operating point p={op['p']}: realised accuracy {100 * real['accuracy']:.2f}% "
        f"(last exit {100 * last['accuracy']:.2f}%), avg MACs {real['avg_macs'] / 1e6:.3f}M "
        f"= {op['macs_reduction_vs_last_exit']:.2f}x fewer than the last exit"
    )
    lines.append(
        f"simulated: accuracy {100 * sim['accuracy']:.2f}%, avg MACs {sim['avg_macs'] / 1e6:.3f}M; "
        f"realised == simulated: {op['realised_equals_simulated']}"
    )
    lines.append(
        f"wall time on {real['device']} (batch {real['batch_size']}): dynamic {real['wall_time_s']:.3f}s vs full "
        f"model {real['full_model_wall_time_s']:.3f}s ({real['speedup']:.2f}x)"
    )
    lines.append(f"exit fractions: {[round(f, 3) for f in real['exit_fractions']]}")
    return "\n".join(lines)
