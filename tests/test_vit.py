"""The conv-stem ViT family, exits composed with token reduction, and the joint knob + thresholds calibration."""

from __future__ import annotations

import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import adaptnn
from adaptnn.adapters.vit_tokens import token_vit
from adaptnn.calibration import calibrate_knob_and_exits, calibrate_to_budget
from adaptnn.errors import BudgetError
from adaptnn.layers.tokens import TokenKnob, TokenState, set_token_knob, token_blocks
from adaptnn.policies import ConfidencePolicy, simulate_exits
from adaptnn.runtime.cost import exit_macs
from helpers import assert_realised_equals_simulated

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two on a loaded box


KNOBS = [TokenKnob(), TokenKnob("tome", 3), TokenKnob("tome", 4, "decreasing"), TokenKnob("evit", 0.5)]


def _small_vit() -> adaptnn.StagedModel:
    torch.manual_seed(0)
    return adaptnn.create_model("vit_tiny_conv_fmnist", embed_dim=32, depth=4, exits=[0, 1, 2]).eval()


def test_family_is_registered_and_staged() -> None:
    assert {"vit_tiny_conv_fmnist", "vit_tiny_conv_cifar"} <= set(adaptnn.list_models("vit_*"))
    model = _small_vit()
    assert model.num_exits == 4 and len(token_blocks(model)) == 4
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        logits = model.forward_all(x)
        assert torch.equal(logits[-1], model(x))
    macs = exit_macs(model, (1, 28, 28))
    assert all(b > a for a, b in zip(macs, macs[1:], strict=False))


def test_token_knob_lowers_macs_and_tokens() -> None:
    model = _small_vit()
    base = exit_macs(model, (1, 28, 28))
    for knob in KNOBS[1:]:
        set_token_knob(model, knob)
        reduced = exit_macs(model, (1, 28, 28))
        assert reduced[-1] < base[-1] and reduced[0] <= base[0]
        with torch.no_grad():
            state = torch.randn(2, 1, 28, 28)
            for segment in model.segments:
                state = segment(state)
        assert isinstance(state, TokenState) and state.tokens.shape[1] < 50
    set_token_knob(model, None)
    assert exit_macs(model, (1, 28, 28)) == base


@pytest.mark.parametrize("knob", KNOBS, ids=lambda k: k.label())
def test_realised_equals_simulated_with_tokens(knob: TokenKnob) -> None:
    """run_dynamic (compaction between reduced segments) decides exactly what forward_all's logits replay."""
    model = set_token_knob(_small_vit(), knob)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 1, 28, 28, generator=gen)
    with torch.no_grad():
        cached = model.forward_all(x)
    conf = torch.stack([c.softmax(-1).amax(-1) for c in cached])  # [K, N]
    for _ in range(3):
        qs = torch.rand(3, generator=gen)
        thresholds = [float(torch.quantile(conf[k], qs[k])) for k in range(3)]
        policy = ConfidencePolicy(thresholds)
        assert_realised_equals_simulated(model, x, policy, cached, (1,), rows=4)
        assert_realised_equals_simulated(model, x, policy, cached, (7, 24))


def test_timm_staged_vit_with_exits_and_tokens_matches_simulation() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5, reg_tokens=2)
    model = set_token_knob(token_vit(vit.eval(), exits=[0, 1]), TokenKnob("tome", 6)).eval()
    x = torch.randn(10, 3, 32, 32)
    with torch.no_grad():
        cached = model.forward_all(x)
    policy = ConfidencePolicy([float(c.softmax(-1).amax(-1).median()) for c in cached[:-1]])
    sim_exit, sim_pred = simulate_exits(policy, cached)
    out = model.run_dynamic(x, policy)
    assert torch.equal(out.exit_index, sim_exit) and torch.allclose(out.logits, sim_pred, atol=1e-5)
    assert out.macs.max() < exit_macs(set_token_knob(token_vit(vit, exits=[0, 1]), None), (3, 32, 32))[-1]


def test_training_with_tokens_backpropagates() -> None:
    model = set_token_knob(_small_vit().train(), TokenKnob("tome", 4))
    logits = model.forward_all(torch.randn(4, 1, 28, 28))
    sum(lg.sum() for lg in logits).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _synthetic_logits(n: int, k: int, acc: list[float], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, 4, (n,), generator=gen)
    logits = torch.randn(k, n, 4, generator=gen)
    for e in range(k):
        right = torch.rand(n, generator=gen) < acc[e]
        logits[e, right, labels[right]] += 3.0
    return logits, labels


def test_joint_calibration_is_at_least_as_good_as_either_alone() -> None:
    gen = torch.Generator().manual_seed(0)
    base, labels = _synthetic_logits(2000, 3, [0.6, 0.8, 0.9], gen)
    reduced = base.clone()
    reduced[-1] -= 0.3 * torch.randn(2000, 4, generator=gen)  # a slightly worse last exit, much cheaper
    options = {"none": (base, [30.0, 60.0, 100.0]), "tome_r4": (reduced, [25.0, 45.0, 65.0])}
    policy = ConfidencePolicy([math.inf, math.inf])
    for budget in (50.0, 70.0, 100.0):
        joint = calibrate_knob_and_exits(policy, options, labels, budget)
        alone = [calibrate_to_budget(policy, lg, labels, c, budget).val["accuracy"] for lg, c in options.values()]
        assert joint.val["accuracy"] >= max(alone) - 1e-12
        assert joint.val["avg_cost"] <= budget * (1 + 1e-9)
        assert joint.details["knob"] in options
    # a budget only the reduced model meets: it must be chosen, with every sample able to go to its last exit
    joint = calibrate_knob_and_exits(policy, options, labels, 26.0)
    assert joint.details["knob"] == "tome_r4"
    with pytest.raises(BudgetError):
        calibrate_knob_and_exits(policy, options, labels, 10.0)


def test_no_reduction_can_be_chosen() -> None:
    """When reduction saves nothing (same cost), the unreduced knob listed first wins the tie."""
    gen = torch.Generator().manual_seed(2)
    base, labels = _synthetic_logits(500, 2, [0.7, 0.9], gen)
    options = {"none": (base, [10.0, 20.0]), "tome_r8": (base.clone(), [10.0, 20.0])}
    joint = calibrate_knob_and_exits(ConfidencePolicy([math.inf]), options, labels, 20.0)
    assert joint.details["knob"] == "none"


def test_shipped_vit_recipe_is_a_valid_run_config() -> None:
    from pathlib import Path

    from adaptnn.runs.config import load_config

    path = Path(adaptnn.__file__).parent / "configs" / "vit_fmnist.yaml"
    config = load_config(path)
    assert config.model.name == "vit_tiny_conv_fmnist" and config.data.name == "fashion_mnist"


def test_other_input_sizes_interpolate_the_patch_positions() -> None:
    """Smaller/larger inputs (curriculum stages) work; the native size computes exactly what it did before."""
    from adaptnn.models.vit import resize_pos_embed
    from adaptnn.training.curriculum import spatially_relaxed

    model = _small_vit()
    embed = model.segments[0][0]
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        before = model.forward_all(x)
        # the pre-change computation at the native size: stem + class token + learned positions, unresized
        feat = embed.stem(x).flatten(2).transpose(1, 2)
        plain = torch.cat([embed.cls_token.expand(2, -1, -1), feat], dim=1) + embed.pos_embed
        assert (embed(x).tokens - plain).abs().max().item() == 0.0
        with spatially_relaxed(model):
            small = model.forward_all(torch.randn(2, 1, 16, 16))
            large = model.forward_all(torch.randn(2, 1, 36, 36))
            again = model.forward_all(x)
    assert all(lg.shape == (2, 10) and torch.isfinite(lg).all() for lg in small + large)
    assert all((a - b).abs().max().item() == 0.0 for a, b in zip(before, again, strict=True))
    assert embed(torch.randn(1, 1, 16, 16)).tokens.shape[1] == 1 + 4 * 4
    pos = embed.pos_embed
    resized = resize_pos_embed(pos, (7, 7), (4, 4), prefix=1)
    assert resized.shape == (1, 17, pos.shape[-1]) and torch.equal(resized[:, :1], pos[:, :1])  # class token untouched
    assert torch.allclose(resize_pos_embed(pos, (7, 7), (7, 7), prefix=1), pos, atol=1e-6)
    with pytest.raises(adaptnn.errors.InputError):  # outside training the fixed input size is still checked
        model(torch.randn(1, 1, 16, 16))


def test_dvt_cascade_exits_reuse_and_realised_equals_simulated() -> None:
    torch.manual_seed(0)
    model = adaptnn.create_model("dvt_vit_tiny_conv_fmnist", embed_dim=32, depth=2).eval()
    assert "dvt_vit_tiny_conv_fmnist" in adaptnn.list_models("dvt_*") and model.num_exits == 2
    macs = exit_macs(model, (1, 28, 28))
    assert macs[0] < 0.5 * (macs[1] - macs[0])  # the coarse stage (16 tokens) is far cheaper than the fine (49)
    x = torch.randn(12, 1, 28, 28)
    fine = model.segments[1]
    with torch.no_grad():
        cascade = model.segments[0](x)
        assert cascade.coarse.tokens.shape == (12, 1 + 16, 32)
        plain = model.heads[1](fine(cascade))
        other = cascade._replace(coarse=cascade.coarse._replace(tokens=torch.randn_like(cascade.coarse.tokens)))
        assert torch.equal(model.heads[1](fine(other)), plain)  # zero-initialised reuse: the plain fine ViT
        torch.nn.init.normal_(fine.reuse[1].weight, std=0.1)
        assert not torch.allclose(model.heads[1](fine(other)), model.heads[1](fine(cascade)))  # features reused
        cached = model.forward_all(x)
    for knob in (TokenKnob(), TokenKnob("tome", 3)):
        set_token_knob(model, knob)
        with torch.no_grad():
            cached = model.forward_all(x)
        policy = ConfidencePolicy([float(cached[0].softmax(-1).amax(-1).median())])
        sim_exit = assert_realised_equals_simulated(model, x, policy, cached, (1, 5, 12))
        assert 0 < int((sim_exit == 0).sum()) < 12


def test_dvt_round_trips_through_a_checkpoint(tmp_path) -> None:
    from adaptnn.io import save_checkpoint
    from adaptnn.models import load_model

    torch.manual_seed(0)
    model = adaptnn.create_model("dvt_vit_tiny_conv_fmnist", embed_dim=32, depth=1).eval()
    torch.nn.init.normal_(model.segments[1].reuse[1].weight, std=0.1)
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"model_spec": model.model_spec})
    loaded = load_model(path).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.forward_all(x), loaded.forward_all(x), strict=True))
