"""Trainer for staged models: any exit strategy, SGD/AdamW, warm-up + cosine, atomic checkpoints, resume.

The Trainer owns one loop and stays the same for every strategy: the strategy is a callable
``(exit_logits, targets) -> loss`` with optional hooks (see :mod:`adaptnn.strategies`). After every epoch it
writes ``checkpoints/last.safetensors`` atomically (weights, optimizer state, the strategy's own state, RNG
states, epoch) and appends one line of metrics to ``metrics.jsonl``; ``fit(resume=True)`` continues from
that checkpoint and reaches the same weights as an uninterrupted run (the data order of epoch e is a
function of ``seed`` and ``e``).

Scaling up, all opt-in through :class:`TrainConfig`:

* **Data parallel** (``torchrun --nproc_per_node N ...``): detected from the ``WORLD_SIZE``/``RANK``
  environment; DDP with gloo on CPU and NCCL on GPU (one GPU per process, ``LOCAL_RANK``). ``batch_size``
  is the *global* batch of one optimizer step: every process draws the same permutation and takes its
  contiguous share of each global batch, so N processes see exactly the batches one process sees and
  reach the same weights (up to float summation order; batch-norm statistics are per process, as usual
  with DDP). Only rank 0 writes checkpoints, metrics and logs.
* **Gradient accumulation** (``grad_accum_steps``): each process's share is split into that many
  micro-batches; losses are scaled so the step equals one step on the whole global batch.
* ``precision="bf16"`` (autocast to bfloat16, meant for GPUs), ``channels_last``, ``compile``
  (``torch.compile`` of the training forward) and ``tensorboard`` (scalars next to ``metrics.jsonl``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from ..errors import CheckpointError, ConfigError
from ..io.checkpoint import load_checkpoint, load_weights, pack_tensors, save_checkpoint, unpack_tensors
from ..models import model_spec
from ..runtime.staged import StagedModel
from ..strategies import StepContext, Strategy, available, get

__all__ = [
    "TrainConfig",
    "Trainer",
    "build_strategy",
    "resolve_device",
    "seed_everything",
    "cosine_warmup_factor",
    "micro_batch_indices",
]

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
        exit_weights: ``"uniform"``, ``"linear"`` or a list: per-exit loss weights of the strategy (when it
            takes weights and ``strategy_options`` does not set them).
        label_smoothing: cross-entropy label smoothing (same rule).
        seed: seeds weights' init order, data order and augmentation.
        num_workers: DataLoader worker processes.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda[:i]"``.
        progress: show a progress bar.
        strategy: training strategy name (``adaptnn.strategies.available()``).
        strategy_options: keyword options of the strategy, e.g. ``{r: 0.5}`` for ``boost``.
        grad_accum_steps: micro-batches per optimizer step (per process); ``batch_size`` stays the global batch.
        precision: ``"fp32"`` or ``"bf16"`` (autocast to bfloat16; for GPUs, slow on CPUs).
        channels_last: convert the model and 4-D inputs to channels-last memory format.
        compile: ``torch.compile`` the training forward pass.
        distributed: ``"auto"`` (DDP when launched by torchrun with more than one process) or ``"off"``.
        tensorboard: also write TensorBoard scalars to ``run_dir/tensorboard`` (needs the tensorboard package).
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
    strategy: str = "joint"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    grad_accum_steps: int = 1
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    distributed: str = "auto"
    tensorboard: bool = False

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
        if self.strategy not in available():
            raise ConfigError(f"train.strategy must be one of {available()}, got {self.strategy!r}")
        if not isinstance(self.strategy_options, dict):
            raise ConfigError(f"train.strategy_options must be a mapping, got {type(self.strategy_options).__name__}")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"train.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.distributed not in ("auto", "off"):
            raise ConfigError(f"train.distributed must be 'auto' or 'off', got {self.distributed!r}")


def build_strategy(config: TrainConfig) -> Strategy:
    """The strategy ``config.strategy`` with ``config.strategy_options``.

    ``exit_weights`` and ``label_smoothing`` of the config fill the strategy's ``weights`` and
    ``label_smoothing`` options when it takes them and the options do not set them.
    """
    options = dict(config.strategy_options)
    probe = get(config.strategy, **options)
    accepted = inspect.signature(type(probe)).parameters
    if "weights" in accepted and "weights" not in options:
        options["weights"] = config.exit_weights
    if "label_smoothing" in accepted and "label_smoothing" not in options:
        options["label_smoothing"] = config.label_smoothing
    return get(config.strategy, **options)


class _CallableStrategy(Strategy):
    """Adapts a plain ``(exit_logits, targets) -> loss`` callable to the :class:`Strategy` hooks."""

    name = "custom"

    def __init__(self, fn: Callable[[list[Tensor], Tensor], Tensor]) -> None:
        self.fn = fn

    def __call__(self, exit_logits: list[Tensor], targets: Tensor) -> Tensor:
        return self.fn(exit_logits, targets)


class _TrainForward(nn.Module):
    """The training forward pass as a module (what DDP and ``torch.compile`` wrap)."""

    def __init__(self, model: StagedModel, strategy: Strategy) -> None:
        super().__init__()
        self.model = model
        self.strategy = strategy

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.strategy.forward(self.model, x)


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


class _MicroBatchSampler(Sampler[list[int]]):
    def __init__(self, batches: list[list[list[int]]]) -> None:
        self.flat = [mb for batch in batches for mb in batch]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.flat)

    def __len__(self) -> int:
        return len(self.flat)


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
    """Trains a :class:`StagedModel` with a multi-exit strategy.

    Args:
        model: the model (built with :func:`adaptnn.create_model`, so checkpoints can rebuild it).
        train_set: training split (training transforms).
        config: optimisation settings.
        run_dir: where ``checkpoints/``, ``model.safetensors`` and ``metrics.jsonl`` go.
        val_set: optional held-out split, evaluated (per-exit accuracy of the strategy's predictions) after
            every epoch for monitoring.
        loss_fn: a :class:`~adaptnn.strategies.Strategy` or a plain ``(exit_logits, targets) -> loss``
            callable; default: :func:`build_strategy` of ``config``.
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
        loss_fn: Strategy | Callable[[list[Tensor], Tensor], Tensor] | None = None,
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
        if loss_fn is None:
            self.strategy = build_strategy(config)
        elif isinstance(loss_fn, Strategy):
            self.strategy = loss_fn
        else:
            self.strategy = _CallableStrategy(loss_fn)
        self.loss_fn = self.strategy
        self.meta = dict(meta or {})
        self.world_size = int(os.environ.get("WORLD_SIZE", "1")) if config.distributed == "auto" else 1
        self.rank = int(os.environ.get("RANK", "0")) if self.world_size > 1 else 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0")) if self.world_size > 1 else 0
        self.device = resolve_device(config.device)
        if self.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", self.local_rank)
        if config.batch_size < self.world_size * config.grad_accum_steps:
            raise ConfigError(
                f"train.batch_size={config.batch_size} is the global batch; it must be >= processes x "
                f"grad_accum_steps = {self.world_size} x {config.grad_accum_steps}"
            )
        self.checkpoint_path = self.run_dir / "checkpoints" / "last.safetensors"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._owns_process_group = False

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints, metrics and logs (rank 0)."""
        return self.rank == 0

    # ---- set-up -----------------------------------------------------------------------------------
    def _init_distributed(self) -> None:
        if self.world_size <= 1 or dist.is_initialized():
            return
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self._owns_process_group = True
        log.info("DDP: rank %d of %d on %s", self.rank, self.world_size, self.device)

    def _barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        groups = _param_groups(self.model, cfg.weight_decay)
        if not any(g["params"] for g in groups):
            raise ConfigError("the model has no trainable parameters")
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
        return torch.optim.AdamW(groups, lr=cfg.lr)

    def _drop_last(self) -> bool:
        return len(self.train_set) > self.config.batch_size

    def _batches(self, epoch: int) -> list[list[list[int]]]:
        return micro_batch_indices(
            len(self.train_set),
            self.config.batch_size,
            seed=self.config.seed,
            epoch=epoch,
            world_size=self.world_size,
            rank=self.rank,
            accum_steps=self.config.grad_accum_steps,
            drop_last=self._drop_last(),
        )

    def _loader(self, batches: list[list[list[int]]]) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_sampler=_MicroBatchSampler(batches),
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _input(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    # ---- checkpoints ------------------------------------------------------------------------------
    def _save(self, optimizer: torch.optim.Optimizer, epoch: int, step: int) -> None:
        optim_tensors: dict[str, Tensor] = {}
        optim_json = pack_tensors(optimizer.state_dict(), "optim", optim_tensors)
        optim_tensors = {k.removeprefix("optim."): v for k, v in optim_tensors.items()}
        strategy_tensors: dict[str, Tensor] = {}
        strategy_json = pack_tensors(self.strategy.state_dict(), "strategy", strategy_tensors)
        strategy_tensors = {k.removeprefix("strategy."): v for k, v in strategy_tensors.items()}
        rng_json, rng_tensors = _rng_state()
        meta = dict(
            self.meta,
            model_spec=model_spec(self.model),
            train_config=asdict(self.config),
            epoch=epoch,
            step=step,
            optimizer=optim_json,
            strategy_state=strategy_json,
            rng=rng_json,
        )
        extra = {"optim": optim_tensors, "rng": rng_tensors}
        if strategy_tensors:
            extra["strategy"] = strategy_tensors
        save_checkpoint(self.checkpoint_path, self.model, meta, extra=extra)

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
        if ckpt.meta.get("strategy_state"):
            strategy_tensors = {f"strategy.{k}": v for k, v in ckpt.extra.get("strategy", {}).items()}
            self.strategy.load_state_dict(unpack_tensors(ckpt.meta["strategy_state"], strategy_tensors))
            self.strategy.to(self.device)
        _set_rng_state(ckpt.meta["rng"], ckpt.extra.get("rng", {}))
        log.info("resumed from %s after epoch %d", self.checkpoint_path, ckpt.meta["epoch"])
        return int(ckpt.meta["epoch"]) + 1, int(ckpt.meta["step"])

    # ---- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_exits(self, dataset: Dataset) -> list[float]:
        """Accuracy of every exit's prediction (``strategy.predictions``) on ``dataset`` (eval mode, then back)."""
        was_training = self.model.training
        self.model.eval()
        correct: Tensor | None = None
        loader = DataLoader(dataset, batch_size=max(256, self.config.batch_size), shuffle=False)
        for x, y in loader:
            x, y = self._input(x), y.to(self.device)
            with self._autocast():
                preds = self.strategy.predictions(self.model.forward_all(x))
            hits = torch.stack([(p.argmax(-1) == y).sum() for p in preds])
            correct = hits if correct is None else correct + hits
        self.model.train(was_training)
        if was_training:
            self.strategy.train_mode(self.model)
        assert correct is not None
        return (correct.double() / len(dataset)).tolist()

    def _log_record(self, record: dict[str, Any], writer: Any) -> None:
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch",):
                    writer.add_scalar(key, value, record["epoch"])
                elif isinstance(value, list):
                    for k, v in enumerate(value):
                        writer.add_scalar(f"{key}/exit{k}", v, record["epoch"])
            writer.flush()

    def _tensorboard(self) -> Any:
        if not (self.config.tensorboard and self.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError(
                f"train.tensorboard=true needs the tensorboard package ({err}); pip install tensorboard"
            ) from None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    # ---- training ---------------------------------------------------------------------------------
    def fit(self, *, resume: bool = True) -> list[dict[str, Any]]:
        """Train for ``config.epochs`` epochs (continuing from ``checkpoints/last`` when ``resume``).

        Returns:
            The per-epoch metrics of this call (also appended to ``metrics.jsonl`` by rank 0).
        """
        self._init_distributed()
        try:
            return self._fit(resume)
        finally:
            if self._owns_process_group and dist.is_initialized():
                dist.destroy_process_group()
                self._owns_process_group = False

    def _fit(self, resume: bool) -> list[dict[str, Any]]:
        cfg = self.config
        seed_everything(cfg.seed)
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        strategy = self.strategy
        strategy.setup(self.model)
        strategy.to(self.device)
        if self.rank > 0:  # same initial weights everywhere, independent augmentation streams
            seed_everything(cfg.seed + 7919 * self.rank)
        optimizer = self._optimizer()
        train_module: nn.Module = _TrainForward(self.model, strategy)
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            train_module = nn.parallel.DistributedDataParallel(train_module, device_ids=device_ids)
        forward: Callable[[Tensor], list[Tensor]] = torch.compile(train_module) if cfg.compile else train_module
        steps_per_epoch = len(self._batches(0))
        if steps_per_epoch == 0:
            raise ConfigError(f"the training split ({len(self.train_set)} samples) gives no batch of {cfg.batch_size}")
        total_steps = cfg.epochs * steps_per_epoch
        warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
        start_epoch, step = 0, 0
        if resume and self.checkpoint_path.exists():
            start_epoch, step = self._resume(optimizer)
        elif self.metrics_path.exists() and self.is_main:
            self.metrics_path.unlink()  # a fresh run starts a fresh log
        self._barrier()
        writer = self._tensorboard()
        history: list[dict[str, Any]] = []
        if start_epoch >= cfg.epochs:
            log.info("checkpoint is already at epoch %d of %d; nothing to train", start_epoch, cfg.epochs)
        for epoch in range(start_epoch, cfg.epochs):
            self.model.train()
            strategy.train_mode(self.model)
            started = time.perf_counter()
            batches = self._batches(epoch)
            n_train = len(self.train_set)
            full = micro_batch_indices(n_train, cfg.batch_size, seed=cfg.seed, epoch=epoch, drop_last=self._drop_last())
            global_sizes = [len(batch[0]) for batch in full]  # samples in each global batch, all processes
            micro_iter = iter(self._loader(batches))
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            seen = 0
            bar = tqdm(
                range(len(batches)),
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                disable=not cfg.progress or not sys.stderr.isatty() or not self.is_main,
                leave=False,
            )
            for b in bar:
                factor = cosine_warmup_factor(step, total_steps, warmup_steps, cfg.min_lr_ratio)
                lr = cfg.lr * factor
                for group in optimizer.param_groups:
                    group["lr"] = lr
                ctx = StepContext(self.model, forward, lr, step, epoch, self.world_size)
                optimizer.zero_grad(set_to_none=True)
                n_micro = len(batches[b])
                for m in range(n_micro):
                    x, y = next(micro_iter)
                    x, y = self._input(x), y.to(self.device, non_blocking=True)
                    sync = (
                        train_module.no_sync() if self.world_size > 1 and m < n_micro - 1 else contextlib.nullcontext()
                    )
                    with sync:
                        with self._autocast():
                            loss = strategy.training_loss(ctx, x, y)
                        if not torch.isfinite(loss):
                            raise ConfigError(
                                f"the training loss became {loss.item()} at epoch {epoch + 1}, step {step}; "
                                "lower train.lr or check the inputs for NaN/inf"
                            )
                        # mean-reduced micro losses -> the global batch's mean (DDP averages over processes)
                        scale = len(y) * self.world_size / global_sizes[b]
                        (loss * scale).backward()
                    loss_sum += loss.detach().double() * len(y)
                    seen += len(y)
                optimizer.step()
                step += 1
                if bar.disable is False:
                    bar.set_postfix(loss=f"{float(loss_sum) / max(seen, 1):.4f}", lr=f"{lr:.3g}")
            totals = torch.stack([loss_sum, loss_sum.new_tensor(float(seen))])
            if self.world_size > 1:
                dist.all_reduce(totals)
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": float(totals[0] / totals[1].clamp_min(1)),
                "lr": cfg.lr * cosine_warmup_factor(step - 1, total_steps, warmup_steps, cfg.min_lr_ratio),
                "epoch_time_s": time.perf_counter() - started,
            }
            record.update(strategy.epoch_metrics())
            if self.is_main:
                if self.val_set is not None and len(self.val_set) > 0:
                    record["val_exit_accuracy"] = self.evaluate_exits(self.val_set)
                history.append(record)
                self._log_record(record, writer)
                self._save(optimizer, epoch, step)
                summary = f"epoch {epoch + 1}/{cfg.epochs} loss {record['train_loss']:.4f}"
                if "val_exit_accuracy" in record:
                    summary += " val acc per exit " + " ".join(f"{a:.3f}" for a in record["val_exit_accuracy"])
                log.info(summary)
            else:
                history.append(record)
            self._barrier()
        if writer is not None:
            writer.close()
        self.model.eval()
        return history
