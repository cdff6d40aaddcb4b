"""Helpers shared by several subcommands: the run-config options, safe YAML for jsonargparse, the result summary.

jsonargparse parses YAML itself (``--config`` files, ``--train FILE`` group files, dict and list flags such as
``--model.kwargs``). Two guards keep hostile YAML from it:

* :class:`SafeConfigFile` (the ``--config`` action) reads the file, or the YAML string given instead of a path,
  with :func:`adaptnn.io.yamlfile.read_yaml` first: an alias bomb, an oversized, empty or non-mapping file ends
  the command with one line on stderr and exit status 2, before jsonargparse expands anything;
* :data:`SAFE_YAML_MODE` is a jsonargparse parser mode whose loader checks every text with
  :func:`~adaptnn.io.yamlfile.check_yaml_text` (size, no anchors/aliases, bounded depth and node count) and then
  loads it exactly as jsonargparse's ``yaml`` mode does; the top-level parser uses it.
"""

from __future__ import annotations

import os
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace, get_loader, set_loader

from ..data import DataConfig
from ..errors import ConfigError
from ..io.yamlfile import check_yaml_text, load_yaml_text, read_yaml, require_mapping
from ..runs.config import CONFIG_EXPECTED, CalibrationConfig, EvalConfig, ModelConfig, RunConfig
from ..training import TrainConfig

__all__ = [
    "SAFE_YAML_MODE",
    "SafeConfigFile",
    "add_run_config",
    "check_config_value",
    "run_config_from_args",
    "summarise_report",
]

#: jsonargparse ``parser_mode`` whose YAML loader refuses anchors/aliases and bounds size, depth and node count
SAFE_YAML_MODE = "adaptnn_safe_yaml"
_jsonargparse_yaml = get_loader("yaml")


def _safe_yaml_load(text: str) -> Any:
    """jsonargparse's own YAML loading, after :func:`~adaptnn.io.yamlfile.check_yaml_text` accepted the text."""
    check_yaml_text(text, "the YAML given")
    return _jsonargparse_yaml(text)


set_loader(SAFE_YAML_MODE, _safe_yaml_load, exceptions=(yaml.YAMLError, ConfigError))


def check_config_value(value: str) -> None:
    """Check what was given to ``--config`` (a path, or a YAML string as jsonargparse also accepts) safely.

    Raises:
        ConfigError: the file is missing, empty, too large, not YAML, uses anchors/aliases or is not a mapping.
    """
    value = str(value)
    if os.path.exists(value):
        require_mapping(read_yaml(value), value, CONFIG_EXPECTED)
        return
    data = load_yaml_text(value, "the --config value")
    if data is None or isinstance(data, str):  # not a mapping written inline: a path that is not there
        raise ConfigError(f"no config file at {value}")
    require_mapping(data, "the --config value", CONFIG_EXPECTED)


class SafeConfigFile(ActionConfigFile):
    """``--config``: :func:`check_config_value` first, then jsonargparse's own config-file handling.

    A refused config ends the command with ``adaptnn CMD: error: ...`` (one line) and exit status 2, like the
    other errors jsonargparse reports while parsing.
    """

    def __call__(self, parser: ArgumentParser, cfg: Namespace, values: Any, option_string: str | None = None) -> None:
        try:
            check_config_value(values)
        except ConfigError as err:
            parser.exit(2, f"{parser.prog.replace(' [options]', '')}: error: {err}\n")
        super().__call__(parser, cfg, values, option_string)


def add_run_config(parser: ArgumentParser) -> None:
    """Add ``--config``, ``--run_dir`` and one option group per section of :class:`RunConfig`."""
    parser.add_argument("--config", action=SafeConfigFile, help="YAML run config (see configs/).")
    parser.add_argument("--run_dir", type=str, default="runs/default", help="Output directory of the run.")
    parser.add_class_arguments(DataConfig, "data", help="Dataset and validation split.")
    parser.add_class_arguments(ModelConfig, "model", help="Registered model name and its arguments.")
    parser.add_class_arguments(TrainConfig, "train", help="Optimisation.")
    parser.add_class_arguments(CalibrationConfig, "calibration", help="Operating-point selection.")
    parser.add_class_arguments(EvalConfig, "eval", help="Evaluation.")


def run_config_from_args(args: Namespace) -> RunConfig:
    """The :class:`RunConfig` described by parsed options, validated (:meth:`RunConfig.validate`)."""
    sections = {section: args[section].as_dict() for section in RunConfig.__dataclass_fields__}
    return RunConfig.from_dict(sections).validate()


def add_run_access(parser: ArgumentParser) -> None:
    """``--trust_code`` and ``--allow_data_change``: how a command reads a run directory (both off by default)."""
    parser.add_argument(
        "--trust_code",
        action=ActionYesNo,
        default=False,
        help="Treat the run's checkpoint like code you trust: allow local model folders, pass-through options "
        "and trust_remote_code from its header (off: a checkpoint is data and can only name declared arguments).",
    )
    parser.add_argument(
        "--allow_data_change",
        action=ActionYesNo,
        default=False,
        help="Proceed although the data or split differs from the run's splits.json (off: refuse).",
    )


def run_access(args: Namespace) -> dict[str, bool]:
    """The keyword arguments of :func:`add_run_access` for ``load_run``-based workflows."""
    return {"trust_code": bool(args.trust_code), "allow_data_change": bool(args.allow_data_change)}


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
