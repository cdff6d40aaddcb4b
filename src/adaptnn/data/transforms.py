"""Per-sample training and evaluation transforms (torchvision.transforms.v2 on tensors)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

__all__ = ["make_transforms"]


def make_transforms(
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    augment: bool,
    pad: int,
    flip: bool,
) -> tuple[v2.Transform, v2.Transform]:
    """Build the (train, eval) transforms for [C, H, W] uint8 or [0, 1] float image tensors.

    Args:
        size: (H, W) of the images.
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel std divided by after subtracting the mean.
        augment: If False, the train transform equals the eval transform.
        pad: Zero padding of the random crop back to ``size`` (0 disables the crop).
        flip: Whether to add a random horizontal flip.

    Returns:
        (train_transform, eval_transform); both output float32 normalised tensors.
    """
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    eval_tf = v2.Compose(to_float)
    aug: list[v2.Transform] = []
    if augment and pad > 0:
        aug.append(v2.RandomCrop(list(size), padding=pad))
    if augment and flip:
        aug.append(v2.RandomHorizontalFlip())
    train_tf = v2.Compose(aug + to_float) if aug else eval_tf
    return train_tf, eval_tf
