"""DynamicViT as a training strategy: learned token dropping, trained with ratio and distillation losses.

DynamicViT (Rao et al., "DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification", NeurIPS
2021) puts a small keep-score predictor (:class:`~adaptnn.layers.tokens.KeepPredictor`) before chosen blocks of a
token ViT. In training every predictor draws a hard keep mask per token with the straight-through Gumbel-softmax,
multiplied by the previous stage's (a dropped token stays dropped); dropped tokens are carried but hidden from
attention by an additive mask (:func:`~adaptnn.layers.tokens.keep_mask_bias`), so the batch stays dense, the
fused attention kernel is kept and the predictors get gradients. The loss is

    sum_k w_k CE(exit_k, y)                                   (every exit, weights as the joint strategy)
    + ratio_weight * mean_s (target_s - kept fraction_s)^2    (per sample; target_s = keep_rate ** (s + 1))
    + distill_weight * masked MSE(final tokens, teacher's)    (kept patch tokens only)
    + kl_weight * sum_k w_k KL(teacher exit_k || exit_k)      (logit distillation)

the teacher being a frozen copy of the model taken at :meth:`DynamicViT.setup` (the unreduced, usually
pretrained, model). At inference each predictor keeps the top ``ceil(keep_rate * n)`` patch tokens by keep score
(class/distillation/register tokens always kept) through the ordinary token state, so ``run_dynamic`` with exits
decides exactly what ``forward_all``'s logits replay. ``warmup_steps`` lowers the ratio targets from 1 to their
final values with :func:`~adaptnn.layers.tokens.keep_rate_warmup`, as EViT fine-tunes its keep rate.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import CheckpointError, ConfigError
from ..layers.tokens import (
    TokenBlock,
    TokenState,
    TokenStateHead,
    attach_keep_predictors,
    keep_rate_warmup,
    token_blocks,
)
from ..models import checkpoint_args
from .base import StepContext, StepOutput, Strategy
from .joint import exit_weights

if TYPE_CHECKING:
    from ..runtime.staged import StagedModel

__all__ = ["DynamicViT", "ratio_loss", "staged_forward"]


def staged_forward(model: StagedModel, x: Tensor, check: bool = True) -> tuple[list[Tensor], object]:
    """Every exit's logits and the state after the last segment (the final tokens), in one pass."""
    if check:
        model.check_input(x, check_finite=False)
    state: object = x
    logits = []
    for k, stage in enumerate(model.stages):
        for j in stage:
            state = model.segments[j](state)
        logits.append(model.heads[k](state))
    return logits, state


def ratio_loss(keep_masks: Sequence[Tensor], targets: Sequence[float]) -> Tensor:
    """``mean over samples and stages of (target_s - kept fraction_s)^2``; ``keep_masks[s]`` is ``[B, n]``."""
    if len(keep_masks) != len(targets):
        raise ConfigError(f"{len(keep_masks)} keep masks for {len(targets)} ratio targets")
    terms = [(m.float().mean(dim=1) - float(t)).pow(2).mean() for m, t in zip(keep_masks, targets, strict=True)]
    return torch.stack(terms).mean()


class DynamicViT(Strategy):
    """Train a token ViT's keep-score predictors (and the ViT) so it drops tokens; fixed keep counts at inference.

    Args:
        keep_rate: fraction of the incoming patch tokens each predictor keeps (the paper's rho: 0.7 at 3 stages
            keeps 70%, 49%, 34% of the patches).
        locations: 0-based blocks with a predictor (default: the 4th, 7th and 10th of 12, scaled to the depth).
        ratio_weight, distill_weight, kl_weight: loss weights (the paper's 2, 0.5, 0.5).
        weights: per-exit weights of the cross-entropy and KL terms (``"uniform"``, ``"linear"`` or a list).
        warmup_steps: optimizer steps over which the ratio targets go from 1 to their final values (0: at once).
        label_smoothing: of the cross-entropy.
        predictor_lr_scale: the predictors learn with their own Adam at this multiple of the backbone's current
            learning rate (DynamicViT trains the backbone at 1/100 of the predictors' rate); their step is taken
            at the start of the next optimizer step (one step late; the run's last gradient is not used). Their
            Adam state and pending gradient are part of :meth:`state_dict`, so a resumed run is exact. ``0``: the
            Trainer's optimizer trains them with the backbone, at its rate (needed under DDP, which syncs only what
            its optimizer trains).
    """

    name = "dynamicvit"

    def __init__(
        self,
        keep_rate: float = 0.7,
        locations: Sequence[int] | None = None,
        ratio_weight: float = 2.0,
        distill_weight: float = 0.5,
        kl_weight: float = 0.5,
        weights: str | Sequence[float] = "uniform",
        warmup_steps: int = 0,
        label_smoothing: float = 0.0,
        predictor_lr_scale: float = 100.0,
    ) -> None:
        if not 0.0 < float(keep_rate) <= 1.0:
            raise ConfigError(f"dynamicvit: keep_rate must be in (0, 1], got {keep_rate}")
        if min(ratio_weight, distill_weight, kl_weight, predictor_lr_scale) < 0 or int(warmup_steps) < 0:
            raise ConfigError(
                "dynamicvit: loss weights and warmup_steps must be >= 0, got "
                f"{ratio_weight}, {distill_weight}, {kl_weight}, {warmup_steps}"
            )
        self.keep_rate = float(keep_rate)
        self.locations = None if locations is None else tuple(int(i) for i in locations)
        self.ratio_weight = float(ratio_weight)
        self.distill_weight = float(distill_weight)
        self.kl_weight = float(kl_weight)
        self.weights = weights
        self.warmup_steps = int(warmup_steps)
        self.label_smoothing = float(label_smoothing)
        self.predictor_lr_scale = float(predictor_lr_scale)
        self._pred_opt: torch.optim.Optimizer | None = None
        self._pred_step = -1
        self._teacher: StagedModel | None = None
        self._blocks: list[TokenBlock] = []
        self._final: object = None

    def setup(self, model: StagedModel) -> None:
        """Freeze a copy of the model as the teacher, then attach the predictors (trained with the model)."""
        if any(isinstance(h, TokenStateHead) and h.unmerge_first for h in model.heads):
            raise ConfigError(
                "dynamicvit drops tokens: models with pooling heads (global_pool='avg') are not supported"
            )
        if self._teacher is None:
            teacher = copy.deepcopy(model)
            for blk in teacher.modules():
                if isinstance(blk, TokenBlock):
                    blk.predictor, blk.action = None, None  # the unreduced model
            self._teacher = teacher.eval().requires_grad_(False)
        self._blocks = attach_keep_predictors(model, self.keep_rate, self.locations)
        _record_in_spec(model, self.keep_rate, [token_blocks(model).index(b) for b in self._blocks])
        if self.predictor_lr_scale > 0 and self._pred_opt is None:  # out of the Trainer's optimizer (built next)
            for blk in self._blocks:
                blk.predictor.requires_grad_(False)

    def _step_predictors(self, ctx: StepContext) -> None:
        """The predictors' own optimizer: created on the first step, stepped once per new optimizer step."""
        params = [p for blk in self._blocks for p in blk.predictor.parameters()]
        if self._pred_opt is None:
            for p in params:
                p.requires_grad_(True)
            self._pred_opt = torch.optim.Adam(params, lr=self.predictor_lr_scale * ctx.lr)
        elif ctx.step != self._pred_step and any(p.grad is not None for p in params):
            for group in self._pred_opt.param_groups:
                group["lr"] = self.predictor_lr_scale * ctx.lr
            self._pred_opt.step()
            self._pred_opt.zero_grad(set_to_none=True)
        self._pred_step = ctx.step

    def train_mode(self, model: StagedModel) -> None:
        if self._teacher is not None:
            self._teacher.eval()

    def to(self, device: torch.device) -> DynamicViT:
        if self._teacher is not None:
            self._teacher.to(device)
        return self

    def _predictor_params(self) -> list[torch.nn.Parameter]:
        return [p for blk in self._blocks for p in blk.predictor.parameters()]

    def state_dict(self) -> dict[str, Any]:
        """The predictors' own optimizer: its Adam state, the step it last took and the gradient not yet applied."""
        if self._pred_opt is None:
            return {}
        grads = [None if p.grad is None else p.grad.detach().clone() for p in self._predictor_params()]
        return {"step": self._pred_step, "optimizer": self._pred_opt.state_dict(), "pending_grads": grads}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`setup` attached the predictors)."""
        if not state:
            return
        params = self._predictor_params()
        grads = state.get("pending_grads") or []
        if len(grads) != len(params):
            raise CheckpointError(
                f"dynamicvit: the checkpoint holds the optimizer state of {len(grads)} predictor tensors, "
                f"the model has {len(params)}"
            )
        for p, grad in zip(params, grads, strict=True):
            p.requires_grad_(True)
            p.grad = None if grad is None else grad.to(p.device, p.dtype).clone()
        self._pred_opt = torch.optim.Adam(params)
        self._pred_opt.load_state_dict(state["optimizer"])
        self._pred_step = int(state["step"])

    def ratio_targets(self, step: int) -> list[float]:
        """Kept fraction of the original patch tokens aimed at after each predictor, at optimizer ``step``."""
        rate = keep_rate_warmup(step, self.warmup_steps, self.keep_rate)
        return [rate ** (s + 1) for s in range(len(self._blocks))]

    def forward(self, model: StagedModel, x: Tensor) -> list[Tensor]:
        logits, self._final = staged_forward(model, x)
        return logits

    def __call__(self, exit_logits: list[Tensor], targets: Tensor) -> Tensor:
        """The weighted cross-entropy alone (the other terms need the masks and the teacher: :meth:`training_step`)."""
        weights = exit_weights(self.weights, len(exit_logits))
        ce = [F.cross_entropy(lg.float(), targets, label_smoothing=self.label_smoothing) for lg in exit_logits]
        return sum(w * c for w, c in zip(weights, ce, strict=True))

    def training_step(self, ctx: StepContext, x: Tensor, y: Tensor) -> StepOutput:
        if self._teacher is None:
            raise ConfigError("dynamicvit: call setup(model) before training (the Trainer does)")
        if self.predictor_lr_scale > 0:
            self._step_predictors(ctx)
        for blk in self._blocks:
            blk.last_keep = None
        logits = ctx.forward(x)
        final = self._final
        ce = self(logits, y)
        masks = [blk.last_keep for blk in self._blocks]
        for blk in self._blocks:  # the loss holds the graph; the blocks need not
            blk.last_keep = None
        if any(m is None for m in masks):
            raise ConfigError("dynamicvit: the training forward drew no keep masks (is the model in train mode?)")
        ratio = ratio_loss(masks, self.ratio_targets(ctx.step))
        with torch.no_grad():
            t_logits, t_final = staged_forward(self._teacher, x, check=False)  # the student checked x
        weights = exit_weights(self.weights, len(logits))
        kl = sum(
            w
            * F.kl_div(
                F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), reduction="batchmean", log_target=True
            )
            for w, s, t in zip(weights, logits, t_logits, strict=True)
        )
        token = _masked_token_mse(final, t_final)
        loss = ce + self.ratio_weight * ratio + self.distill_weight * token + self.kl_weight * kl
        metrics: dict[str, Tensor | float] = {
            "ratio_loss": ratio.detach(),
            "token_distill": token.detach(),
            "kl_distill": kl.detach(),
        }
        for s, m in enumerate(masks):
            metrics[f"keep_fraction_{s}"] = m.detach().float().mean()
        return StepOutput(loss, metrics)


def _record_in_spec(model: StagedModel, keep_rate: float, locations: list[int]) -> None:
    """Name the predictors in the model spec (when its factory takes them) so checkpoints rebuild them."""
    spec = getattr(model, "model_spec", None)
    if not isinstance(spec, dict) or not {"keep_rate", "keep_locations"} <= set(checkpoint_args(spec["name"])):
        return
    kwargs = dict(spec.get("kwargs", {}), keep_rate=keep_rate, keep_locations=locations)
    model.model_spec = dict(spec, kwargs=kwargs)


def _masked_token_mse(student: object, teacher: object) -> Tensor:
    """Mean squared error of the final patch tokens the student kept (its last mask), per kept token."""
    if not isinstance(student, TokenState) or not isinstance(teacher, TokenState):
        raise ConfigError("dynamicvit needs a token ViT (segments carrying a TokenState)")
    p = student.prefix
    s, t = student.tokens[:, p:].float(), teacher.tokens[:, p:].float()
    err = (s - t).pow(2).mean(dim=-1)  # [B, n]
    if student.mask is None:
        return err.mean()
    w = student.mask[:, p:].float()
    return (err * w).sum() / w.sum().clamp_min(1.0)
