"""Exceptions adaptnn raises for bad user input.

Every error a user can cause derives from :class:`AdaptnnError`, so the CLI can print the message
alone (no traceback) and exit with status 2. Each class also derives from the built-in exception a
Python user would expect (``ValueError``, ``FileNotFoundError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "AdaptnnError",
    "ConfigError",
    "CheckpointError",
    "DataError",
    "InputError",
    "BudgetError",
    "DivergedLossError",
    "UnsupportedModelError",
]


class AdaptnnError(Exception):
    """Base class of every error caused by user input (config, data, checkpoint, tensors)."""


class ConfigError(AdaptnnError, ValueError):
    """A configuration value or key is unknown, missing or out of range."""


class CheckpointError(AdaptnnError, ValueError):
    """A checkpoint file is missing, truncated, corrupt or belongs to another model."""


class DataError(AdaptnnError, ValueError):
    """A dataset is missing, empty or malformed."""


class InputError(AdaptnnError, ValueError):
    """A tensor given to a model has the wrong type, shape, channels or non-finite values."""


class BudgetError(AdaptnnError, ValueError):
    """A compute/accuracy budget cannot be met; the message names the closest achievable point."""


class DivergedLossError(AdaptnnError, ArithmeticError):
    """The training loss became NaN or infinite (learning rate too high, or non-finite inputs)."""


class UnsupportedModelError(ConfigError):
    """A backbone's structure cannot be turned into a staged model (e.g. a custom forward an adapter cannot split).

    A configuration error (the user asked for a model adaptnn cannot wrap), so ``except ConfigError`` catches it.
    """
