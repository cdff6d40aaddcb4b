"""timm adapter: lossless wrapping (last exit == original logits), exits, dynamic == simulated, checkpoints."""

import types

import pytest
import timm
import torch

from adaptnn import ConfidencePolicy, ConfigError, create_model
from adaptnn.adapters import from_timm  # noqa: E402
from adaptnn.io import save_checkpoint
from adaptnn.layers.heads import PoolLinearHead, TokenHead
from adaptnn.models import load_model
from adaptnn.policies import simulate_exits

# small variants (random weights, nothing downloaded), one per family the issue names
FAMILIES = [
    ("test_resnet", {}, (3, 64, 64)),
    ("test_convnext", {}, (3, 64, 64)),
    ("test_efficientnet", {}, (3, 64, 64)),
    ("mobilenetv3_small_050", {}, (3, 64, 64)),
    ("test_vit", {}, None),
    ("deit_tiny_distilled_patch16_224", {"img_size": 32, "depth": 4}, None),
]


def _randomise_norms(model):
    """Non-trivial BN/LN statistics, so that eval-mode normalisation is really exercised."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        for name in ("running_mean", "running_var", "weight", "bias"):
            t = getattr(m, name, None)
            if (
                isinstance(t, torch.Tensor)
                and t.dim() == 1
                and isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm))
            ):
                with torch.no_grad():
                    t.copy_(
                        torch.rand(t.shape, generator=gen) + 0.5
                        if name in ("running_var", "weight")
                        else torch.randn(t.shape, generator=gen) * 0.1
                    )


@pytest.mark.parametrize("name, kwargs, input_size", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_last_exit_is_the_original_model(name, kwargs, input_size):
    original = timm.create_model(name, num_classes=7, **kwargs)
    _randomise_norms(original)
    original.eval()
    staged = from_timm(original, input_size=input_size).eval()
    assert staged.num_exits == 4
    x = torch.randn(3, *staged.input_spec.shape)
    with torch.no_grad():
        ref = original(x)
        outs = staged.forward_all(x)
        full = staged(x)
    assert [o.shape for o in outs] == [(3, 7)] * 4
    assert torch.equal(outs[-1], ref)  # bit-exact: same modules, same weights, same order of operations
    assert torch.equal(full, ref)
    # wrapping shares the weights: changing the original changes the staged model
    assert staged.heads[-1].shell is not original


def test_cnn_exits_follow_feature_info_and_use_pool_linear_heads():
    original = timm.create_model("test_resnet", num_classes=5)
    staged = from_timm(original, input_size=(3, 64, 64))
    chs = [f["num_chs"] for f in original.feature_info if f["reduction"] >= 4]
    assert [h.fc.in_features for h in staged.heads[:-1]] == chs[:-1]
    assert all(isinstance(h, PoolLinearHead) for h in staged.heads[:-1])
    two = from_timm(timm.create_model("test_resnet", num_classes=5), exits=[1], input_size=(3, 64, 64))
    assert two.num_exits == 2 and two.heads[0].fc.in_features == chs[1]
    with pytest.raises(ConfigError, match="out of range"):
        from_timm(timm.create_model("test_resnet", num_classes=5), exits=[7], input_size=(3, 64, 64))
    with pytest.raises(ConfigError, match="vision transformers"):
        from_timm(timm.create_model("test_resnet", num_classes=5), exits=2, input_size=(3, 64, 64))


def test_vit_exits_every_n_blocks_and_token_heads():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=6, num_classes=4)
    every2 = from_timm(vit, exits=2)
    assert every2.num_exits == 3  # after blocks 1, 3 and the last (5)
    assert all(isinstance(h, TokenHead) and h.pool == "cls" for h in every2.heads[:-1])
    listed = from_timm(vit, exits=[0, 5])  # 5 is the last block: it is the final exit anyway
    assert listed.num_exits == 2
    avg = from_timm(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=4, global_pool="avg", num_classes=4))
    assert avg.heads[0].pool == "mean"


def test_unsupported_forward_is_refused_not_wrapped_wrongly():
    model = timm.create_model("test_resnet", num_classes=5)

    def doubled(self, x):  # forward_features now does more than chain the children
        return type(self).forward_features(self, x) * 2

    model.forward_features = types.MethodType(doubled, model)
    with pytest.raises(ConfigError, match="not supported"):
        from_timm(model, input_size=(3, 64, 64))
    with pytest.raises(ConfigError, match="no model"):
        from_timm("no_such_model_xyz")


def _thresholds_between(logits, quantile):
    conf = [lg.softmax(-1).amax(-1) for lg in logits[:-1]]
    return [float(c.quantile(quantile)) + 1e-6 for c in conf]


@pytest.mark.parametrize("name, kwargs, input_size", [FAMILIES[0], FAMILIES[4]], ids=["cnn", "vit"])
def test_run_dynamic_matches_simulate_exits(name, kwargs, input_size):
    original = timm.create_model(name, num_classes=6, **kwargs)
    staged = from_timm(original, input_size=input_size).eval()
    x = torch.randn(24, *staged.input_spec.shape)
    with torch.no_grad():
        logits = torch.stack(staged.forward_all(x))
    policy = ConfidencePolicy(_thresholds_between(logits, 0.6))
    exit_sim, pred_sim = simulate_exits(policy, logits)
    out = staged.run_dynamic(x, policy)
    assert torch.equal(out.exit_index, exit_sim)
    assert len(set(exit_sim.tolist())) > 1  # the thresholds really make samples leave early
    torch.testing.assert_close(out.logits, pred_sim, rtol=1e-4, atol=1e-5)


def test_registered_factory_round_trips_through_a_checkpoint(tmp_path):
    model = create_model("timm_staged", arch="test_vit", num_classes=3, exits=1).eval()
    assert model.model_spec["kwargs"]["arch"] == "test_vit"
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"model_spec": model.model_spec})
    loaded = load_model(path).eval()
    x = torch.randn(2, *model.input_spec.shape)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.forward_all(x), loaded.forward_all(x), strict=True))
