"""adaptnn: computation-efficient dynamic neural networks with real per-sample early exit."""

from . import _deprecated
from .adapters import from_hf, from_timm, from_torchvision
from .errors import (
    AdaptnnError,
    BudgetError,
    CheckpointError,
    ConfigError,
    DataError,
    DivergedLossError,
    InputError,
    UnsupportedModelError,
)
from .models import create_model, list_models, register_model
from .policies import ConfidencePolicy, ExitPolicy, NeverExit, simulate_exits
from .runtime.staged import DynamicOutput, InputSpec, StagedModel
from .version import __version__

_deprecated.install()  # old flat module paths (adaptnn 0.1) still import, with a FutureWarning

__all__ = [
    "AdaptnnError",
    "BudgetError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DivergedLossError",
    "UnsupportedModelError",
    "InputError",
    "ConfidencePolicy",
    "DynamicOutput",
    "ExitPolicy",
    "InputSpec",
    "NeverExit",
    "StagedModel",
    "create_model",
    "from_hf",
    "from_timm",
    "from_torchvision",
    "list_models",
    "register_model",
    "simulate_exits",
    "__version__",
]
