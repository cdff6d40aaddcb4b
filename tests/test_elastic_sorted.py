"""The ``sorted`` strategy: sandwich-rule members, its loss against the formula, training through the Trainer."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import adaptnn
from adaptnn.errors import ConfigError
from adaptnn.layers.elastic import Variant
from adaptnn.strategies import SortedLoss, StepContext, get
from adaptnn.strategies.sortednet import sandwich_members
from adaptnn.training import TrainConfig, Trainer
from adaptnn.training.distributed import micro_batch_indices
from adaptnn.training.schedule import build_optimizer, lr_factor


def _model():
    torch.manual_seed(0)
    return adaptnn.create_model("elastic_cnn_digits", widths=[8, 8, 16, 16])


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return torch.utils.data.TensorDataset(x, y)


def test_sandwich_members_are_largest_smallest_and_distinct_seeded_draws():
    variants = [Variant(w, d) for w in (0.25, 0.5, 1.0) for d in (1, 2)]
    variants.sort(key=Variant.key)
    seen = set()
    for step in range(20):
        members = sandwich_members(variants, 2, step)
        assert members[:2] == [variants[-1], variants[0]]
        assert len(set(members)) == 4 and set(members[2:]) <= set(variants[1:-1])
        assert members == sandwich_members(variants, 2, step)  # a resumed run draws the same members
        seen.update(members[2:])
    assert seen == set(variants[1:-1])
    assert sandwich_members(variants[:1], 3, 0) == variants[:1]


@pytest.mark.parametrize("temperature", [2.0, 1.0])
def test_sorted_loss_is_the_sum_of_member_losses_with_inplace_distillation(temperature):
    model = _model().train()
    x, y = _data(16).tensors
    strategy = SortedLoss(num_random=1, temperature=temperature, alpha=0.25)
    ctx = StepContext(model, model.forward_all, lr=0.1, step=3, epoch=0)
    torch.manual_seed(1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = strategy.training_step(ctx, x, y)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.load_state_dict(state)  # undo the members' batch-norm updates, then recompute by hand
    members = sandwich_members(model.variants, 1, 3)
    expected, teacher = 0.0, None
    for i, v in enumerate(members):
        with model.use_variant(v):
            logits = model.forward_all(x)
        ce = sum(F.cross_entropy(lg, y) for lg in logits)
        if i == 0:
            teacher, loss = logits, ce
        else:
            t_ = temperature
            kd = sum(
                F.kl_div(F.log_softmax(s / t_, -1), F.softmax(t.detach() / t_, -1), reduction="batchmean")
                for s, t in zip(logits, teacher, strict=True)
            )
            loss = 0.75 * ce + 0.25 * t_**2 * kd
        expected = expected + loss
    torch.testing.assert_close(out.loss, expected.float(), rtol=1e-5, atol=1e-6)
    assert set(out.metrics) == {"loss_largest", "loss_smallest"}
    assert model.variant == model.largest


def test_sorted_needs_an_elastic_model_and_valid_options():
    plain = adaptnn.create_model("mecnn_digits")
    with pytest.raises(ConfigError, match="elastic model"):
        get("sorted").setup(plain)
    with pytest.raises(ConfigError, match="exit_loss"):
        get("sorted", exit_loss="boost")
    with pytest.raises(ConfigError, match="exit_options"):
        get("sorted", exit_options={"nonsense": 1})


def test_sorted_trains_every_member_through_the_trainer(tmp_path):
    model = _model()
    data = _data()
    cfg = TrainConfig(
        epochs=2, batch_size=32, lr=0.05, device="cpu", progress=False, strategy="sorted", warmup_epochs=0.0
    )
    cfg.strategy_options = {"num_random": 1, "exit_loss": "distill", "exit_options": {"weights": "linear"}}
    before = {v: model.state_dict()["segments.0.0.1.running_mean"][i].clone() for i, v in enumerate(model.variants)}
    history = Trainer(model, data, cfg, tmp_path, val_set=data).fit()
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in history)
    assert "loss_smallest" in history[-1] and len(history[-1]["val_exit_accuracy"]) == 4
    stats = model.state_dict()["segments.0.0.1.running_mean"]
    assert not torch.equal(stats[0], before[model.variants[0]])  # the smallest member's own statistics moved
    assert not torch.equal(stats[-1], before[model.variants[-1]])
    assert model.variant == model.largest


def _vit():
    torch.manual_seed(0)
    return adaptnn.create_model("elastic_vit_tiny_conv_fmnist", width_mults=[0.5, 1.0], depths=[1, 2])


def _summed_then_per_member(model, strategy, x, y, scale=0.375):
    """``(summed loss, its grads, per-member StepOutput, its grads, backward calls)`` of one step from one state."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = StepContext(model, model.forward_all, lr=0.1, step=5, epoch=0)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    summed = strategy.training_step(ctx, x, y)  # no ctx.backward: the caller back-propagates the summed loss
    assert not summed.backward_done and summed.loss.requires_grad
    (summed.loss * scale).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    calls = []

    def backward(loss):
        calls.append(loss.detach())
        (loss * scale).backward()

    torch.manual_seed(1)
    out = strategy.training_step(dataclasses.replace(ctx, backward=backward), x, y)
    per_member = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return summed, grads, out, per_member, calls


@pytest.mark.parametrize("make", [_model, _vit], ids=["cnn", "vit"])
@pytest.mark.parametrize("distill", [True, False])
def test_one_backward_per_member_gives_the_gradients_of_the_summed_loss(make, distill):
    model = make().train()
    x = torch.randn(12, 1, 8, 8) if make is _model else torch.randn(6, 1, 28, 28)
    y = torch.arange(len(x)) % 4
    strategy = SortedLoss(num_random=1, distill=distill, temperature=2.0, alpha=0.25)
    summed, grads, out, per_member, calls = _summed_then_per_member(model, strategy, x, y)
    assert out.backward_done and not out.loss.requires_grad
    assert len(calls) == len(sandwich_members(model.variants, 1, 5)) == 3  # one backward per member
    torch.testing.assert_close(out.loss, summed.loss.detach(), rtol=1e-6, atol=1e-6)  # the metered loss: the sum
    torch.testing.assert_close(sum(calls), out.loss, rtol=1e-6, atol=1e-6)
    assert out.metrics.keys() == summed.metrics.keys()
    assert per_member.keys() == grads.keys() and len(grads) == len(list(model.parameters()))
    for name, g in grads.items():
        torch.testing.assert_close(per_member[name], g, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert model.variant == model.largest


def test_per_member_backward_is_not_used_under_ddp():
    model = _model().train()
    x, y = _data(8).tensors
    calls = []
    ctx = StepContext(model, model.forward_all, 0.1, 0, 0, world_size=2, backward=calls.append)
    out = SortedLoss().training_step(ctx, x, y)
    assert calls == [] and not out.backward_done and out.loss.requires_grad  # DDP: one summed backward


def _reference_fit(model, data, cfg, options):
    """The Trainer's updates written out by hand with the summed loss (one backward per micro-batch)."""
    strategy = SortedLoss(**options)
    strategy.setup(model)
    optimizer = build_optimizer(model, cfg)
    n = len(data)
    per_epoch = len(micro_batch_indices(n, cfg.batch_size, seed=cfg.seed, epoch=0))
    total, step = cfg.epochs * per_epoch, 0
    for epoch in range(cfg.epochs):
        model.train()
        for micro in micro_batch_indices(
            n, cfg.batch_size, seed=cfg.seed, epoch=epoch, accum_steps=cfg.grad_accum_steps
        ):
            lr = cfg.lr * lr_factor(cfg, step, total, round(cfg.warmup_epochs * per_epoch))
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            for idx in micro:
                x, y = data[idx]
                ctx = StepContext(model, model.forward_all, lr, step, epoch)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                    loss = strategy.training_step(ctx, x, y).loss
                (loss * len(idx) / sum(len(i) for i in micro)).backward()
            optimizer.step()
            step += 1
    return model


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainer_with_per_member_backward_matches_a_summed_step_with_micro_batches(tmp_path, precision):
    data = _data()
    cfg = TrainConfig(
        epochs=1,
        batch_size=25,  # 2 steps, each 3 micro-batches of 9, 8 and 8 samples: unequal loss scales
        grad_accum_steps=3,
        lr=0.05,
        device="cpu",
        progress=False,
        strategy="sorted",
        warmup_epochs=0.0,
        precision=precision,
    )
    cfg.strategy_options = options = {"num_random": 1, "distill": True, "temperature": 2.0}
    done = []

    class Recorded(SortedLoss):
        def training_step(self, ctx, x, y):
            out = super().training_step(ctx, x, y)
            done.append(out.backward_done)
            return out

    trained = _model()
    Trainer(trained, data, cfg, tmp_path, loss_fn=Recorded(**options)).fit()
    assert done == [True] * 6  # the Trainer offered ctx.backward: one backward per member, every micro-batch
    expected = _reference_fit(_model(), data, cfg, options).state_dict()
    # bf16: the summed loss adds the members' weight gradients in bfloat16 (autocast caches one cast of each
    # weight, shared by the members), one backward per member adds them in float32: close, not equal
    tol = {"rtol": 1e-5, "atol": 1e-6} if precision == "fp32" else {"rtol": 1e-2, "atol": 5e-3}
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(value, expected[name], **tol, msg=lambda m, name=name: f"{name}: {m}")
