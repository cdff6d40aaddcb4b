"""The model's own past as its teacher: an exponential moving average of its weights, snapshots, earlier checkpoints.

:class:`ModelTeacher` holds frozen copies of the model (eval mode, no gradients) and answers a batch with the
last-exit logits of every member; the ``distill`` strategy with ``teacher: model`` distils every exit towards
the mean of their softened predictions (a snapshot ensemble when several snapshots are kept). Members:

* ``ema_decay``: one copy updated after every optimizer step, ``w_ema <- d * w_ema + (1 - d) * w`` (buffers such
  as batch-norm statistics are copied); its weights travel in every checkpoint, so resuming is exact;
* ``snapshot_epochs``: after those epochs the weights are written to ``checkpoints/epoch<N>.safetensors``
  (atomically, *before* the checkpoint that lists them) and join the teacher;
* ``checkpoints``: ``.safetensors`` checkpoints of the same model (safetensors + JSON: no pickle, no code)
  that teach from the start.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..io.checkpoint import load_checkpoint, load_weights, save_checkpoint
from ..runtime.staged import StagedModel
from .config import TeacherConfig

__all__ = ["ModelTeacher", "ema_update", "frozen_copy", "load_teacher"]


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every parameter frozen."""
    out = copy.deepcopy(model).eval()
    for param in out.parameters():
        param.requires_grad_(False)
    return out


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema``'s floating parameters <- ``decay * ema + (1 - decay) * model``; its buffers <- the model's."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        if e.is_floating_point():
            e.lerp_(p.detach(), 1.0 - decay)
        else:
            e.copy_(p)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def load_teacher(model: nn.Module, path: str | Path) -> nn.Module:
    """A frozen copy of ``model`` holding the weights of checkpoint ``path`` (safetensors; shapes must match)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"teacher checkpoint {path} does not exist; expected a .safetensors file of this model")
    teacher = frozen_copy(model)
    load_weights(teacher, load_checkpoint(path).model_state, source=str(path))
    return teacher


class ModelTeacher:
    """Frozen copies of the model (EMA, snapshots, checkpoints) as a distillation teacher.

    Args:
        model: the student (copied; moved with it by the caller before the copies are made).
        config: which members to keep.
        snapshot_dir: where snapshots are written (``run_dir/checkpoints``).
    """

    def __init__(self, model: StagedModel, config: TeacherConfig, snapshot_dir: str | Path) -> None:
        self.config = config
        self.snapshot_dir = Path(snapshot_dir)
        self.ema: nn.Module | None = frozen_copy(model) if config.ema_decay is not None else None
        self.fixed = [load_teacher(model, p) for p in config.checkpoints]
        self.snapshots: dict[int, nn.Module] = {}

    @property
    def members(self) -> list[nn.Module]:
        """Every teaching copy: EMA, given checkpoints, snapshots (by epoch)."""
        ema = [self.ema] if self.ema is not None else []
        return ema + self.fixed + [self.snapshots[e] for e in sorted(self.snapshots)]

    @torch.no_grad()
    def __call__(self, x: Tensor) -> list[Tensor]:
        """Last-exit logits ``[B, C]`` of every member on ``x`` (empty before the first snapshot of a snapshot-only
        teacher)."""
        return [member(x).detach() for member in self.members]

    def after_step(self, model: nn.Module) -> None:
        """Advance the EMA (called after every optimizer step)."""
        if self.ema is not None:
            ema_update(self.ema, model, float(self.config.ema_decay))

    def snapshot_path(self, epoch: int) -> Path:
        """``checkpoints/epoch<N>.safetensors``."""
        return self.snapshot_dir / f"epoch{epoch}.safetensors"

    def after_epoch(self, model: nn.Module, epoch: int, meta: dict[str, Any], *, write: bool) -> None:
        """After epoch ``epoch`` (1-based): keep a snapshot when asked (``write``: rank 0 writes its file)."""
        if epoch in self.config.snapshot_epochs:
            if write:
                save_checkpoint(self.snapshot_path(epoch), model, dict(meta, epoch=epoch - 1))
            self.snapshots[epoch] = frozen_copy(model)

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """``(json, tensors)`` for checkpoints: the snapshot epochs kept and the EMA weights."""
        tensors = {k: v.detach().cpu().clone() for k, v in self.ema.state_dict().items()} if self.ema else {}
        return {"snapshots": sorted(self.snapshots)}, tensors

    def restore(self, model: nn.Module, state: dict[str, Any], tensors: dict[str, Tensor], source: str) -> None:
        """Bring back :meth:`state` (EMA weights from the checkpoint, snapshots from their files)."""
        if self.ema is not None:
            if not tensors:
                raise CheckpointError(f"{source} holds no EMA teacher weights; resume with its config or start over")
            load_weights(self.ema, tensors, source=f"{source} (EMA teacher)")
        self.snapshots = {}
        for epoch in state.get("snapshots", []):
            self.snapshots[int(epoch)] = load_teacher(model, self.snapshot_path(int(epoch)))
