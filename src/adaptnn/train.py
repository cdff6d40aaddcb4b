"""Trainer for staged models: any exit strategy, SGD/AdamW, warm-up + cosine, atomic checkpoints, resume.

The Trainer owns one loop and stays the same for every strategy: the strategy is a callable
``(exit_logits, targets) -> loss`` (see :mod:`adaptnn.strategies`). After every epoch it writes
``checkpoints/last.safetensors`` atomically (weights, optimizer state, RNG states, epoch) and appends one
line of metrics to ``metrics.jsonl``; ``fit(resume=True)`` continues from that checkpoint and reaches the
same weights as an uninterrupted run (the data order of epoch e is a function of ``seed`` and ``e``).
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, load_weights, pack_tensors, save_checkpoint, unpack_tensors
from .errors import CheckpointError, ConfigError
from .models import model_spec
from .staged import StagedModel
from .strategies import JointLoss

__all__ = ["TrainConfig", "Trainer", "resolve_device", "seed_everything", "cosine_warmup_factor"]

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings.

    Attributes:
        epochs: passes over the training split.
        batch_size: samples per step.
        optimizer: ``"sgd"`` (momentum, Nesterov) or ``"adamw"``.
        lr: peak learning rate (reached after warm-up).
        momentum: SGD momentum (AdamW uses its default betas).
        weight_decay: decoupled for AdamW, L2 for SGD; not applied to biases and norm weights.
        warmup_epochs: linear warm-up length in epochs (fractions allowed).
        min_lr_ratio: final learning rate as a fraction of ``lr`` at the end of the cosine.
        exit_weights: ``"uniform"``, ``"linear"`` or a list, for the joint loss.
        label_smoothing: cross-entropy label smoothing.
        seed: seeds weights' init order, data order and augmentation.
        num_workers: DataLoader worker processes.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda[:i]"``.
        progress: show a progress bar.
    """

    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0
    exit_weights: str | list[float] = "uniform"
    label_smoothing: float = 0.0
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        """Raise :class:`ConfigError` for out-of-range values."""
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"train.epochs and train.batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"train.optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ConfigError("train.lr must be > 0 and train.weight_decay, train.warmup_epochs >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; otherwise ``torch.device(device)`` (checked)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"invalid device {device!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cosine_warmup_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from 1/warmup to 1, then cosine decay to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> tuple[dict[str, Any], dict[str, Tensor]]:
    np_state = np.random.get_state()
    json_part = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], np_state[2], np_state[3], np_state[4]],
    }
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    return json_part, tensors


def _set_rng_state(json_part: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    version, internal, gauss = json_part["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"cuda{i}"], i)


class Trainer:
    """Trains a :class:`StagedModel` with a multi-exit loss.

    Args:
        model: the model (built with :func:`adaptnn.create_model`, so checkpoints can rebuild it).
        train_set: training split (training transforms).
        config: optimisation settings.
        run_dir: where ``checkpoints/``, ``model.safetensors`` and ``metrics.jsonl`` go.
        val_set: optional held-out split, evaluated (per-exit accuracy) after every epoch for monitoring.
        loss_fn: ``(exit_logits, targets) -> loss``; default: joint loss with ``config.exit_weights``.
        meta: extra JSON stored in every checkpoint (e.g. the run's data config).
    """

    def __init__(
        self,
        model: StagedModel,
        train_set: Dataset,
        config: TrainConfig,
        run_dir: str | Path,
        *,
        val_set: Dataset | None = None,
        loss_fn: Callable[[list[Tensor], Tensor], Tensor] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        config.validate()
        if len(train_set) == 0:
            raise ConfigError("the training split is empty")
        self.model = model
        self.train_set = train_set
        self.val_set = val_set
        self.config = config
        self.run_dir = Path(run_dir)
        self.loss_fn = loss_fn or JointLoss(config.exit_weights, config.label_smoothing)
        self.meta = dict(meta or {})
        self.device = resolve_device(config.device)
        self.checkpoint_path = self.run_dir / "checkpoints" / "last.safetensors"
        self.metrics_path = self.run_dir / "metrics.jsonl"

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        groups = _param_groups(self.model, cfg.weight_decay)
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
        return torch.optim.AdamW(groups, lr=cfg.lr)

    def _loader(self, epoch: int) -> DataLoader:
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        return DataLoader(
            self.train_set,
            batch_size=self.config.batch_size,
            sampler=RandomSampler(self.train_set, generator=generator),
            num_workers=self.config.num_workers,
            drop_last=len(self.train_set) > self.config.batch_size,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def _save(self, optimizer: torch.optim.Optimizer, epoch: int, step: int) -> None:
        optim_tensors: dict[str, Tensor] = {}
        optim_json = pack_tensors(optimizer.state_dict(), "optim", optim_tensors)
        optim_tensors = {k.removeprefix("optim."): v for k, v in optim_tensors.items()}
        rng_json, rng_tensors = _rng_state()
        meta = dict(
            self.meta,
            model_spec=model_spec(self.model),
            train_config=asdict(self.config),
            epoch=epoch,
            step=step,
            optimizer=optim_json,
            rng=rng_json,
        )
        save_checkpoint(self.checkpoint_path, self.model, meta, extra={"optim": optim_tensors, "rng": rng_tensors})

    def _resume(self, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
        ckpt = load_checkpoint(self.checkpoint_path)
        saved_spec = ckpt.meta.get("model_spec")
        if saved_spec != model_spec(self.model):
            raise CheckpointError(
                f"{self.checkpoint_path} was saved for model {saved_spec}, but this run builds "
                f"{model_spec(self.model)}; use another run_dir or resume=False"
            )
        load_weights(self.model, ckpt.model_state, source=str(self.checkpoint_path))
        optim_tensors = {f"optim.{k}": v for k, v in ckpt.extra.get("optim", {}).items()}
        optimizer.load_state_dict(unpack_tensors(ckpt.meta["optimizer"], optim_tensors))
        _set_rng_state(ckpt.meta["rng"], ckpt.extra.get("rng", {}))
        log.info("resumed from %s after epoch %d", self.checkpoint_path, ckpt.meta["epoch"])
        return int(ckpt.meta["epoch"]) + 1, int(ckpt.meta["step"])

    @torch.no_grad()
    def evaluate_exits(self, dataset: Dataset) -> list[float]:
        """Accuracy of every exit on ``dataset`` (model switched to eval and back)."""
        was_training = self.model.training
        self.model.eval()
        correct: Tensor | None = None
        loader = DataLoader(dataset, batch_size=max(256, self.config.batch_size), shuffle=False)
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            hits = torch.stack([(lg.argmax(-1) == y).sum() for lg in self.model.forward_all(x)])
            correct = hits if correct is None else correct + hits
        self.model.train(was_training)
        assert correct is not None
        return (correct.double() / len(dataset)).tolist()

    def fit(self, *, resume: bool = True) -> list[dict[str, Any]]:
        """Train for ``config.epochs`` epochs (continuing from ``checkpoints/last`` when ``resume``).

        Returns:
            The per-epoch metrics of this call (also appended to ``metrics.jsonl``).
        """
        cfg = self.config
        seed_everything(cfg.seed)
        self.model.to(self.device)
        optimizer = self._optimizer()
        steps_per_epoch = len(self._loader(0))
        total_steps = cfg.epochs * steps_per_epoch
        warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
        start_epoch, step = 0, 0
        if resume and self.checkpoint_path.exists():
            start_epoch, step = self._resume(optimizer)
        elif self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh run starts a fresh log
        history: list[dict[str, Any]] = []
        if start_epoch >= cfg.epochs:
            log.info("checkpoint is already at epoch %d of %d; nothing to train", start_epoch, cfg.epochs)
        for epoch in range(start_epoch, cfg.epochs):
            self.model.train()
            started = time.perf_counter()
            loss_sum, seen = 0.0, 0
            bar = tqdm(
                self._loader(epoch),
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                disable=not cfg.progress or not sys.stderr.isatty(),  # logs get one INFO line per epoch instead
                leave=False,
            )
            for x, y in bar:
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                factor = cosine_warmup_factor(step, total_steps, warmup_steps, cfg.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * factor
                loss = self.loss_fn(self.model.forward_all(x), y)
                if not torch.isfinite(loss):
                    raise ConfigError(
                        f"the training loss became {loss.item()} at epoch {epoch + 1}, step {step}; "
                        "lower train.lr or check the inputs for NaN/inf"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                loss_sum += loss.item() * len(y)
                seen += len(y)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{cfg.lr * factor:.3g}")
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": loss_sum / max(seen, 1),
                "lr": cfg.lr * cosine_warmup_factor(step - 1, total_steps, warmup_steps, cfg.min_lr_ratio),
                "epoch_time_s": time.perf_counter() - started,
            }
            if self.val_set is not None and len(self.val_set) > 0:
                record["val_exit_accuracy"] = self.evaluate_exits(self.val_set)
            history.append(record)
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self._save(optimizer, epoch, step)
            summary = f"epoch {epoch + 1}/{cfg.epochs} loss {record['train_loss']:.4f}"
            if "val_exit_accuracy" in record:
                summary += " val acc per exit " + " ".join(f"{a:.3f}" for a in record["val_exit_accuracy"])
            log.info(summary)
        self.model.eval()
        return history
