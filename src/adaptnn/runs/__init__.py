"""Run directories: the train / calibrate / evaluate workflows over one directory, and their config.

* :mod:`.config`: :class:`RunConfig` (saved as ``config.yaml``) and the embedded :func:`quickstart_config`;
* :mod:`.rundir`: the directory's files, loading a trained run back, writing the config once, recovering after
  killed writers and swapping a staged ``--overwrite`` run in (every writer holds :class:`adaptnn.io.RunLock`);
* :mod:`.train`: :func:`train_run`, :func:`build_model_for_data`;
* :mod:`.calibrate`: :func:`calibrate_run`, :func:`strategy_policy`, :func:`read_calibration`;
  :mod:`.calibrators`: one small function per way of choosing the operating point, selected from a table;
* :mod:`.evaluate`: :func:`evaluate_run`, :func:`compare_policies`; :mod:`.report` assembles ``report.json``
  (and :func:`read_report` reads one back);
* :mod:`.naming`: cost figures in the directory's JSON are named by unit (``avg_macs``, ``val_avg_macs``);
* :mod:`.targets`: a run directory or a registered model name as something to measure.

The CLI (:mod:`adaptnn.cli`) is a thin layer over these functions.
"""

from .calibrate import calibrate_run, read_calibration, strategy_policy
from .config import CalibrationConfig, EvalConfig, ModelConfig, RunConfig, load_config, quickstart_config, save_config
from .evaluate import compare_policies, evaluate_run
from .report import read_report
from .targets import Target, resolve_target
from .train import build_model_for_data, train_run

__all__ = [
    "CalibrationConfig",
    "EvalConfig",
    "ModelConfig",
    "RunConfig",
    "Target",
    "build_model_for_data",
    "calibrate_run",
    "compare_policies",
    "evaluate_run",
    "load_config",
    "quickstart_config",
    "read_calibration",
    "read_report",
    "resolve_target",
    "save_config",
    "strategy_policy",
    "train_run",
]
