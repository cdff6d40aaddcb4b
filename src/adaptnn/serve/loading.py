"""A calibrated run directory as something to serve: its model and calibrated exit rule as a backend."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..policies import policy_from_dict
from ..runs import read_calibration
from ..runs.rundir import LoadedRun, load_run, require_trained
from .backends import OnnxBackend, StageBackend, TorchBackend

__all__ = ["ServedRun", "load_served", "BACKENDS"]

BACKENDS = ("torch", "onnx")


@dataclass
class ServedRun:
    """A run read back for serving: the loaded run and the backend that runs its stages."""

    run: LoadedRun
    backend: StageBackend
    policy_name: str


def load_served(
    run_dir: str | Path,
    *,
    backend: str = "torch",
    onnx_dir: str | Path | None = None,
    trust_code: bool = False,
    allow_data_change: bool = False,
) -> ServedRun:
    """Load ``run_dir`` (trained and calibrated) and build its stage backend.

    ``backend="onnx"`` runs the ``stages`` export in ``onnx_dir`` (default ``RUN_DIR/onnx_stages``, written by
    ``adaptnn export RUN_DIR``); its manifest's thresholds are the calibrated ones.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    run_dir = Path(run_dir)
    require_trained(run_dir)
    calib_path = run_dir / "calibration.json"
    if not calib_path.exists():
        raise ConfigError(f"{run_dir} is not calibrated (no calibration.json); run `adaptnn calibrate {run_dir}` first")
    policy = policy_from_dict(read_calibration(calib_path)["policy_spec"])
    loaded = load_run(run_dir, trust_code=trust_code, allow_data_change=allow_data_change)
    model = loaded.model.to(loaded.device).eval()
    if backend == "torch":
        served: StageBackend = TorchBackend(model, policy, sample_shape=tuple(loaded.splits.input_size))
    else:
        export_dir = Path(onnx_dir) if onnx_dir is not None else run_dir / "onnx_stages"
        if not (export_dir / "manifest.json").is_file():
            raise ConfigError(f"no stages export at {export_dir}; run `adaptnn export {run_dir} --mode stages` first")
        served = OnnxBackend(export_dir)
    return ServedRun(loaded, served, str(getattr(policy, "name", type(policy).__name__)))
