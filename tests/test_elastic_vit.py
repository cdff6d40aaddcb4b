"""Elastic ViTs: members keep a prefix of heads and MLP units and skip trailing blocks; materialised members match."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adaptnn
from adaptnn.errors import CheckpointError, ConfigError, UnsupportedModelError
from adaptnn.io import save_checkpoint
from adaptnn.layers.elastic import ElasticLayerNorm, ElasticLinear, ElasticQKV, ElasticSequential, Variant
from adaptnn.layers.elastic_tokens import elasticize_vit
from adaptnn.layers.tokens import TokenKnob, set_token_knob, token_blocks
from adaptnn.models import load_model
from adaptnn.models.vit import vit_staged
from adaptnn.runtime import StagedModel
from adaptnn.training import TrainConfig, Trainer

ELASTIC = (ElasticQKV, ElasticLinear, ElasticLayerNorm, ElasticSequential)


def _perturb(model: nn.Module) -> None:
    """Non-trivial norms and biases (the initialisation leaves them at 1 and 0, which hides slicing mistakes)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.Linear)) and m.bias is not None:
                m.bias.add_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.LayerNorm):
                m.weight.mul_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = adaptnn.create_model("elastic_vit_tiny_conv_fmnist")
    _perturb(m)
    return m.eval()


def test_every_member_equals_its_materialised_vit(model) -> None:
    x = torch.randn(6, 1, 28, 28)
    outputs, costs = {}, {}
    for v in model.variants:
        with torch.no_grad(), model.use_variant(v):
            expected = model.forward_all(x)
            plain = model.materialise()
            got = plain.forward_all(x)
            if v in (model.smallest, model.largest, Variant(0.5, 1), Variant(0.5, 2)):
                costs[v] = model.exit_costs(x)[-1].item()
            if v in (model.smallest, model.largest):  # the plain ViT has exactly the member's MACs
                assert torch.allclose(plain.exit_costs(x), model.exit_costs(x))
        assert type(plain) is StagedModel and not any(isinstance(m, ELASTIC) for m in plain.modules())
        for a, b in zip(expected, got, strict=True):
            assert (a - b).abs().max().item() <= 1e-6
        blocks = token_blocks(plain)
        heads = max(1, int(4 * v.width + 0.5))
        assert len(blocks) == 3 * v.depth  # 3 segments of 2 blocks, the first `depth` of each kept
        assert all(b.block.attn.num_heads == heads and b.block.attn.qkv.out_features == 3 * heads * 16 for b in blocks)
        assert all(
            b.block.mlp[0].out_features == heads * 64 and b.block.attn.proj.in_features == heads * 16 for b in blocks
        )
        outputs[v] = expected[-1]
    assert model.variant == model.largest
    small, large = model.smallest, model.largest
    assert not torch.allclose(outputs[small], outputs[large])
    assert costs[small] < costs[large] / 4  # a quarter of the heads and MLP, half the blocks
    assert costs[Variant(0.5, 1)] < costs[Variant(0.5, 2)] < costs[Variant(1.0, 2)]


def test_the_full_member_is_the_plain_vit_and_slices_are_prefixes() -> None:
    torch.manual_seed(1)
    base = vit_staged(in_chans=1, input_size=(16, 16), embed_dim=32, depth=4, num_heads=4, exits=(1,), qk_norm=True)
    _perturb(base)
    base.eval()
    elastic = elasticize_vit(base, width_mults=[0.5, 1.0], depths=[1, None]).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        for a, b in zip(base.forward_all(x), elastic.forward_all(x), strict=True):
            assert torch.equal(a, b)
        assert sum(isinstance(m, ElasticSequential) for m in elastic.modules()) == 2
        # half the heads: the member is the plain block with heads 2, 3 of q, k and v and their proj columns removed
        elastic.set_variant(width=0.5, depth=None)
        attn = token_blocks(elastic)[0].block.attn
        assert attn.num_heads == 2
        w = base.segments[0][1].block.attn.qkv.weight.view(3, 4, 8, 32)
        torch.testing.assert_close(attn.qkv.sliced(32)[0], w[:, :2].reshape(48, 32), rtol=0, atol=0)
        plain = elastic.materialise()
        for a, b in zip(elastic.forward_all(x), plain.forward_all(x), strict=True):
            assert (a - b).abs().max().item() <= 1e-6
    assert elastic.variant == Variant(0.5, None)
    assert base.segments[0][1].block.attn.num_heads == 4  # the source model is untouched


def test_token_reduction_runs_on_members_and_their_materialised_vits(model) -> None:
    x = torch.randn(4, 1, 28, 28)
    set_token_knob(model, TokenKnob("tome", 4))
    try:
        with torch.no_grad(), model.use_variant(width=0.5, depth=2):
            expected, plain = model.forward_all(x), model.materialise()
            got = plain.forward_all(x)
        assert all(b.action == ("tome", 4) for b in token_blocks(plain))
        for a, b in zip(expected, got, strict=True):
            assert (a - b).abs().max().item() <= 1e-6
    finally:
        set_token_knob(model, None)


def test_checkpoint_refuses_members_it_was_not_trained_for(tmp_path) -> None:
    torch.manual_seed(0)
    model = adaptnn.create_model("elastic_vit_tiny_conv_fmnist", width_mults=[0.5, 1.0], depths=[1, 2]).eval()
    loaded = load_model(save_checkpoint(tmp_path / "m.safetensors", model, {"model_spec": model.model_spec})).eval()
    assert loaded.variants == model.variants
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad(), loaded.use_variant(0.5, 1), model.use_variant(0.5, 1):
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ConfigError, match=r"variant w0\.25 is not one .* valid variants: w0\.5_d1"):
        loaded.set_variant(width=0.25)
    spec = {"name": "elastic_vit_tiny_conv_fmnist", "kwargs": {"width_mults": [0.75, 1.0], "depths": [1, 2]}}
    bad = save_checkpoint(tmp_path / "bad.safetensors", model, {"model_spec": spec})
    with pytest.raises(CheckpointError, match=r"trained for variants w0\.5_d1, .*the model lists w0\.75_d1") as err:
        load_model(bad)
    assert "\n" not in str(err.value)


def test_factory_and_conversion_refuse_what_they_cannot_build() -> None:
    with pytest.raises(ConfigError, match="include 1.0"):
        adaptnn.create_model("elastic_vit_tiny_conv_fmnist", width_mults=[0.5])
    with pytest.raises(ConfigError, match="repeated"):  # x0.25 and x0.251 keep 1 of 4 heads and 64 of 256 units
        adaptnn.create_model("elastic_vit_tiny_conv_fmnist", width_mults=[0.25, 0.251, 1.0])
    with pytest.raises(ConfigError, match="depths"):
        adaptnn.create_model("elastic_vit_tiny_conv_fmnist", depths=[3])
    with pytest.raises(UnsupportedModelError, match="no token blocks"):
        elasticize_vit(adaptnn.create_model("mecnn_digits"), width_mults=[0.5, 1.0])
    base = vit_staged(in_chans=1, input_size=(8, 8), embed_dim=16, depth=2, num_heads=2, exits=())
    token_blocks(base)[0].block.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.Linear(16, 16))
    with pytest.raises(UnsupportedModelError, match="3 linear layers"):
        elasticize_vit(base, width_mults=[0.5, 1.0])


def test_elasticize_a_timm_vit_through_the_token_adapter() -> None:
    import timm  # a dev dependency (CI installs it): a missing timm must fail, not skip

    from adaptnn.adapters.vit_tokens import token_vit

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=5)
    base = token_vit(net, exits=[1]).eval()
    _perturb(base)
    elastic = elasticize_vit(base, width_mults=[1 / 3, 1.0], depths=[1, None]).eval()  # 3 heads: 1 or 3 kept
    assert all(isinstance(b.block.attn.qkv, ElasticQKV) for b in token_blocks(elastic))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(base.forward_all(x), elastic.forward_all(x), strict=True):
            assert torch.equal(a, b)
        elastic.set_variant(width=1 / 3, depth=1)
        small, plain = elastic.forward_all(x), elastic.materialise()
        for a, b in zip(small, plain.forward_all(x), strict=True):
            assert (a - b).abs().max().item() <= 1e-6
        blk = token_blocks(plain)[0].block
        assert blk.attn.num_heads == 1 and blk.attn.attn_dim == 64 and blk.mlp.fc1.out_features == 256


def test_sorted_trains_the_elastic_vit_through_the_trainer(tmp_path) -> None:
    torch.manual_seed(0)
    model = adaptnn.create_model("elastic_vit_tiny_conv_fmnist", input_size=(8, 8), embed_dim=32, depth=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    data = torch.utils.data.TensorDataset(x, (x.mean(dim=(1, 2, 3)) > 0).long())
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.01, device="cpu", progress=False, strategy="sorted")
    cfg.warmup_epochs = 0.0
    cfg.strategy_options = {"num_random": 1}
    qkv = token_blocks(model)[-1].block.attn.qkv.weight
    before = qkv.detach().clone()
    history = Trainer(model, data, cfg, tmp_path, val_set=data).fit()
    assert len(history) == 1 and "loss_smallest" in history[-1] and len(history[-1]["val_exit_accuracy"]) == 2
    changed = (qkv.detach() - before).abs().view(3, 4, 8, 32).amax(dim=(0, 2, 3)) > 0
    assert changed.all()  # every head trained: the last block's heads 1-3 only by the wider, deeper members
    assert model.variant == model.largest


def test_shipped_elastic_vit_recipe_is_a_valid_sorted_run_config() -> None:
    from pathlib import Path

    from adaptnn.runs.config import load_config

    config = load_config(Path(adaptnn.__file__).parent / "configs" / "elastic_vit_fmnist.yaml")
    assert (config.model.name, config.train.strategy) == ("elastic_vit_tiny_conv_fmnist", "sorted")
    model = adaptnn.create_model(config.model.name, **config.model.kwargs)
    assert len(model.variants) == 8 and model.num_exits == 3


def test_menu_measures_every_elastic_vit_member() -> None:
    from adaptnn.cli.menu import build_menu

    torch.manual_seed(0)
    model = adaptnn.create_model("elastic_vit_tiny_conv_fmnist", width_mults=[0.5, 1.0], depths=[1, 2])
    x = torch.randn(8, 1, 28, 28)
    data = torch.utils.data.TensorDataset(x, torch.arange(8) % 10)
    rows, logits = build_menu(model, data, [2], rounds=1, warmup_s=0.0, timing_batches=1)
    assert [r["variant"] for r in rows] == [v.name for v in model.variants]
    assert rows[0]["macs"] < rows[-1]["macs"] and rows[0]["params"] < rows[-1]["params"]
    assert all(r["ms_b2"] > 0 for r in rows) and set(logits.options) == {v.name for v in model.variants}
