"""L2W-DEN: meta-learned sample weights (Han et al., "Learning to Weight Samples for Dynamic Early-exiting
Networks", ECCV 2022).

A small *weight network* maps each training sample's vector of per-exit losses ``[K]`` to per-exit
weights ``w = 1 + eps * (t - mean_batch(t))`` with ``t = tanh(MLP(losses))`` (centred over the batch for each
exit, so every exit's mean weight stays 1 and only the balance between samples changes). The backbone
minimises ``mean_i sum_k w_ik * CE_ik``.

The weight network is meta-trained so that this weighting helps the *dynamic* model: every
``meta_interval`` steps each micro-batch is split into a training part and a held-out meta part
(``meta_fraction`` of it). On the training part the weighted loss gives a differentiable one-step SGD
look-ahead of the backbone, ``theta' = theta - lr * grad_theta L_w(theta)`` (``create_graph=True``; the
look-ahead runs ``torch.func.functional_call`` on the live module with substituted parameters - no model
copy; the normalisation buffers are cloned so the look-ahead leaves the running statistics alone). On
the meta part, samples are allocated to exits as in the budgeted-batch protocol with target ``p``
(exit k takes the ``floor(n * pi_k)`` most confident remaining samples, ``pi_k ~ p^k``; the fractions and
quotas are those of :mod:`adaptnn.calibration`), and the meta loss
is the cross-entropy of each sample at its allocated exit under ``theta'``. Its gradient trains the
weight network (Adam). Then the backbone takes its ordinary step on the weighted loss of the whole
micro-batch with the updated weights (detached): every sample is still trained on, as with the other
strategies; the meta part is held out of the look-ahead only.

Extra cost of a step with a meta update, relative to a plain joint step: one forward of the training
part, a backward with ``create_graph`` (about 2x a backward), one forward of the meta part with
``theta'`` and the backward of the meta loss through the look-ahead (second-order terms), i.e. roughly
3-4x the compute of a plain step and about twice its activation memory. ``meta_interval`` amortises it. The
reference code's own default is 1 (a look-ahead every step); the one training command it publishes (ImageNet,
batch 4096) uses 100. adaptnn defaults to 10: on issue 12's CIFAR-10 recipe a training step then costs about
1.1-1.2x a joint step, against 2.7x with a look-ahead every step (30 steps timed side by side,
``benchmarks/fidelity.py --train_subset 1920``), and a look-ahead every step did not train a better model there
(seed 0, one CPU: mean accuracy over budgets 72.85 vs 72.92, first exit 69.79 vs 71.01;
``benchmarks/results/fidelity_cifar10_controlled_seed0.md``); set ``meta_interval: 1`` for the reference default.

What the weight network learns can be read per exit: the ``l2w_weight_loss_corr_<k>`` training metrics, or
``benchmarks/l2w_weights.py`` for a saved run. The paper's premise is that early exits weight easy samples more and
late exits hard ones. On issue 12's 3-epoch CIFAR-10 recipe it did not learn that: at the first exit every run
weighted hard samples more (correlation of weight with loss +0.90 to +0.97 over seeds 0-2 and ``meta_interval: 1``),
and the later exits' signs changed from seed to seed (``benchmarks/results/l2w_weights_cifar10.md``). Weighing the
same losses with each run's *initial* weight network (``--weight_net both``) separates the two: the first exit's slope
towards hard samples is already the random initialisation's (+0.39 to +0.97), and of the 11 exits whose correlation
meta-training moved by more than 0.3, 10 moved towards hard samples. So the meta objective (a one-step look-ahead,
then the loss at each meta sample's allocated exit) rewards weight on hard samples, not the paper's split by exit;
the reference's ``meta_reduction: exit`` did the same on seed 0 (``l2w_weights_cifar10_meta_reduction_exit.md``).
A likely mechanism (not measured here): a weight's meta gradient is the inner product of its sample's training
gradient with the meta gradient, and on clean labels a hard sample's larger gradient makes the larger product.

The look-ahead ignores momentum and weight decay (plain SGD with the current learning rate). Under DDP
each process runs the look-ahead on its own shard and the weight network's gradients are averaged.

Where this differs from the authors' CIFAR training script (read for issue 12; options where cheap):

* The script splits every loader batch into two halves and takes **two backbone SGD steps** per batch, one on
  each half (each preceded, every ``meta_interval`` batches, by a look-ahead on that half with the other half
  as meta data). Its backbone therefore trains with half the loader batch and twice the steps of a joint
  run at the same ``batch_size``; adaptnn takes one step on the whole micro-batch, as every other strategy.
  To compare at the script's step count, halve ``batch_size``.
* Its look-ahead is an SGD step with the backbone optimizer's state (momentum buffers, weight decay).
* Its meta loss sums each exit's mean (``meta_reduction: exit``); its published ImageNet command centres
  the weights over the whole matrix (``centre: all``); adaptnn defaults to ``sample`` and ``exit``.
* Its weight network's learning rate follows a cosine schedule; adaptnn's is constant unless
  ``meta_lr_schedule: follow``. Its argparse
  defaults are ``meta_lr`` 1e-5 and ``meta_weight_decay`` 0 (the ImageNet command: 1e-4 and 1e-4, ``eps``
  0.3, hidden 500); it publishes no CIFAR command.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..calibration import exit_distribution, quota
from ..errors import ConfigError
from .base import StepContext, StepOutput, Strategy, per_exit_cross_entropy

if TYPE_CHECKING:
    from ..runtime.staged import StagedModel

__all__ = ["L2WLoss", "WeightNet", "allocate_exits", "weight_loss_correlation"]


class WeightNet(nn.Module):
    """MLP mapping per-exit losses ``[N, K]`` to ``tanh`` outputs ``[N, K]`` in (-1, 1)."""

    def __init__(self, num_exits: int, hidden: int = 100) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_exits, hidden), nn.ReLU(), nn.Linear(hidden, num_exits))

    def forward(self, losses: Tensor) -> Tensor:
        return torch.tanh(self.net(losses))


class _AllExits(nn.Module):
    """A view of a staged model whose ``forward`` returns every exit's logits (for ``functional_call``)."""

    def __init__(self, model: StagedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.model.forward_all(x)


def allocate_exits(confidence: Tensor, fractions: Sequence[float]) -> Tensor:
    """Allocate samples to exits as the budgeted-batch protocol does (quotas of :func:`adaptnn.calibration.quota`).

    Args:
        confidence: ``[K, N]`` confidence of every sample at every exit.
        fractions: target fraction of all N samples for each exit (``pi``).

    Returns:
        ``[N]`` long: exit k (k < K-1) takes the ``floor(N * pi_k)`` most confident samples not yet taken;
        the last exit takes the rest.
    """
    num_exits, n = confidence.shape
    exit_index = torch.full((n,), num_exits - 1, dtype=torch.long, device=confidence.device)
    free = torch.ones(n, dtype=torch.bool, device=confidence.device)
    remaining = n
    for k in range(num_exits - 1):
        take = min(quota(n, fractions[k]), remaining)
        if take <= 0:
            continue
        score = confidence[k].masked_fill(~free, -math.inf)
        taken = score.topk(take).indices
        exit_index[taken] = k
        free[taken] = False
        remaining -= take
    return exit_index


def weight_loss_correlation(weights: Tensor, losses: Tensor) -> Tensor:
    """Per exit, the Pearson correlation over the samples of their weights ``[N, K]`` with their losses ``[N, K]``.

    The paper's premise is that early exits should weight easy (low-loss) samples more and late exits hard ones:
    a negative value at early exits and a positive one at late exits. Returns ``[K]``; 0 where either column is
    constant (e.g. ``eps: 0``).
    """
    w, loss = weights.detach().float(), losses.detach().float()
    w, loss = w - w.mean(0), loss - loss.mean(0)
    scale = (w.square().sum(0) * loss.square().sum(0)).sqrt()
    return torch.where(scale > 0, (w * loss).sum(0) / scale.clamp_min(1e-30), torch.zeros_like(scale))


class L2WLoss(Strategy):
    """L2W-DEN sample weighting with a meta-trained weight network (see the module docstring).

    Args:
        eps: weight spread; weights lie in ``1 +- 2 * eps``.
        target_p: exit-distribution parameter of the meta allocation (1.0 = uniform over exits).
        meta_lr: Adam learning rate of the weight network.
        meta_weight_decay: its weight decay.
        hidden: hidden width of the weight network.
        meta_interval: meta-update every this many optimizer steps (1 = every step, the reference code's
            default, 2.7x the cost of a joint step; 10 costs about 1.1-1.2x).
        meta_fraction: share of each micro-batch held out as meta data.
        label_smoothing: of the backbone's cross-entropies.
        centre: how the weight network's outputs are centred over the batch: ``"exit"`` (per exit, so every
            exit's mean weight is 1; the reference code's ``constraint_dimension row``) or ``"all"`` (one mean
            over the whole ``[N, K]`` matrix, so only the overall mean weight is 1 and the balance between
            exits can move too; ``mat``, what the reference's published ImageNet command uses).
        meta_reduction: the meta loss over the meta samples: ``"sample"`` (the mean cross-entropy of every
            sample at its allocated exit) or ``"exit"`` (the sum over exits of the mean cross-entropy of the
            samples allocated there: every exit counts equally however many samples it takes; the reference
            code's).
        meta_lr_schedule: ``"constant"`` or ``"follow"``: the weight network's learning rate is ``meta_lr`` times the
            backbone schedule's factor (the reference code decays it on a cosine over training, which ``follow``
            matches under a cosine backbone schedule without warm-up).
    """

    name = "l2w"

    def __init__(
        self,
        eps: float = 0.5,
        target_p: float = 1.0,
        meta_lr: float = 1e-3,
        meta_weight_decay: float = 1e-4,
        hidden: int = 100,
        meta_interval: int = 10,
        meta_fraction: float = 0.5,
        label_smoothing: float = 0.0,
        centre: Literal["exit", "all"] = "exit",
        meta_reduction: Literal["sample", "exit"] = "sample",
        meta_lr_schedule: Literal["constant", "follow"] = "constant",
    ) -> None:
        if centre not in ("exit", "all") or meta_reduction not in ("sample", "exit"):
            raise ConfigError(
                f"l2w: centre must be 'exit' or 'all' and meta_reduction 'sample' or 'exit'; got {centre!r}, "
                f"{meta_reduction!r}"
            )
        if meta_lr_schedule not in ("constant", "follow"):
            raise ConfigError(f"l2w: meta_lr_schedule must be 'constant' or 'follow', got {meta_lr_schedule!r}")
        if not 0 <= eps <= 0.5:
            raise ConfigError(f"l2w: eps must be in [0, 0.5] so weights stay >= 0, got {eps}")
        if not target_p > 0 or not meta_lr > 0 or meta_interval < 1 or not 0 < meta_fraction < 1 or hidden < 1:
            raise ConfigError(
                "l2w: need target_p > 0, meta_lr > 0, meta_interval >= 1, 0 < meta_fraction < 1, hidden >= 1; got "
                f"{target_p}, {meta_lr}, {meta_interval}, {meta_fraction}, {hidden}"
            )
        self.eps = float(eps)
        self.target_p = float(target_p)
        self.meta_lr = float(meta_lr)
        self.meta_weight_decay = float(meta_weight_decay)
        self.hidden = int(hidden)
        self.meta_interval = int(meta_interval)
        self.meta_fraction = float(meta_fraction)
        self.label_smoothing = label_smoothing
        self.centre = centre
        self.meta_reduction = meta_reduction
        self.meta_lr_schedule = meta_lr_schedule
        self.weight_net: WeightNet | None = None
        self.meta_optimizer: torch.optim.Optimizer | None = None

    # ---- set-up and state -------------------------------------------------------------------------
    def setup(self, model: StagedModel) -> None:
        """Build the weight network (and its Adam) for ``model``'s number of exits, unless already built."""
        try:
            exit_distribution(self.target_p, model.num_exits)
        except ConfigError as err:
            raise ConfigError(f"l2w: target_p: {err}") from None
        if self.weight_net is None or self.weight_net.net[0].in_features != model.num_exits:
            device = next(model.parameters()).device
            self.weight_net = WeightNet(model.num_exits, self.hidden).to(device)
            self.meta_optimizer = torch.optim.Adam(
                self.weight_net.parameters(), lr=self.meta_lr, weight_decay=self.meta_weight_decay
            )

    def to(self, device: torch.device) -> L2WLoss:
        if self.weight_net is not None:
            self.weight_net.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        if self.weight_net is None or self.meta_optimizer is None:
            return {}
        return {"weight_net": self.weight_net.state_dict(), "optimizer": self.meta_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.weight_net is None or self.meta_optimizer is None:
            raise ConfigError("l2w: call setup(model) before load_state_dict")
        self.weight_net.load_state_dict(state["weight_net"])
        self.meta_optimizer.load_state_dict(state["optimizer"])

    # ---- losses -----------------------------------------------------------------------------------
    def sample_weights(self, losses: Tensor) -> Tensor:
        """Per-sample, per-exit weights ``[N, K]`` from the per-exit losses ``[N, K]`` (differentiable in the net)."""
        if self.weight_net is None:
            raise ConfigError("l2w: the weight network is not built yet; call setup(model) first")
        t = self.weight_net(losses.detach().float())
        mean = t.mean(dim=0, keepdim=True) if self.centre == "exit" else t.mean()
        return 1.0 + self.eps * (t - mean)

    def weighted_loss(self, exit_logits: list[Tensor], targets: Tensor, weights: Tensor) -> Tensor:
        """``mean_i sum_k w_ik * CE_ik``."""
        losses = per_exit_cross_entropy(exit_logits, targets, self.label_smoothing)
        return (weights * losses).sum(dim=1).mean()

    def __call__(self, exit_logits: list[Tensor], targets: Tensor) -> Tensor:
        """The backbone's weighted loss with the current weight network (no meta step)."""
        losses = per_exit_cross_entropy(exit_logits, targets, self.label_smoothing)
        with torch.no_grad():
            weights = self.sample_weights(losses)
        return (weights * losses).sum(dim=1).mean()

    def meta_loss(self, exit_logits: list[Tensor], targets: Tensor) -> Tensor:
        """Cross-entropy of each sample at the exit the budgeted allocation (target p) gives it.

        Reduced per ``meta_reduction``: the mean over samples, or the sum over exits of each exit's mean.
        """
        probs = torch.stack([lg.detach().float().softmax(-1) for lg in exit_logits])  # [K, N, C]
        exits = allocate_exits(probs.amax(-1), exit_distribution(self.target_p, len(exit_logits)))
        stacked = torch.stack([lg.float() for lg in exit_logits])  # [K, N, C]
        chosen = stacked[exits, torch.arange(len(targets), device=targets.device)]
        if self.meta_reduction == "sample":
            return F.cross_entropy(chosen, targets)
        per_sample = F.cross_entropy(chosen, targets, reduction="none")
        counts = torch.bincount(exits, minlength=len(exit_logits)).to(per_sample.dtype)
        sums = torch.zeros_like(counts).index_add(0, exits, per_sample)
        return (sums / counts.clamp(min=1)).sum()  # exits without samples add 0

    def meta_step(
        self, model: StagedModel, lr: float, x: Tensor, y: Tensor, world_size: int = 1, lr_factor: float = 1.0
    ) -> float:
        """One meta update of the weight network from a micro-batch; returns the meta loss.

        ``lr_factor`` is the backbone schedule's factor, which the meta lr follows under ``meta_lr_schedule: follow``.
        """
        return float(self._meta_update(model, lr, x, y, world_size, lr_factor))

    def _meta_update(
        self, model: StagedModel, lr: float, x: Tensor, y: Tensor, world_size: int, lr_factor: float = 1.0
    ) -> Tensor:
        """:meth:`meta_step`, returning the detached meta loss as a tensor (no device sync)."""
        if self.weight_net is None or self.meta_optimizer is None:
            self.setup(model)
        assert self.weight_net is not None and self.meta_optimizer is not None
        n_meta = max(1, round(len(y) * self.meta_fraction))
        if len(y) - n_meta < 1:
            raise ConfigError(f"l2w: a micro-batch of {len(y)} sample(s) cannot be split into train and meta parts")
        x_train, y_train, x_meta, y_meta = x[:-n_meta], y[:-n_meta], x[-n_meta:], y[-n_meta:]
        view = _AllExits(model)
        params = {f"model.{k}": p for k, p in model.named_parameters() if p.requires_grad}
        buffers = {f"model.{k}": b.clone() for k, b in model.named_buffers()}
        logits = functional_call(view, {**params, **buffers}, (x_train,))
        losses = per_exit_cross_entropy(logits, y_train, self.label_smoothing)
        weights = self.sample_weights(losses)
        inner = (weights * losses).sum(dim=1).mean()
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True, allow_unused=True)
        ahead = {k: (p if g is None else p - lr * g) for (k, p), g in zip(params.items(), grads, strict=True)}
        meta = self.meta_loss(functional_call(view, {**ahead, **buffers}, (x_meta,)), y_meta)
        self.meta_optimizer.zero_grad(set_to_none=True)
        wnet_params = list(self.weight_net.parameters())
        meta_grads = torch.autograd.grad(meta, wnet_params, allow_unused=True)
        for p, g in zip(wnet_params, meta_grads, strict=True):
            p.grad = torch.zeros_like(p) if g is None else g.detach()
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            for p in wnet_params:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world_size
        for group in self.meta_optimizer.param_groups:
            group["lr"] = self.meta_lr * (lr_factor if self.meta_lr_schedule == "follow" else 1.0)
        self.meta_optimizer.step()
        return meta.detach()

    def training_step(self, ctx: StepContext, x: Tensor, y: Tensor) -> StepOutput:
        """A meta update every ``meta_interval`` steps, then the weighted loss of the whole micro-batch.

        Metrics: ``l2w_meta_loss`` (steps with a meta update), ``l2w_weight_std`` (spread of the weights) and
        ``l2w_weight_loss_corr_<k>`` for each exit k (:func:`weight_loss_correlation` within the micro-batch: does
        exit k weight hard samples more, > 0, or easy ones, < 0?).
        """
        metrics: dict[str, Tensor | float] = {}
        if ctx.step % self.meta_interval == 0:
            metrics["l2w_meta_loss"] = self._meta_update(ctx.model, ctx.lr, x, y, ctx.world_size, ctx.lr_factor)
        logits = ctx.forward(x)
        losses = per_exit_cross_entropy(logits, y, self.label_smoothing)
        with torch.no_grad():
            weights = self.sample_weights(losses)
        metrics["l2w_weight_std"] = weights.std()
        for k, corr in enumerate(weight_loss_correlation(weights, losses)):
            metrics[f"l2w_weight_loss_corr_{k}"] = corr
        return StepOutput((weights * losses).sum(dim=1).mean(), metrics)
