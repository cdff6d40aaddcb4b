"""Frozen-backbone exit fitting: train only the exit heads of a pretrained backbone.

Two ways:

* :class:`FrozenBackbone`, a strategy for the ordinary :class:`~adaptnn.training.Trainer`: the segments are
  frozen (``requires_grad=False``, kept in eval mode so normalisation statistics stay those of the
  pretrained backbone) and run without autograd; the heads are trained with the joint loss. Works with
  data augmentation and with any backbone wrapped as a :class:`~adaptnn.runtime.StagedModel` (timm,
  torchvision, Hugging Face adapters).
* :func:`fit_heads_cached`: runs the frozen segments **once** over the training set, caches every head's
  input on the CPU, and trains the heads for many epochs on the cache (no backbone compute after the
  first pass). Only valid without random augmentation (the cached features are those of one view); the
  cache size is checked against ``max_cache_bytes`` before anything is computed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from ..runtime.state import State, cat_states, index_state, map_state, state_tensors
from .base import Strategy
from .joint import JointLoss

if TYPE_CHECKING:
    from ..runtime.staged import StagedModel

__all__ = ["FrozenBackbone", "freeze_backbone", "cache_head_inputs", "fit_heads_cached"]

log = logging.getLogger(__name__)


def freeze_backbone(model: StagedModel) -> None:
    """``requires_grad=False`` on every segment parameter and the segments in eval mode."""
    for p in model.segments.parameters():
        p.requires_grad_(False)
    model.segments.eval()


def _run_without_grad(index: int, segment: nn.Module, state: State) -> State:
    """The ``segment`` callback of a frozen walk: the segment runs without autograd."""
    with torch.no_grad():
        return segment(state)


class FrozenBackbone(Strategy):
    """Joint loss on the heads only; the backbone's segments are frozen and run without autograd.

    Args:
        weights: per-exit loss weights (``"uniform"``, ``"linear"`` or a list).
        label_smoothing: of the cross-entropies.
    """

    name = "frozen"

    def __init__(self, weights: str | Sequence[float] = "uniform", label_smoothing: float = 0.0) -> None:
        self.weights = weights
        self.label_smoothing = label_smoothing
        self._loss = JointLoss(weights, label_smoothing)

    def setup(self, model: StagedModel) -> None:
        freeze_backbone(model)
        if not any(p.requires_grad for p in model.heads.parameters()):
            raise ConfigError("frozen: the exit heads have no trainable parameters")

    def train_mode(self, model: StagedModel) -> None:
        model.segments.eval()

    def forward(self, model: StagedModel, x: Tensor) -> list[Tensor]:
        """Every exit's logits; the segments run under ``torch.no_grad()``, the heads with autograd."""
        model.check_input(x, check_finite=False)
        return model.walk(x, segment=_run_without_grad)

    def __call__(self, exit_logits: list[Tensor], targets: Tensor) -> Tensor:
        return self._loss(exit_logits, targets)


def _state_nbytes(state: State) -> int:
    return sum(t.element_size() * t.numel() for t in state_tensors(state))


@torch.no_grad()
def cache_head_inputs(
    model: StagedModel,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    max_cache_bytes: int = 4 * 2**30,
) -> tuple[list[State], Tensor]:
    """Run the segments once over ``dataset`` (eval mode) and keep every head's input on the CPU.

    Returns:
        ``(head_inputs, labels)``: one cached state per exit (batch dim 0 = the dataset order) and ``[N]`` labels.

    Raises:
        ConfigError: the cache would exceed ``max_cache_bytes`` (estimated from the first batch).
    """
    model.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    per_exit: list[list[State]] = [[] for _ in range(model.num_exits)]
    labels: list[Tensor] = []

    def keep_head_input(k: int, head: nn.Module, state: State) -> None:
        """The ``head`` callback: store head ``k``'s input (on the CPU) instead of running the head."""
        per_exit[k].append(map_state(state, lambda t: t.detach().to("cpu", copy=True)))

    for i, (x, y) in enumerate(loader):
        model.walk(x.to(device), head=keep_head_input)
        labels.append(torch.as_tensor(y).long())
        if i == 0:
            estimate = sum(_state_nbytes(p[0]) for p in per_exit) * len(dataset) / max(1, len(y))
            if estimate > max_cache_bytes:
                raise ConfigError(
                    f"caching the head inputs of {len(dataset)} samples needs about {estimate / 2**30:.1f} GiB, more "
                    f"than max_cache_bytes={max_cache_bytes / 2**30:.1f} GiB; raise the limit or train with the "
                    "'frozen' strategy through the Trainer instead (no cache)"
                )
    return [cat_states(p) for p in per_exit], torch.cat(labels)


def fit_heads_cached(
    model: StagedModel,
    dataset: Dataset,
    *,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: torch.device | str = "cpu",
    max_cache_bytes: int = 4 * 2**30,
) -> list[dict[str, Any]]:
    """Freeze the backbone, cache the heads' inputs once, and train every head on the cache (AdamW, cosine).

    Every head gets its own cross-entropy (the heads share nothing, so this equals the joint loss with
    uniform weights). ``dataset`` should use deterministic (evaluation) transforms.

    Returns:
        One ``{"epoch", "train_loss", "train_exit_accuracy"}`` record per epoch.
    """
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"fit_heads_cached: epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    freeze_backbone(model)
    inputs, labels = cache_head_inputs(
        model, dataset, batch_size=max(batch_size, 256), device=device, max_cache_bytes=max_cache_bytes
    )
    heads = model.heads.to(device)
    params = [p for p in heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n = len(labels)
    steps_per_epoch = max(1, n // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, Any]] = []
    for epoch in range(epochs):
        heads.train()
        order = torch.randperm(n, generator=generator)
        loss_sum = 0.0
        correct = torch.zeros(model.num_exits, dtype=torch.long)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size] if n >= batch_size else order
            y = labels[idx].to(device)
            feats = [map_state(index_state(inputs[k], idx), lambda t: t.to(device)) for k in range(model.num_exits)]
            logits = [heads[k](f) for k, f in enumerate(feats)]
            loss = sum(torch.nn.functional.cross_entropy(lg, y) for lg in logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += torch.stack([(lg.argmax(-1) == y).sum().cpu() for lg in logits])
        seen = steps_per_epoch * min(batch_size, n)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_exit_accuracy": (correct / seen).tolist()}
        log.info("heads epoch %d/%d loss %.4f", epoch + 1, epochs, record["train_loss"])
        history.append(record)
    model.eval()
    return history
