"""Build a threshold policy from its name (for configs, the CLI and benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..errors import ConfigError
from .base import ThresholdPolicy
from .confidence import ConfidencePolicy, EntropyPolicy, MarginPolicy
from .ensemble import AveragedEnsemblePolicy, BoostedEnsemblePolicy
from .learned import LearnedPolicy, fit_learned_policy
from .patience import PatiencePolicy
from .temperature import fit_temperatures

__all__ = ["POLICY_NAMES", "make_policy", "policy_name", "policy_to_dict", "policy_from_dict"]

_FAMILIES: tuple[type[ThresholdPolicy], ...] = (
    ConfidencePolicy, EntropyPolicy, MarginPolicy, PatiencePolicy, AveragedEnsemblePolicy, BoostedEnsemblePolicy,
    LearnedPolicy,
)  # fmt: skip
_CLASSES: dict[str, type[ThresholdPolicy]] = {cls.name: cls for cls in _FAMILIES}

#: the calibratable rule families, by the ``name`` each class carries
POLICY_NAMES: tuple[str, ...] = tuple(_CLASSES)


def make_policy(
    name: str,
    num_exits: int,
    *,
    val_logits: Tensor | None = None,
    val_labels: Tensor | None = None,
    temperature: bool = False,
    **kwargs: Any,
) -> ThresholdPolicy:
    """A policy of family ``name`` with every exit disabled (thresholds to be calibrated).

    Args:
        name: one of :data:`POLICY_NAMES`.
        num_exits: K.
        val_logits, val_labels: validation logits ``[K, N, C]`` and labels, needed for ``temperature=True``
            and for ``learned`` (whose network is trained on them).
        temperature: fit per-exit temperatures on the validation logits (confidence-based rules only).
        **kwargs: family parameters (``r`` for ``boosted``; ``hidden``, ``steps``, ``seed`` for ``learned``).
    """
    if name not in POLICY_NAMES:
        raise ConfigError(f"unknown policy {name!r}; choose one of {list(POLICY_NAMES)}")
    thresholds: Sequence[float | None] = [None] * (num_exits - 1)
    temps = None
    if temperature:
        if name == "patience":
            raise ConfigError("temperature scaling does not apply to the patience rule (it only uses argmax)")
        if val_logits is None or val_labels is None:
            raise ConfigError("temperature=True needs val_logits and val_labels to fit the temperatures on")
        temps = fit_temperatures(val_logits, val_labels)
    if name == "confidence":
        return ConfidencePolicy(thresholds, temperatures=temps)
    if name == "entropy":
        return EntropyPolicy(thresholds, temperatures=temps)
    if name == "margin":
        return MarginPolicy(thresholds, temperatures=temps)
    if name == "patience":
        return PatiencePolicy(thresholds)
    if name == "average":
        return AveragedEnsemblePolicy(thresholds, temperatures=temps)
    if name == "boosted":
        return BoostedEnsemblePolicy(thresholds, r=kwargs.pop("r", 0.5), temperatures=temps)
    if val_logits is None or val_labels is None:
        raise ConfigError("the learned policy needs val_logits and val_labels to train its network on")
    return fit_learned_policy(val_logits, val_labels, thresholds=thresholds, temperatures=temps, **kwargs)


def policy_name(policy: ThresholdPolicy) -> str:
    """The registry name of a shipped policy's family (``"confidence"``, ...)."""
    if _CLASSES.get(getattr(policy, "name", "")) is not type(policy):
        raise ConfigError(f"{type(policy).__name__} is not one of the named policy families {list(POLICY_NAMES)}")
    return policy.name


def policy_to_dict(policy: ThresholdPolicy) -> dict[str, Any]:
    """JSON-ready description of a named policy (:meth:`ThresholdPolicy.to_dict`)."""
    policy_name(policy)
    return policy.to_dict()


def policy_from_dict(data: dict[str, Any]) -> ThresholdPolicy:
    """Rebuild a policy written by :func:`policy_to_dict` (``null`` thresholds read back as disabled exits)."""
    name = data.get("name") if isinstance(data, dict) else None
    if name not in _CLASSES:
        raise ConfigError(f"unknown policy {name!r} in the saved description; expected one of {list(POLICY_NAMES)}")
    return _CLASSES[name].from_dict(data)
