"""DynamicViT: masked training equals the unreduced model when all is kept, the ratio loss drives the keep
fractions, inference keeps exactly the configured counts (special tokens always), exits decide as simulated."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

import adaptnn
from adaptnn.errors import ConfigError
from adaptnn.layers.tokens import TokenState, attach_keep_predictors, keep_mask_bias, token_blocks
from adaptnn.models import load_model
from adaptnn.policies import ConfidencePolicy
from adaptnn.strategies import StepContext, get
from adaptnn.strategies.dynamicvit import DynamicViT, ratio_loss, staged_forward
from adaptnn.training import TrainConfig, Trainer
from helpers import assert_realised_equals_simulated

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two on a loaded box


def _vit(depth: int = 4, exits: tuple[int, ...] = (0, 1, 2)) -> adaptnn.StagedModel:
    torch.manual_seed(0)
    return adaptnn.create_model("vit_tiny_conv_fmnist", embed_dim=32, depth=depth, exits=list(exits))


def _keep_all(blocks) -> None:
    """Predictors that keep every token (their keep log-probability ~0, drop ~-inf): Gumbel always says keep."""
    for blk in blocks:
        last = blk.predictor.out[-1]
        torch.nn.init.zeros_(last.weight)
        last.bias.data = torch.tensor([50.0, -50.0])


def test_keep_mask_bias_is_zero_for_kept_keys_and_hides_dropped_ones() -> None:
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    bias = keep_mask_bias(mask, torch.float32)
    assert bias.shape == (1, 1, 4, 4)
    assert torch.equal(bias[0, 0, :, [0, 1, 3]], torch.zeros(4, 3))
    assert bias[0, 0, 2, 2] == 0 and (bias[0, 0, [0, 1, 3], 2] < -13).all()  # a dropped key sees only itself
    assert torch.equal(keep_mask_bias(torch.ones(2, 5), torch.float32), torch.zeros(2, 1, 5, 5))


def test_masked_training_forward_with_keep_all_masks_equals_the_unreduced_model() -> None:
    model = _vit().train()  # the stem's BatchNorm uses batch statistics: the same in both runs
    x = torch.randn(3, 1, 28, 28)
    plain = model.forward_all(x)
    blocks = attach_keep_predictors(model, 0.5, locations=(1, 2))
    _keep_all(blocks)
    masked = model.forward_all(x)
    assert all(blk.last_keep is not None and torch.equal(blk.last_keep, torch.ones(3, 49)) for blk in blocks)
    for a, b in zip(plain, masked, strict=True):
        assert (a - b).abs().max().item() <= 1e-6
    # the predictors are in the graph: they get gradients through the masks
    sum(lg.sum() for lg in masked).backward()
    assert all(p.grad is not None for blk in blocks for p in blk.predictor.parameters())


def test_masked_tokens_are_hidden_from_attention() -> None:
    """A dropped token's value does not change any kept token (the class token included)."""
    model = _vit(depth=2, exits=(0,)).train()
    blk = token_blocks(model)[1]
    x = torch.randn(2, 50, 32)
    mask = torch.ones(2, 50)
    mask[:, 7] = 0.0
    out1 = blk(TokenState(x, None, None, 1, mask)).tokens
    x2 = x.clone()
    x2[:, 7] += 5.0
    out2 = blk(TokenState(x2, None, None, 1, mask)).tokens
    kept = mask.bool()
    assert torch.allclose(out1[kept], out2[kept], atol=1e-5) and not torch.allclose(out1[:, 7], out2[:, 7])


@pytest.mark.parametrize("keep_rate", [0.6, 0.3])
def test_ratio_loss_drives_keep_fractions(keep_rate: float) -> None:
    """From the untrained predictors' ~98% keeps, the ratio loss alone moves each stage to its target."""
    torch.manual_seed(0)
    model = _vit().train()
    strategy = DynamicViT(keep_rate=keep_rate, locations=(1, 2), predictor_lr_scale=0)  # trained here
    strategy.setup(model)
    preds = [p for blk in strategy._blocks for p in blk.predictor.parameters()]
    opt = torch.optim.Adam(preds, lr=0.01)
    x = torch.randn(16, 1, 28, 28)
    targets = strategy.ratio_targets(0)
    assert targets == pytest.approx([keep_rate, keep_rate**2])
    fractions = []
    for step in range(80):
        strategy.forward(model, x)
        masks = [blk.last_keep for blk in strategy._blocks]
        fractions.append([float(m.detach().mean()) for m in masks])
        loss = ratio_loss(masks, strategy.ratio_targets(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    start = fractions[0]
    end = torch.tensor(fractions[-5:]).mean(0).tolist()
    assert abs(start[0] - keep_rate) > 0.25  # far from the target at first
    for s in range(2):
        assert abs(end[s] - targets[s]) < 0.08, (start, end, targets)


def test_ratio_targets_warm_up_from_one() -> None:
    strategy = DynamicViT(keep_rate=0.6, locations=(1, 2), warmup_steps=10)
    strategy.setup(_vit())
    assert strategy.ratio_targets(0) == [1.0, 1.0]
    assert strategy.ratio_targets(10) == pytest.approx([0.6, 0.36])


@pytest.mark.parametrize("keep_rate", [0.7, 0.3])
def test_inference_keeps_exactly_the_configured_counts(keep_rate: float) -> None:
    model = _vit(depth=4, exits=(2,))
    attach_keep_predictors(model, keep_rate, locations=(1, 3))
    for blk in token_blocks(model):  # the native ViT's cls heads skip source tracking; this test reads the sources
        blk.track_source = True
    model.eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        state = model.segments[0](x)
        assert isinstance(state, TokenState) and state.tokens.shape[1] == 1 + math.ceil(keep_rate * 49)
        n1 = math.ceil(keep_rate * 49)
        # the class token survived untouched by dropping: same as running the blocks without predictors
        state = model.segments[1](state)
    n2 = math.ceil(keep_rate * n1)
    assert state.tokens.shape[1] == 1 + n2 and state.mask is None
    src = state.source
    assert torch.equal(src[:, 0], torch.zeros(3, dtype=torch.long))  # class token stays at 0
    kept_per_sample = [(s[1:] > 0).sum().item() for s in src]
    assert kept_per_sample == [n2] * 3  # exactly n2 original patches still have a token


def test_special_tokens_are_kept_on_a_timm_vit_with_registers() -> None:
    from timm.models.vision_transformer import VisionTransformer

    from adaptnn.adapters.vit_tokens import token_vit

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=4, reg_tokens=2)
    model = token_vit(vit.eval(), exits=[0], track_source=True)  # its sources are checked
    attach_keep_predictors(model, 0.5, locations=(1,))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        s0 = model.segments[0](x)
        s1 = model.segments[1][0](s0)  # block 1 with its predictor: drops before attention
    assert s1.prefix == 3 and s1.tokens.shape[1] == 3 + 8
    assert torch.equal(s1.source[:, :3], torch.arange(3).expand(2, -1))


def test_realised_equals_simulated_with_dynamicvit() -> None:
    model = _vit(depth=4, exits=(0, 1, 2))
    attach_keep_predictors(model, 0.6, locations=(1, 2, 3))
    model.eval()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20, 1, 28, 28, generator=gen)
    with torch.no_grad():
        cached = model.forward_all(x)
    conf = torch.stack([c.softmax(-1).amax(-1) for c in cached])
    for _ in range(3):
        qs = torch.rand(3, generator=gen)
        policy = ConfidencePolicy([float(torch.quantile(conf[k], qs[k])) for k in range(3)])
        assert_realised_equals_simulated(model, x, policy, cached, (1, 6, 20))


def test_training_step_reports_losses_and_teacher_is_unreduced() -> None:
    model = _vit().train()
    strategy = get("dynamicvit", keep_rate=0.5, locations=[1, 2])
    strategy.setup(model)
    assert all(b.predictor is None for b in token_blocks(strategy._teacher))
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    ctx = StepContext(model, lambda inp: strategy.forward(model, inp), 0.1, 0, 0)
    out = strategy.training_step(ctx, x, y)
    assert out.loss.requires_grad and math.isfinite(out.loss.item())
    assert {"ratio_loss", "token_distill", "kl_distill", "keep_fraction_0", "keep_fraction_1"} <= set(out.metrics)
    with torch.no_grad():  # the teacher is the model as it was at setup (same seed, same weights), unreduced
        t_logits, _ = staged_forward(strategy._teacher, x)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(t_logits, _vit().eval().forward_all(x), strict=True))
    with pytest.raises(ConfigError):
        get("dynamicvit", keep_rate=1.5)


def test_a_few_training_steps_through_the_trainer(tmp_path) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)))
    cfg = TrainConfig(
        epochs=1,
        batch_size=8,
        lr=0.01,
        device="cpu",
        progress=False,
        strategy="dynamicvit",
        strategy_options={"keep_rate": 0.5, "locations": [1, 2], "warmup_steps": 2},
    )
    model = _vit()
    before = [b.predictor.out[-1].weight.clone() for b in attach_keep_predictors(model, 0.5, (1, 2))]
    trainer = Trainer(model, data, cfg, tmp_path)
    history = trainer.fit()
    after = [b.predictor.out[-1].weight for b in token_blocks(model) if b.predictor is not None]
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))  # their own optimizer stepped
    assert math.isfinite(history[0]["train_loss"]) and 0.0 < history[0]["keep_fraction_0"] <= 1.0
    assert len([b for b in token_blocks(model) if b.predictor is not None]) == 2
    # the checkpoint names the predictors in its model spec, so it rebuilds with them and predicts the same
    assert model.model_spec["kwargs"]["keep_rate"] == 0.5 and model.model_spec["kwargs"]["keep_locations"] == [1, 2]
    loaded = load_model(trainer.checkpoint_path).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.forward_all(x), loaded.forward_all(x), strict=True))
    with torch.no_grad():  # after training: fixed keep counts at inference
        state = torch.randn(2, 1, 28, 28)
        for segment in model.segments[:3]:  # blocks 0, 1, 2: the predictors of blocks 1 and 2
            state = segment(state)
    assert state.tokens.shape[1] == 1 + math.ceil(0.5 * math.ceil(0.5 * 49))


def test_trains_under_an_efficienttrain_curriculum(tmp_path) -> None:
    """Smaller curriculum inputs reach the ViT (positions interpolated) and the unreduced teacher alike."""
    from adaptnn.training.config import CurriculumConfig

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)))
    curriculum = CurriculumConfig(stages=[{"size": 16}, {"size": None}], balance="steps", mode="resize")
    cfg = TrainConfig(
        epochs=2,
        batch_size=8,
        lr=0.01,
        device="cpu",
        progress=False,
        strategy="dynamicvit",
        strategy_options={"keep_rate": 0.7, "locations": [1]},
        curriculum=curriculum,
    )
    history = Trainer(_vit(), data, cfg, tmp_path).fit()
    assert [h["input_size"] for h in history] == [[16, 16], [28, 28]]
    assert all(math.isfinite(h["train_loss"]) for h in history)


def test_fixed_keep_counts_lower_the_macs_and_pooling_heads_are_refused() -> None:
    from timm.models.vision_transformer import VisionTransformer

    from adaptnn.adapters.vit_tokens import token_vit
    from adaptnn.runtime.cost import exit_macs

    base = exit_macs(_vit().eval(), (1, 28, 28))
    model = _vit()
    attach_keep_predictors(model, 0.5, locations=(1, 2))
    reduced = exit_macs(model.eval(), (1, 28, 28))
    assert reduced[0] == pytest.approx(base[0]) and reduced[-1] < 0.8 * base[-1]
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, global_pool="avg")
    with pytest.raises(ConfigError, match="pooling heads"):
        DynamicViT(locations=(1,)).setup(token_vit(vit, exits=[0]))


def test_a_model_that_drew_masks_can_still_be_copied() -> None:
    import copy

    model = _vit().train()
    attach_keep_predictors(model, 0.5, locations=(1,))
    model.forward_all(torch.randn(2, 1, 28, 28))
    assert token_blocks(model)[1].last_keep is not None
    clone = copy.deepcopy(model)
    assert token_blocks(clone)[1].last_keep is None and token_blocks(model)[1].last_keep is not None


def test_resume_equals_uninterrupted_with_the_predictors_own_optimizer(tmp_path) -> None:
    """The predictors' Adam state and their pending (one-step-late) gradient are checkpointed: resume is exact."""
    data = TensorDataset(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)))
    cfg = TrainConfig(
        epochs=3,
        batch_size=8,
        lr=0.01,
        device="cpu",
        progress=False,
        seed=1,
        strategy="dynamicvit",
        strategy_options={"keep_rate": 0.5, "locations": [1, 2], "warmup_steps": 2},
    )
    model_a = _vit()
    Trainer(model_a, data, cfg, tmp_path / "a").fit()

    trainer = Trainer(_vit(), data, TrainConfig(**cfg.__dict__), tmp_path / "b")
    original_save, calls = trainer._save, {"n": 0}

    def save_then_stop(optimizer, epoch, step, record=None):
        original_save(optimizer, epoch, step, record)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    trainer._save = save_then_stop
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    model_c = _vit()
    history = Trainer(model_c, data, TrainConfig(**cfg.__dict__), tmp_path / "b").fit(resume=True)
    assert [h["epoch"] for h in history] == [3]
    state_a, state_c = model_a.state_dict(), model_c.state_dict()
    assert state_a.keys() == state_c.keys() and any("predictor" in name for name in state_a)
    for name, value in state_a.items():
        torch.testing.assert_close(state_c[name], value, rtol=0, atol=0, msg=name)
