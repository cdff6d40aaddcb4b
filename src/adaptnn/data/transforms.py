"""Per-sample training and evaluation transforms for [C, H, W] image tensors."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

__all__ = ["ScaleNormalize", "make_transforms"]


class ScaleNormalize:
    """Convert to float32 in [0, 1] (uint8 is divided by 255) and normalise with ``mean``/``std``.

    Equivalent to ``v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])``
    fused into one multiply-add (several times faster per sample). Always returns a new tensor.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        std_t = torch.tensor(self.std).view(-1, 1, 1)
        self._shift = -torch.tensor(self.mean).view(-1, 1, 1) / std_t
        self._scale_float = 1.0 / std_t
        self._scale_uint8 = self._scale_float / 255.0

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        scale = self._scale_uint8 if image.dtype == torch.uint8 else self._scale_float
        return torch.addcmul(self._shift, image.to(torch.float32), scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def make_transforms(
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    augment: bool,
    pad: int,
    flip: bool,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
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
    eval_tf = ScaleNormalize(mean, std)
    aug: list[v2.Transform] = []
    if augment and pad > 0:
        aug.append(v2.RandomCrop(list(size), padding=pad))
    if augment and flip:
        aug.append(v2.RandomHorizontalFlip())
    train_tf = v2.Compose([*aug, eval_tf]) if aug else eval_tf
    return train_tf, eval_tf
