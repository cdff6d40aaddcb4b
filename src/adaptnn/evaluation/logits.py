"""Cached logits: every exit's outputs on a split, computed once with ``forward_all`` and reused."""

from __future__ import annotations

import sys

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..errors import DataError
from ..runtime.staged import StagedModel

__all__ = ["collect_logits", "eval_loader"]


def eval_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    """A sequential loader over ``dataset``; an empty split is a :class:`DataError`."""
    if len(dataset) == 0:
        raise DataError("cannot evaluate on an empty split")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


@torch.inference_mode()
def collect_logits(
    model: StagedModel,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "logits",
) -> tuple[Tensor, Tensor]:
    """Logits of every exit on ``dataset``: ``([K, N, C] float32 on CPU, labels [N] long)``.

    ``model`` is put in eval mode and moved to ``device`` (and left so).
    """
    model.eval().to(device)
    chunks: list[Tensor] = []
    labels: list[Tensor] = []
    show = progress and sys.stderr.isatty()
    for x, y in tqdm(eval_loader(dataset, batch_size), desc=desc, disable=not show, leave=False):
        x = x.to(device)
        model.check_input(x, check_finite=True)
        chunks.append(torch.stack(model.forward_all(x)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(chunks, dim=1), torch.cat(labels).long()
