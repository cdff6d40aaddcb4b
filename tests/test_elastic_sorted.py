"""The ``sorted`` strategy: sandwich-rule members, its loss against the formula, training through the Trainer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adaptnn
from adaptnn.errors import ConfigError
from adaptnn.layers.elastic import Variant
from adaptnn.strategies import SortedLoss, StepContext, get
from adaptnn.strategies.sortednet import sandwich_members
from adaptnn.training import TrainConfig, Trainer


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
