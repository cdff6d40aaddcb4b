"""Matryoshka exit heads and per-sample layer skipping trained from a config: registered families and strategies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import adaptnn
from adaptnn.errors import ConfigError
from adaptnn.layers.elastic import MatryoshkaHead, matryoshka_heads, record_nested
from adaptnn.layers.skip import gated_blocks, record_gates, set_skip_mode
from adaptnn.strategies import StepContext, get
from adaptnn.training import TrainConfig, Trainer


def _digits(n: int = 64, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x.flatten(1)[:, 0] > 0).long()
    return torch.utils.data.TensorDataset(x, y)


def _config(strategy: str, **options) -> TrainConfig:
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, device="cpu", progress=False, strategy=strategy)
    cfg.warmup_epochs = 0.0
    cfg.strategy_options = options
    return cfg


# ----------------------------------------------------------------------------- Matryoshka exit heads


def test_matryoshka_exits_of_an_elastic_cnn_record_every_truncation_and_materialise() -> None:
    torch.manual_seed(0)
    model = adaptnn.create_model("elastic_cnn_digits", widths=[8, 8, 16, 16], matryoshka_dims=[4, 8, 16]).eval()
    heads = matryoshka_heads(model)
    assert len(heads) == model.num_exits and all(h.dims == (4, 8, 16) for h in heads)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad(), model.use_variant(width=0.5, depth=1):
        with record_nested(model) as records:
            logits = model.forward_all(x)
        assert len(records) == model.num_exits and all(len(r) == 3 for r in records)
        for lg, nested, head in zip(logits, records, heads, strict=True):
            torch.testing.assert_close(lg, nested[-1])  # the active (full) truncation is the exit's output
            head.set_dim(4)
        small = model.forward_all(x)  # every exit on its 4-dim prefix
        plain = model.materialise()
        assert all(type(h.proj) is torch.nn.Linear and h.dim == 4 for h in matryoshka_heads(plain))
        for a, b in zip(small, plain.forward_all(x), strict=True):
            assert (a - b).abs().max().item() <= 1e-6
        for r, s in zip(records, small, strict=True):
            torch.testing.assert_close(r[0], s)
    for head in heads:
        head.set_dim(16)
    assert all(h._record is None for h in heads)  # the recording ended with the context


def test_matryoshka_loss_is_nested_cross_entropy_per_exit() -> None:
    torch.manual_seed(0)
    model = adaptnn.create_model("elastic_cnn_digits", widths=[8, 8, 16, 16], matryoshka_dims=[2, 8]).train()
    x, y = _digits(16).tensors
    strategy = get("matryoshka", weights="linear", truncation_weights=[0.5, 1.0])
    strategy.setup(model)
    torch.manual_seed(1)
    out = strategy.training_step(StepContext(model, model.forward_all, lr=0.1, step=0, epoch=0), x, y)
    model.eval()  # batch-norm in eval: recompute every exit's nested logits by hand from the same weights
    strategy.setup(model)
    with torch.no_grad():
        loss = strategy.training_step(StepContext(model, model.forward_all, 0.1, 0, 0), x, y).loss
        expected, state = 0.0, x
        for k, (segment, head) in enumerate(zip(model.segments, model.heads, strict=True)):
            state = segment(state)
            nested = head.forward_nested(state)
            ce = 0.5 * F.cross_entropy(nested[0], y) + F.cross_entropy(nested[1], y)
            expected = expected + (k + 1) / model.num_exits * ce
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(out.loss) and "loss_active" in out.metrics
    with pytest.raises(ConfigError, match="MatryoshkaHeads"):
        get("matryoshka").setup(adaptnn.create_model("elastic_cnn_digits"))


def test_sorted_trains_width_by_exit_by_truncation_through_the_trainer(tmp_path) -> None:
    torch.manual_seed(0)
    model = adaptnn.create_model("elastic_cnn_digits", widths=[8, 8, 16, 16], matryoshka_dims=[4, 16])
    data = _digits()
    proj = model.heads[0].proj.weight
    before = proj.detach().clone()
    cfg = _config("sorted", num_random=1, exit_loss="matryoshka")
    history = Trainer(model, data, cfg, tmp_path, val_set=data).fit()
    assert len(history) == 1 and "loss_smallest" in history[-1] and len(history[-1]["val_exit_accuracy"]) == 4
    assert not torch.equal(proj.detach(), before)
    with pytest.raises(ConfigError, match="MatryoshkaHeads"):
        get("sorted", exit_loss="matryoshka").setup(adaptnn.create_model("elastic_cnn_digits"))


# ----------------------------------------------------------------------------- per-sample layer skipping


def test_skip_resnet_family_skips_per_sample_and_prices_every_block() -> None:
    torch.manual_seed(0)
    model = adaptnn.create_model("skip_resnet_mnist", widths=[8, 16, 16]).eval()
    assert len(gated_blocks(model)) == 6 and model.num_exits == 3
    x = torch.randn(6, 1, 28, 28)
    costs = model.exit_costs(x)  # counted on the meta device: every block kept (the upper bound)
    assert costs.shape == (3,) and bool((costs.diff() > 0).all())
    g = torch.Generator().manual_seed(1)
    for block in gated_blocks(model):  # random gates: some samples run each block, some skip it
        block.gate.fc.weight.data.normal_(0.0, 3.0, generator=g)
        block.gate.fc.bias.data.zero_()
    outs, decisions = {}, {}
    for mode in ("gather", "dense"):
        set_skip_mode(model, mode)
        with torch.no_grad(), record_gates(model) as records:
            outs[mode] = model.forward_all(x)
        decisions[mode] = torch.stack(records)
    assert torch.equal(decisions["gather"], decisions["dense"])
    assert decisions["gather"].any() and not decisions["gather"].all()
    for a, b in zip(outs["gather"], outs["dense"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_skip_strategy_pulls_the_keep_rate_towards_its_target(tmp_path) -> None:
    torch.manual_seed(0)
    model = adaptnn.create_model("skip_resnet_mnist", widths=[8, 8, 8], input_size=(8, 8))
    data = _digits(128)
    cfg = _config("skip", target=0.25, cost_weight=20.0)
    cfg.epochs, cfg.lr = 2, 0.1
    history = Trainer(model, data, cfg, tmp_path, val_set=data).fit()
    assert history[0]["keep_rate"] > history[-1]["keep_rate"]  # the gates start on (~0.88) and learn to skip
    assert "skip_penalty" in history[-1]
    with pytest.raises(ConfigError, match="GatedBlocks"):
        get("skip").setup(adaptnn.create_model("mecnn_digits"))
    with pytest.raises(ConfigError, match="target"):
        get("skip", target=1.5)


# ----------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize(
    ("name", "model", "strategy"),
    [
        ("skip_resnet_fmnist.yaml", "skip_resnet_mnist", "skip"),
        ("elastic_cnn_matryoshka_fmnist.yaml", "elastic_cnn_mnist", "sorted"),
    ],
)
def test_shipped_configs_train_these_families(name: str, model: str, strategy: str) -> None:
    from adaptnn.runs.config import load_config

    config = load_config(Path(adaptnn.__file__).parent / "configs" / name)
    assert (config.model.name, config.train.strategy) == (model, strategy)
    built = adaptnn.create_model(config.model.name, **config.model.kwargs)
    get(config.train.strategy, **config.train.strategy_options).setup(built)
    if name.startswith("elastic"):
        assert isinstance(built.heads[0], MatryoshkaHead)
