"""Per-sample training and evaluation transforms for [C, H, W] image tensors, and batch-level curriculum transforms.

The batch-level ones (:func:`lowpass_crop`, :func:`resize_down`, :func:`jitter_batch`) act on ``[..., H, W]`` float
tensors on any device; the training curriculum (:mod:`adaptnn.training.curriculum`) applies them after the loader.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

__all__ = [
    "ScaleNormalize",
    "jitter_batch",
    "lowpass_crop",
    "make_transforms",
    "resize_down",
    "resized_crop_transforms",
]


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


def resized_crop_transforms(
    crop: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    augment: bool,
    resize: int | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """The standard ImageNet (train, eval) transforms for [C, H, W] uint8 or [0, 1] float images of any size.

    Training: a random crop of ``scale`` of the area and an aspect ratio in [3/4, 4/3], resized to
    ``crop`` x ``crop`` (antialiased bilinear), then a random horizontal flip. Evaluation: resize the shorter
    side to ``resize`` (default ``round(crop / 0.875)``, 256 for 224), then the central ``crop`` x ``crop``.
    Both end in :class:`ScaleNormalize`. ``augment=False`` makes the train transform the eval transform.
    """
    crop = int(crop)
    resize = round(crop / 0.875) if resize is None else int(resize)
    if crop < 1 or resize < crop:
        raise ValueError(f"resized_crop_transforms needs 1 <= crop <= resize, got crop={crop}, resize={resize}")
    norm = ScaleNormalize(mean, std)
    eval_tf = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(crop), norm])
    if not augment:
        return eval_tf, eval_tf
    train_tf = v2.Compose([v2.RandomResizedCrop(crop, scale=scale, antialias=True), v2.RandomHorizontalFlip(), norm])
    return train_tf, eval_tf


def _check_size(x: torch.Tensor, size: tuple[int, int]) -> tuple[int, int]:
    h, w = int(size[0]), int(size[1])
    if x.dim() < 2 or not 1 <= h <= x.shape[-2] or not 1 <= w <= x.shape[-1]:
        raise ValueError(f"target size {(h, w)} must be within 1..{tuple(x.shape[-2:])} (input shape {list(x.shape)})")
    return h, w


def _centred(n: int, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` lowest frequencies of an ``n``-point FFT, in ``fft`` order (0, 1, .., -2, -1)."""
    pos = (keep + 1) // 2  # frequencies 0..pos-1 and -(keep-pos)..-1
    return torch.cat([torch.arange(pos), torch.arange(n - (keep - pos), n)])


def lowpass_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """EfficientTrain's low-frequency crop: keep the central ``size`` window of the 2-D spectrum and invert it.

    The result is a smaller image ``[..., h, w]`` holding exactly the lowest ``h x w`` frequencies of ``x``
    (a band-limited downsample: no aliasing, unlike strided resizing). Amplitudes are kept (``norm="forward"``:
    the mean and a low-frequency cosine keep their values); the full window returns ``x`` (up to rounding).
    Computed in float32 (float64 stays float64) and returned in ``x``'s dtype.
    """
    h, w = _check_size(x, size)
    if (h, w) == tuple(x.shape[-2:]):
        return x.clone()
    work = x if x.dtype == torch.float64 else x.float()
    spec = torch.fft.rfft2(work, norm="forward")  # real input: half the spectrum along the last dim
    rows = _centred(x.shape[-2], h).to(x.device)
    spec = spec.index_select(-2, rows)[..., : w // 2 + 1]
    return torch.fft.irfft2(spec, s=(h, w), norm="forward").to(x.dtype)


def resize_down(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a ``[B, C, H, W]`` batch to ``size`` with antialiasing (identity at the full size)."""
    h, w = _check_size(x, size)
    if (h, w) == tuple(x.shape[-2:]):
        return x.clone()
    return F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)


def jitter_batch(x: torch.Tensor, magnitude: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random translation, contrast and brightness of a normalised ``[B, C, H, W]`` batch.

    ``magnitude`` in [0, 1] scales every operation (0 returns ``x`` unchanged, drawing no random numbers): shifts
    up to ``magnitude * 12.5%`` of each side (zero fill), contrast factors in ``1 +- 0.4 * magnitude`` and
    brightness offsets in ``+- 0.4 * magnitude`` (in normalised units). The growing augmentation of a curriculum.
    """
    if magnitude <= 0:
        return x
    b, _, h, w = x.shape
    rand = torch.rand(b, 4, generator=generator, device=x.device if generator is None else generator.device)
    rand = rand.to(x.device, x.dtype) * 2 - 1  # [-1, 1)
    contrast = (1 + 0.4 * magnitude * rand[:, 0]).view(b, 1, 1, 1)
    brightness = (0.4 * magnitude * rand[:, 1]).view(b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    out = (x - mean) * contrast + mean + brightness
    max_dy, max_dx = magnitude * 0.125 * h, magnitude * 0.125 * w
    dy, dx = (rand[:, 2] * max_dy).round().long(), (rand[:, 3] * max_dx).round().long()
    rows = torch.arange(h, device=x.device).view(1, h) - dy.view(b, 1)  # source row of each target row
    cols = torch.arange(w, device=x.device).view(1, w) - dx.view(b, 1)
    valid = ((rows >= 0) & (rows < h)).view(b, 1, h, 1) & ((cols >= 0) & (cols < w)).view(b, 1, 1, w)
    rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    idx_r = rows.view(b, 1, h, 1).expand(b, out.shape[1], h, w)
    out = out.gather(2, idx_r)
    idx_c = cols.view(b, 1, 1, w).expand(b, out.shape[1], h, w)
    out = out.gather(3, idx_c)
    return out * valid
