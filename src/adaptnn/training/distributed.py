"""Data parallelism: which process this is, the process group, and each process's share of every batch.

Every process draws the same permutation of the training split and takes a contiguous share of each global
batch (:func:`micro_batch_indices`), so N processes see exactly the batches one process sees. The process
group is set up from torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``): gloo on CPU, NCCL
on GPU.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler

__all__ = [
    "MicroBatchSampler",
    "all_reduce_totals",
    "barrier",
    "micro_batch_indices",
    "process_group",
    "process_layout",
]

log = logging.getLogger(__name__)


def process_layout(mode: str) -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from torchrun's environment; ``(1, 0, 0)`` when ``mode == "off"``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if mode == "auto" else 1
    if world_size <= 1:
        return 1, 0, 0
    return world_size, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


@contextmanager
def process_group(world_size: int, rank: int, device: torch.device) -> Iterator[None]:
    """Run the body inside a process group (NCCL on CUDA, else gloo), created here unless one exists.

    A group created here is destroyed on exit; one that already existed (the caller's) is left alone.
    """
    owned = False
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owned = True
        log.info("DDP: rank %d of %d on %s", rank, world_size, device)
    try:
        yield
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def barrier(world_size: int) -> None:
    """Wait for every process (no-op in a single process)."""
    if world_size > 1 and dist.is_initialized():
        dist.barrier()


def all_reduce_totals(totals: dict[str, Tensor], world_size: int) -> dict[str, Tensor]:
    """Sum scalar float64 totals over the processes, by name (a name missing on a process counts 0 there).

    Returns the sums for the union of the names, sorted; single-process: ``totals`` unchanged.
    """
    if world_size <= 1 or not dist.is_initialized():
        return totals
    names: list[list[str] | None] = [None] * world_size
    dist.all_gather_object(names, sorted(totals))
    keys = sorted({key for part in names for key in part or ()})
    reference = next(iter(totals.values()))
    stacked = torch.stack([totals.get(key, torch.zeros_like(reference)) for key in keys])
    dist.all_reduce(stacked)
    return dict(zip(keys, stacked.unbind(), strict=True))


def micro_batch_indices(
    num_samples: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    world_size: int = 1,
    rank: int = 0,
    accum_steps: int = 1,
    drop_last: bool = True,
) -> list[list[list[int]]]:
    """This process's micro-batches of every global batch of an epoch.

    The global batches come from one permutation of ``num_samples`` seeded by ``(seed, epoch)`` (the same
    permutation ``RandomSampler`` draws); each is cut into ``world_size * accum_steps`` contiguous parts and
    process ``rank`` takes parts ``rank * accum_steps .. (rank + 1) * accum_steps - 1``.

    Returns:
        ``[global batch][micro-batch] -> sample indices``.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(num_samples, generator=generator)
    n_batches = num_samples // batch_size if drop_last else math.ceil(num_samples / batch_size)
    parts = world_size * accum_steps
    out: list[list[list[int]]] = []
    for b in range(n_batches):
        chunks = torch.tensor_split(perm[b * batch_size : (b + 1) * batch_size], parts)
        out.append([c.tolist() for c in chunks[rank * accum_steps : (rank + 1) * accum_steps]])
    return out


class MicroBatchSampler(Sampler[list[int]]):
    """A DataLoader ``batch_sampler`` yielding the micro-batches of :func:`micro_batch_indices` in order."""

    def __init__(self, batches: list[list[list[int]]]) -> None:
        self.flat = [mb for batch in batches for mb in batch]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.flat)

    def __len__(self) -> int:
        return len(self.flat)
