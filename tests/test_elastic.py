"""Elastic (nested) models: variants, materialisation, per-variant batch-norm statistics, checkpoint refusal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adaptnn
from adaptnn.errors import CheckpointError, ConfigError, UnsupportedModelError
from adaptnn.io import save_checkpoint
from adaptnn.layers.elastic import (
    ElasticBatchNorm2d,
    ElasticBatchNormAct2d,
    ElasticConv2d,
    ElasticLayerNorm,
    ElasticLinear,
    ElasticSequential,
    ElasticStagedModel,
    Variant,
    elasticize,
    materialise,
    recalibrate_bn,
)
from adaptnn.models import load_model
from adaptnn.runtime import StagedModel


def _trained_stats(model: ElasticStagedModel, x: torch.Tensor) -> None:
    """A few train-mode passes per member so every statistics row differs from its initial value."""
    model.train()
    with torch.no_grad():
        for v in model.variants:
            with model.use_variant(v):
                model.forward_all(x + 0.1 * torch.randn_like(x))
    model.eval()


@pytest.fixture
def model() -> ElasticStagedModel:
    torch.manual_seed(0)
    m = adaptnn.create_model("elastic_cnn_digits")
    _trained_stats(m, torch.randn(12, 1, 8, 8))
    return m


def test_every_variant_equals_its_materialised_network(model: ElasticStagedModel) -> None:
    x = torch.randn(7, 1, 8, 8)
    sizes = []
    for v in model.variants:
        model.set_variant(v)
        expected = model.forward_all(x)
        plain = model.materialise()
        assert type(plain) is StagedModel
        assert not any(isinstance(m, (ElasticConv2d, ElasticBatchNorm2d, ElasticLinear)) for m in plain.modules())
        got = plain.forward_all(x)
        for a, b in zip(expected, got, strict=True):
            assert (a - b).abs().max().item() <= 1e-6
        sizes.append(sum(p.numel() for p in plain.parameters()))
        if v in (model.smallest, model.largest):  # the materialised member has exactly the variant's MACs
            assert torch.allclose(plain.exit_costs(x), model.exit_costs(x))
    assert sizes[0] < sizes[-1]
    assert model.variant == model.variants[-1]  # materialise() leaves the active member alone


@pytest.mark.parametrize("variant", [Variant(0.25, 1), Variant(0.5, 2), Variant(1.0, 2)])
def test_a_members_training_step_is_its_materialised_networks(model: ElasticStagedModel, variant: Variant) -> None:
    """Gradients: the materialised member's in the kept prefix, zero outside; statistics: only its row moves."""
    model.train().set_variant(variant)
    row = model.variants.index(variant)
    plain = model.materialise()
    stats = {k: v.clone() for k, v in model.named_buffers() if k.endswith(("running_mean", "running_var"))}
    x, y = torch.randn(9, 1, 8, 8), torch.randint(0, 10, (9,))
    for m in (model, plain):
        m.zero_grad(set_to_none=True)
        sum(nn.functional.cross_entropy(lg, y) for lg in m.forward_all(x)).backward()
    elastic_params = dict(model.named_parameters())
    for name, p in plain.named_parameters():
        grad = elastic_params[name].grad
        prefix = tuple(slice(0, n) for n in p.shape)
        torch.testing.assert_close(grad[prefix], p.grad, rtol=1e-5, atol=1e-6)
        rest = grad.clone()
        rest[prefix] = 0
        assert not rest.any(), name  # channels the member does not use get no gradient
    plain_buffers = dict(plain.named_buffers())
    for name, before in stats.items():
        now = dict(model.named_buffers())[name]
        c = plain_buffers[name].numel() if name in plain_buffers else 0
        torch.testing.assert_close(now[row, :c], plain_buffers[name] if c else now[row, :0])
        assert torch.equal(now[row, c:], before[row, c:]) and torch.equal(now[:row], before[:row])
        assert torch.equal(now[row + 1 :], before[row + 1 :])
    model.set_variant(model.largest)


def test_members_differ_and_cost_follows_the_variant(model: ElasticStagedModel) -> None:
    x = torch.randn(3, 1, 8, 8)
    small, large = model.smallest, model.largest
    with model.use_variant(small):
        small_out, small_cost = model(x), model.exit_costs(x)[-1].item()
    large_out, large_cost = model(x), model.exit_costs(x)[-1].item()
    assert model.variant == large  # restored by the context manager
    assert not torch.allclose(small_out, large_out)
    assert small_cost < large_cost / 8  # width x0.25 (1/16 of the conv MACs) and one block of two


def test_unknown_variant_is_refused_in_one_line(model: ElasticStagedModel) -> None:
    with pytest.raises(ConfigError, match=r"variant w0\.3 is not one .* valid variants: w0\.25_d1") as err:
        model.set_variant(width=0.3)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="w0.5_d3"):
        model.set_variant(width=0.5, depth=3)
    assert model.set_variant(width=0.5) == Variant(0.5, 2)  # depth=None: the deepest listed depth of that width


def test_recalibrate_bn_changes_only_that_variants_statistics(model: ElasticStagedModel) -> None:
    params = {k: v.clone() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    target = Variant(0.5, 1)
    row = model.variants.index(target)
    x = torch.randn(32, 1, 8, 8) * 2 + 1
    used = recalibrate_bn(model, target, [(x, torch.zeros(32))])
    assert used == 1
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k  # bit-identical
    changed_rows = set()
    for k, v in model.named_buffers():
        if k.endswith(("running_mean", "running_var")):
            for r in range(v.shape[0]):
                if not torch.equal(v[r], buffers[k][r]):
                    changed_rows.add(r)
        else:
            assert torch.equal(v, buffers[k]), k
    assert changed_rows == {row}
    assert model.variant == model.largest and not model.training
    # one batch: the first layer's statistics are exactly that batch's per-channel mean of the conv output
    conv, bn = model.segments[0][0][0], model.segments[0][0][1]
    with torch.no_grad(), model.use_variant(target):
        mean = conv(x).mean(dim=(0, 2, 3))
    assert torch.allclose(bn.running_mean[row, : mean.numel()], mean, atol=1e-5)


def test_checkpoint_refuses_weights_trained_for_other_variants(tmp_path) -> None:
    model = adaptnn.create_model("elastic_cnn_digits", width_mults=[0.5, 1.0])
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"model_spec": model.model_spec})
    loaded = load_model(path).eval()
    assert loaded.variants == model.variants
    x = torch.randn(2, 1, 8, 8)
    with loaded.use_variant(0.5), model.use_variant(0.5):
        assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(ConfigError, match="w0.25"):
        loaded.set_variant(width=0.25)
    # a header listing other members than the weights were trained for (same count, so the shapes fit)
    spec = {"name": "elastic_cnn_digits", "kwargs": {"width_mults": [0.25, 1.0]}}
    bad = save_checkpoint(tmp_path / "bad.safetensors", model, {"model_spec": spec})
    with pytest.raises(CheckpointError, match=r"trained for variants w0\.5_d1, .*the model lists w0\.25_d1") as err:
        load_model(bad)
    assert "\n" not in str(err.value)
    # a header listing more members: the statistics banks do not fit
    spec = {"name": "elastic_cnn_digits", "kwargs": {"width_mults": [0.25, 0.5, 1.0]}}
    with pytest.raises(CheckpointError):
        load_model(save_checkpoint(tmp_path / "more.safetensors", model, {"model_spec": spec}))


def test_factory_validates_the_family() -> None:
    with pytest.raises(ConfigError, match="include 1.0"):
        adaptnn.create_model("elastic_cnn_digits", width_mults=[0.25, 0.5])
    with pytest.raises(ConfigError, match="depths"):
        adaptnn.create_model("elastic_cnn_digits", depths=[3])


def test_generic_elastic_layers_materialise_outside_a_staged_model() -> None:
    torch.manual_seed(1)
    body = ElasticSequential(
        ElasticConv2d(3, 8, 3, padding=1),
        ElasticConv2d(8, 8, 3, padding=1, groups=8),  # depthwise follows its input
        nn.Flatten(2),
        ElasticLayerNorm(16),
    )
    for m in body.modules():
        if isinstance(m, ElasticConv2d):
            m.width = 0.5
    body.depth = 4
    x = torch.randn(2, 3, 4, 4)
    out = body(x)
    assert out.shape == (2, 4, 16)
    plain = materialise(body, x)
    assert isinstance(plain, nn.Sequential) and plain[1].groups == 4
    assert (plain(x) - out).abs().max().item() <= 1e-6
    body.depth = 1
    assert torch.equal(materialise(body, x)(x), body(x))


def test_elasticize_a_torchvision_resnet_through_the_adapter():
    from tests.helpers import randomise_stats

    torch.manual_seed(0)
    base = randomise_stats(adaptnn.from_torchvision("resnet18", num_classes=10, input_size=(3, 32, 32))).eval()
    elastic = elasticize(base, width_mults=[0.5, 1.0], depths=[1, None]).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(base.forward_all(x), elastic.forward_all(x), strict=True):
            assert torch.equal(a, b)  # the full member is the source network
        assert sum(isinstance(m, ElasticSequential) for m in elastic.modules()) == 4  # layer1..layer4
        params = {k: v.clone() for k, v in elastic.named_parameters()}
        elastic.set_variant(width=0.5, depth=1)
        recalibrate_bn(elastic, elastic.variant, [torch.randn(8, 3, 32, 32)])
        assert all(torch.equal(v, params[k]) for k, v in elastic.named_parameters())
        small = elastic.forward_all(x)
        plain = elastic.materialise()
        for a, b in zip(small, plain.forward_all(x), strict=True):
            assert (a - b).abs().max().item() <= 1e-6
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in base.parameters()) / 4
    assert all(len(layer) == 1 for layer in plain.segments[1:])  # depth 1: one block per stage


def test_elasticize_a_timm_preact_resnet_with_batchnorm_act():
    """timm's BatchNormAct2d (a BatchNorm2d subclass with its own forward) becomes per-variant-statistics BN + act."""
    import timm  # a dev dependency (CI installs it): a missing timm must fail, not skip
    from tests.helpers import randomise_stats
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    net = timm.create_model("resnetv2_18", channels=(16, 32, 64, 128), stem_chs=16, num_classes=10)
    base = randomise_stats(adaptnn.from_timm(net, input_size=(3, 32, 32))).eval()
    elastic = elasticize(base, width_mults=[0.5, 1.0], depths=[1, None]).eval()
    bn_acts = [m for m in elastic.modules() if isinstance(m, ElasticBatchNormAct2d)]
    assert len(bn_acts) == sum(type(m) is BatchNormAct2d for m in base.modules()) > 0
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(base.forward_all(x), elastic.forward_all(x), strict=True):
            assert torch.equal(a, b)  # the full member is the source network
        elastic.set_variant(width=0.5, depth=1)
        row = elastic.variants.index(elastic.variant)
        before = [m.running_mean.clone() for m in bn_acts]
        recalibrate_bn(elastic, elastic.variant, [torch.randn(8, 3, 32, 32)])
        changed = [(m.running_mean != b).any(dim=1) for m, b in zip(bn_acts, before, strict=True)]
        assert all(c[row] and not c[1 - row] for c in changed)  # only this member's statistics row
        small = elastic.forward_all(x)
        plain = elastic.materialise()
        for a, b in zip(small, plain.forward_all(x), strict=True):
            assert (a - b).abs().max().item() <= 1e-6
    assert not any(isinstance(m, ElasticBatchNormAct2d) for m in plain.modules())
    assert sum(type(m) is BatchNormAct2d for m in plain.modules()) > 0  # plain timm layers, same forward
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in base.parameters()) / 4


def test_elasticize_refuses_layers_with_a_forward_of_their_own():
    class BNAct(nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    base = StagedModel([nn.Sequential(nn.Conv2d(1, 4, 3), BNAct(4))], [nn.Sequential(nn.Flatten(), nn.LazyLinear(2))])
    with pytest.raises(UnsupportedModelError, match="BNAct"):
        elasticize(base, width_mults=[0.5, 1.0])
