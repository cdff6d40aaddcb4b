"""Trainer for staged models: any exit strategy, SGD/AdamW, warm-up + cosine or multistep, atomic checkpoints, resume.

The Trainer owns one loop and stays the same for every strategy: the strategy is a callable
``(exit_logits, targets) -> loss`` with optional hooks (see :mod:`adaptnn.strategies`); its
:meth:`~adaptnn.strategies.Strategy.training_step` returns each micro-batch's loss and metrics, which the
Trainer averages over the epoch. After every epoch it commits ``checkpoints/last.safetensors`` atomically
(weights, optimizer state, the strategy's own state, RNG states, epoch, the epoch's metrics) and *then* appends
the epoch's line to ``metrics.jsonl``, so the log never claims an epoch whose checkpoint was not committed.
``fit(resume=True)`` continues from that checkpoint and reaches the same weights as an uninterrupted run (the
data order of epoch e is a function of ``seed`` and ``e``). Resuming first checks that the checkpoint was
written for the same model, training config (``epochs`` may grow) and caller metadata (e.g. the run's data
config), then brings ``metrics.jsonl`` back to exactly one line per committed epoch (a crash between the
commit and the line, a torn last line, or the extra lines older adaptnn logged before its commit are repaired).

Scaling up, all opt-in through :class:`~adaptnn.training.TrainConfig`:

* **Data parallel** (``torchrun --nproc_per_node N ...``): detected from the ``WORLD_SIZE``/``RANK``
  environment; DDP with gloo on CPU and NCCL on GPU (one GPU per process, ``LOCAL_RANK``). ``batch_size``
  is the *global* batch of one optimizer step: every process draws the same permutation and takes its
  contiguous share of each global batch (:mod:`adaptnn.training.distributed`), so N processes see exactly
  the batches one process sees and reach the same weights (up to float summation order; batch-norm
  statistics are per process, as usual with DDP). Only rank 0 writes checkpoints, metrics and logs.
* **Gradient accumulation** (``grad_accum_steps``): each process's share is split into that many
  micro-batches; losses are scaled so the step equals one step on the whole global batch.
* ``precision="bf16"`` (autocast to bfloat16, meant for GPUs), ``channels_last``, ``compile``
  (``torch.compile`` of the training forward) and ``tensorboard`` (scalars next to ``metrics.jsonl``).

Training cheaper (:mod:`adaptnn.training.curriculum`): ``curriculum`` shows every micro-batch at the input size
and augmentation of the current step's stage (planned once from measured step times, stored in every checkpoint);
``teacher`` keeps an EMA of the weights, snapshots or earlier checkpoints as the ``distill`` strategy's teacher
(:mod:`adaptnn.training.teachers`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..errors import CheckpointError, ConfigError, DivergedLossError
from ..io.atomic import atomic_write_text
from ..io.checkpoint import load_checkpoint, load_weights, pack_tensors, save_checkpoint, unpack_tensors
from ..measure.timing import Timer
from ..models import model_spec
from ..runtime.staged import StagedModel
from ..strategies import StepContext, Strategy, as_strategy
from .config import TrainConfig, build_strategy
from .curriculum import (
    CurriculumPlan,
    apply_stage,
    broadcast_step_ms,
    measure_step_ms,
    resume_plan,
    spatially_relaxed,
    stages_of,
)
from .device import keep_freed_memory, resolve_device, seed_everything
from .distributed import MicroBatchSampler, barrier, micro_batch_indices, process_group, process_layout
from .metrics import EpochMeter
from .rng import capture_rng_state, preserved_rng, restore_rng_state
from .schedule import build_optimizer, lr_factor
from .teachers import ModelTeacher

__all__ = ["Trainer", "commit_checkpoint"]

log = logging.getLogger(__name__)

#: train settings a resume may change: cosmetic ones, and ``epochs`` (training a checkpoint for longer); a run
#: directory's config.yaml check still refuses any change
RESUME_IGNORED = frozenset({"epochs", "progress", "num_workers", "tensorboard"})


def _readable_copy(meta: dict[str, Any]) -> str:
    return json.dumps(meta, indent=2, sort_keys=True) + "\n"


def commit_checkpoint(
    path: str | Path,
    model: nn.Module | dict[str, Tensor],
    meta: dict[str, Any],
    extra: dict[str, dict[str, Tensor]] | None = None,
) -> Path:
    """:func:`~adaptnn.io.save_checkpoint`, with the readable ``.json`` copy written *before* the weights too.

    The ``.safetensors`` rename is the commit; the copy is written first so it never describes an older
    checkpoint than the one on disk (killed between the two, it is one commit ahead until the next one).
    """
    path = Path(path)
    atomic_write_text(path.with_suffix(".json"), _readable_copy(meta))
    return save_checkpoint(path, model, meta, extra=extra)


def _differences(old: Any, new: Any, prefix: str) -> list[str]:
    """``"key: old -> new"`` for every differing leaf of two JSON values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}.{key}")
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


class _TrainForward(nn.Module):
    """The training forward pass as a module (what DDP and ``torch.compile`` wrap)."""

    def __init__(self, model: StagedModel, strategy: Strategy) -> None:
        super().__init__()
        self.model = model
        self.strategy = strategy

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.strategy.forward(self.model, x)


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
            callable (kept as :attr:`strategy`); default: :func:`~adaptnn.training.build_strategy` of ``config``.
        meta: extra JSON stored in every checkpoint (e.g. the run's data config); resuming requires the
            checkpoint's values of these keys to be the same (``adaptnn_version`` excepted).
        after_epoch: called by rank 0 with the trainer after each epoch is committed (checkpoint, then
            metrics line); it may move the run (set :attr:`run_dir`), e.g. to swap a staged run into place.
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
        after_epoch: Callable[[Trainer], None] | None = None,
    ) -> None:
        config.validate()
        if len(train_set) == 0:
            raise ConfigError("the training split is empty")
        self.model = model
        self.train_set = train_set
        self.val_set = val_set
        self.config = config
        self.run_dir = Path(run_dir)
        self.strategy = build_strategy(config) if loss_fn is None else as_strategy(loss_fn)
        self.meta = dict(meta or {})
        self.after_epoch = after_epoch
        self.world_size, self.rank, self.local_rank = process_layout(config.distributed)
        self.device = resolve_device(config.device)
        if self.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", self.local_rank)
        if config.batch_size < self.world_size * config.grad_accum_steps:
            raise ConfigError(
                f"train.batch_size={config.batch_size} is the global batch; it must be >= processes x "
                f"grad_accum_steps = {self.world_size} x {config.grad_accum_steps}"
            )
        #: the curriculum this run follows (set by :meth:`fit`; ``None`` without one)
        self.curriculum: CurriculumPlan | None = None
        #: the model's own past as teacher (set by :meth:`fit` when ``config.teacher`` is on)
        self.teacher: ModelTeacher | None = None
        self._resumed_meta: dict[str, Any] = {}

    @property
    def checkpoint_path(self) -> Path:
        """``run_dir/checkpoints/last.safetensors``."""
        return self.run_dir / "checkpoints" / "last.safetensors"

    @property
    def metrics_path(self) -> Path:
        """``run_dir/metrics.jsonl``."""
        return self.run_dir / "metrics.jsonl"

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints, metrics and logs (rank 0)."""
        return self.rank == 0

    # ---- set-up -----------------------------------------------------------------------------------
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
            batch_sampler=MicroBatchSampler(batches),
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
    def _save(
        self, optimizer: torch.optim.Optimizer, epoch: int, step: int, record: dict[str, Any] | None = None
    ) -> None:
        """Commit ``checkpoints/last`` after ``epoch`` (0-based), with the epoch's metrics ``record``."""
        optim_tensors: dict[str, Tensor] = {}
        optim_json = pack_tensors(optimizer.state_dict(), "optim", optim_tensors)
        optim_tensors = {k.removeprefix("optim."): v for k, v in optim_tensors.items()}
        strategy_tensors: dict[str, Tensor] = {}
        strategy_json = pack_tensors(self.strategy.state_dict(), "strategy", strategy_tensors)
        strategy_tensors = {k.removeprefix("strategy."): v for k, v in strategy_tensors.items()}
        rng_json, rng_tensors = capture_rng_state()
        extra = {"optim": optim_tensors, "rng": rng_tensors}
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
        if record is not None:
            meta["metrics"] = record
        if self.curriculum is not None:
            meta["curriculum"] = self.curriculum.to_json()
        if self.teacher is not None:
            meta["teacher_state"], teacher_tensors = self.teacher.state()
            if teacher_tensors:
                extra["teacher"] = teacher_tensors
        if strategy_tensors:
            extra["strategy"] = strategy_tensors
        commit_checkpoint(self.checkpoint_path, self.model, meta, extra=extra)

    def _check_resumable(self, meta: dict[str, Any]) -> None:
        """Refuse a checkpoint written for another model, training config or caller metadata."""
        saved_spec = meta.get("model_spec")
        if saved_spec != model_spec(self.model):
            raise CheckpointError(
                f"{self.checkpoint_path} was saved for model {saved_spec}, but this run builds "
                f"{model_spec(self.model)}; use another run_dir or resume=False"
            )
        diffs: list[str] = []
        stored = meta.get("train_config")
        if isinstance(stored, dict):
            current = _as_json(asdict(self.config))
            for key in sorted(set(stored) & set(current)):  # a key older checkpoints lack is no difference
                if key not in RESUME_IGNORED:
                    diffs += _differences(stored.get(key), current.get(key), f"train.{key}")
        for key, value in self.meta.items():
            if key != "adaptnn_version" and key in meta:
                diffs += _differences(meta[key], _as_json(value), key)
        if diffs:
            raise ConfigError(
                f"{self.checkpoint_path} was written by a run with another config ({'; '.join(diffs[:5])}"
                + (f"; {len(diffs) - 5} more" if len(diffs) > 5 else "")
                + "); resume with the checkpoint's config, or start over (--overwrite / resume=False) or use "
                "another run_dir"
            )

    def _repair_metrics(self, epochs_done: int, record: dict[str, Any] | None) -> None:
        """Make ``metrics.jsonl`` one line per committed epoch ``1..epochs_done`` (rank 0, on resume).

        Drops torn lines and lines of epochs the checkpoint does not hold, keeps the last line of a repeated
        epoch, and restores the newest epoch's line from the checkpoint when the crash came before it.
        """
        text = self.metrics_path.read_text(errors="replace") if self.metrics_path.exists() else ""
        lines: dict[int, str] = {}
        for raw in text.splitlines():
            try:
                epoch = int(json.loads(raw)["epoch"])
            except (ValueError, KeyError, TypeError):
                continue
            if 1 <= epoch <= epochs_done:
                lines[epoch] = raw
        if record is not None and epochs_done not in lines:
            lines[epochs_done] = json.dumps(record)
        repaired = "".join(lines[e] + "\n" for e in sorted(lines))
        if repaired != text:
            log.warning("%s: repaired to one line per committed epoch (1..%d)", self.metrics_path, epochs_done)
            atomic_write_text(self.metrics_path, repaired)

    def _resume(self, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
        ckpt = load_checkpoint(self.checkpoint_path)
        self._check_resumable(ckpt.meta)
        load_weights(self.model, ckpt.model_state, source=str(self.checkpoint_path))
        optim_tensors = {f"optim.{k}": v for k, v in ckpt.extra.get("optim", {}).items()}
        optimizer.load_state_dict(unpack_tensors(ckpt.meta["optimizer"], optim_tensors))
        if ckpt.meta.get("strategy_state"):
            strategy_tensors = {f"strategy.{k}": v for k, v in ckpt.extra.get("strategy", {}).items()}
            self.strategy.load_state_dict(unpack_tensors(ckpt.meta["strategy_state"], strategy_tensors))
            self.strategy.to(self.device)
        restore_rng_state(ckpt.meta["rng"], ckpt.extra.get("rng", {}))
        if self.teacher is not None:
            state = ckpt.meta.get("teacher_state") or {}
            self.teacher.restore(self.model, state, ckpt.extra.get("teacher", {}), str(self.checkpoint_path))
        self._resumed_meta = ckpt.meta
        if self.is_main:
            self._repair_metrics(int(ckpt.meta["epoch"]) + 1, ckpt.meta.get("metrics"))
            readable = self.checkpoint_path.with_suffix(".json")
            copy = _readable_copy(ckpt.meta)
            if not readable.exists() or readable.read_text(errors="replace") != copy:
                atomic_write_text(readable, copy)  # killed between the two writes of a commit: one ahead
        log.info("resumed from %s after epoch %d", self.checkpoint_path, int(ckpt.meta["epoch"]) + 1)
        return int(ckpt.meta["epoch"]) + 1, int(ckpt.meta["step"])

    # ---- curriculum -------------------------------------------------------------------------------
    def _plan_curriculum(self, total_steps: int) -> CurriculumPlan | None:
        """The run's curriculum: the resumed checkpoint's plan, else planned from step times (rank 0 measures)."""
        config = self.config.curriculum
        if not config.enabled:
            return None
        plan = resume_plan(config, total_steps, self._resumed_meta.get("curriculum"))
        if plan is not None:
            return plan
        step_ms = config.step_ms
        if step_ms is None and config.balance == "time":
            step_ms = self._measure_curriculum() if self.is_main else None
            step_ms = broadcast_step_ms(step_ms, self.world_size)
        return CurriculumPlan.build(config, total_steps, step_ms)

    def _measure_curriculum(self) -> list[float]:
        """Milliseconds per training step at every curriculum stage, on epoch 0's first micro-batch (no side effect)."""
        from torch.utils.data import default_collate

        with preserved_rng():  # the dataset's transforms draw random numbers
            x, y = default_collate([self.train_set[i] for i in self._batches(0)[0][0]])
        x, y = self._input(x), y.to(self.device)
        with self._autocast():
            return measure_step_ms(
                self.model, self.strategy, (x, y), stages_of(self.config.curriculum), self.config.curriculum.mode,
                timer=Timer(self.device),
            )  # fmt: skip

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
            f.flush()
            os.fsync(f.fileno())
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

        Raises:
            DivergedLossError: the training loss became NaN or infinite.
        """
        with process_group(self.world_size, self.rank, self.device):
            return self._fit(resume)

    def _fit(self, resume: bool) -> list[dict[str, Any]]:
        cfg = self.config
        seed_everything(cfg.seed)
        if self.device.type == "cpu" and keep_freed_memory():  # no page faults re-fetching each step's activations
            log.debug("glibc malloc keeps freed memory for reuse (set MALLOC_TRIM_THRESHOLD_ to keep its defaults)")
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        strategy = self.strategy
        strategy.setup(self.model)
        strategy.to(self.device)
        self.teacher = None
        if cfg.teacher.enabled:
            if not hasattr(strategy, "attach_teacher"):
                raise ConfigError(f"train.teacher needs a strategy that takes a teacher (distill), got {strategy!r}")
            self.teacher = ModelTeacher(self.model, cfg.teacher, self.checkpoint_path.parent)
            strategy.attach_teacher(self.teacher)
        if self.rank > 0:  # same initial weights everywhere, independent augmentation streams
            seed_everything(cfg.seed + 7919 * self.rank)
        optimizer = build_optimizer(self.model, cfg)
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
        self._resumed_meta = {}
        if resume and self.checkpoint_path.exists():
            start_epoch, step = self._resume(optimizer)
        elif self.is_main:  # a fresh start: no older checkpoint or log may stay beside the new run's
            self.checkpoint_path.unlink(missing_ok=True)
            self.checkpoint_path.with_suffix(".json").unlink(missing_ok=True)
            self.metrics_path.unlink(missing_ok=True)
        barrier(self.world_size)
        self.curriculum = plan = self._plan_curriculum(total_steps)
        if plan is not None and self.is_main:
            log.info("curriculum (%s): %s", cfg.curriculum.mode, plan.describe(steps_per_epoch))
        with spatially_relaxed(self.model) if plan is not None else contextlib.nullcontext():
            history = self._epochs(start_epoch, step, optimizer, train_module, forward, total_steps, warmup_steps, plan)
        self.model.eval()
        return history

    def _epochs(
        self,
        start_epoch: int,
        step: int,
        optimizer: torch.optim.Optimizer,
        train_module: nn.Module,
        forward: Callable[[Tensor], list[Tensor]],
        total_steps: int,
        warmup_steps: int,
        plan: CurriculumPlan | None,
    ) -> list[dict[str, Any]]:
        """The epoch loop from ``start_epoch`` (``step`` optimizer steps done); returns this call's epoch records."""
        cfg, strategy = self.config, self.strategy
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
            meter = EpochMeter(self.device)
            bar = tqdm(
                range(len(batches)),
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                disable=not cfg.progress or not sys.stderr.isatty() or not self.is_main,
                leave=False,
            )
            for b in bar:
                factor = lr_factor(cfg, step, total_steps, warmup_steps)
                lr = cfg.lr * factor
                for group in optimizer.param_groups:
                    group["lr"] = lr
                ctx = StepContext(self.model, forward, lr, step, epoch, self.world_size, lr_factor=factor)
                stage = plan.stage_at(step) if plan is not None else None
                optimizer.zero_grad(set_to_none=True)
                n_micro = len(batches[b])
                for m in range(n_micro):
                    x, y = next(micro_iter)
                    x, y = self._input(x), y.to(self.device, non_blocking=True)
                    if stage is not None:
                        x = self._input(apply_stage(x, stage, cfg.curriculum.mode))  # channels_last again
                    sync = (
                        train_module.no_sync() if self.world_size > 1 and m < n_micro - 1 else contextlib.nullcontext()
                    )
                    # mean-reduced micro losses -> the global batch's mean (DDP averages over processes)
                    scale = len(y) * self.world_size / global_sizes[b]
                    # strategies may back-propagate their loss in parts (StepContext.backward), else the Trainer does
                    ctx.backward = lambda loss, scale=scale: (loss * scale).backward()
                    with sync:
                        with self._autocast():
                            out = strategy.training_step(ctx, x, y)
                        if not torch.isfinite(out.loss):
                            raise DivergedLossError(
                                f"the training loss became {out.loss.item()} at epoch {epoch + 1}, step {step}; "
                                "lower train.lr or check the inputs for NaN/inf"
                            )
                        if not out.backward_done:
                            ctx.backward(out.loss)
                    meter.add(out, len(y))
                optimizer.step()
                step += 1
                if self.teacher is not None:
                    self.teacher.after_step(self.model)
                if bar.disable is False:
                    bar.set_postfix(loss=f"{meter.running_loss():.4f}", lr=f"{lr:.3g}")
            train_loss, step_metrics = meter.summary(self.world_size)
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": train_loss,
                "lr": cfg.lr * lr_factor(cfg, step - 1, total_steps, warmup_steps),
                "epoch_time_s": time.perf_counter() - started,
            }
            record.update(step_metrics)
            if plan is not None:
                record["curriculum_stage"] = plan.stage_index(step - 1)
                record["input_size"] = list(x.shape[-2:])
            if self.teacher is not None:  # before the commit that lists it
                spec = {"model_spec": model_spec(self.model), **self.meta}
                self.teacher.after_epoch(self.model, epoch + 1, spec, write=self.is_main)
            if self.is_main:
                if self.val_set is not None and len(self.val_set) > 0:
                    record["val_exit_accuracy"] = self.evaluate_exits(self.val_set)
                history.append(record)
                self._save(optimizer, epoch, step, record)  # the commit
                self._log_record(record, writer)  # after it: the log never runs ahead of the checkpoint
                if self.after_epoch is not None:
                    self.after_epoch(self)
                summary = f"epoch {epoch + 1}/{cfg.epochs} loss {record['train_loss']:.4f}"
                if "val_exit_accuracy" in record:
                    summary += " val acc per exit " + " ".join(f"{a:.3f}" for a in record["val_exit_accuracy"])
                log.info(summary)
            else:
                history.append(record)
            barrier(self.world_size)
        if writer is not None:
            writer.close()
        return history
