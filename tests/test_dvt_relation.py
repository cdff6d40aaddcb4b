"""DVT's relationship reuse: the coarse ViT's attention logits, transformed and upsampled, bias the fine ViT's."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import adaptnn
from adaptnn.errors import ConfigError
from adaptnn.layers.tokens import TokenKnob, TokenState, attach_keep_predictors, set_token_knob
from adaptnn.models.vit import CascadeState, _merge_map
from adaptnn.policies import ConfidencePolicy
from adaptnn.runtime.state import cat_states, index_state
from helpers import assert_realised_equals_simulated, between_middle_values

pytestmark = pytest.mark.usefixtures("one_thread")

DEPTH, HEADS, DIM = 2, 2, 32


def _model(relation: bool = True, seed: int = 0) -> adaptnn.StagedModel:
    torch.manual_seed(seed)
    kwargs = dict(embed_dim=DIM, depth=DEPTH, num_heads=HEADS, relation_reuse=relation)
    return adaptnn.create_model("dvt_vit_tiny_conv_fmnist", **kwargs).eval()


def _perturb(model: adaptnn.StagedModel, std: float = 0.3) -> None:
    with torch.no_grad():
        for p in model.segments[1].relation.parameters():
            p.normal_(0.0, std)


def _coarse_logits(model: adaptnn.StagedModel, x: torch.Tensor) -> torch.Tensor:
    """``[B, L * H, 17, 17]`` raw attention logits of the coarse blocks, by hand from their modules (no knob)."""
    coarse = model.segments[0]
    state = coarse.embed(F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True))
    maps = []
    for tb in coarse.blocks:
        blk = tb.block
        t = blk.norm1(state.tokens)
        b, n, _ = t.shape
        q, k, _v = blk.attn.qkv(t).reshape(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        maps.append(q @ k.transpose(-2, -1) / math.sqrt(DIM // HEADS))
        state = tb(state)
    return torch.cat(maps, dim=1)


def _expected_biases(model: adaptnn.StagedModel, coarse_logits: torch.Tensor) -> list[torch.Tensor]:
    """Per fine block ``[B, H, 50, 50]``: the MLP over the channel axis, then nearest upsampling 4x4 -> 7x7."""
    lin1, _, lin2 = model.segments[1].relation
    c = coarse_logits.permute(0, 2, 3, 1)  # channels last
    maps = (F.gelu(c @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias).permute(0, 3, 1, 2)
    # fine patch (i, j) of the 7x7 grid reads coarse patch (i * 4 // 7, j * 4 // 7); the class token reads itself
    index = [0] + [1 + (i * 4 // 7) * 4 + (j * 4 // 7) for i in range(7) for j in range(7)]
    index = torch.tensor(index)
    up = maps[:, :, index][:, :, :, index]
    return list(up.reshape(up.shape[0], DEPTH, HEADS, 50, 50).unbind(1))


class _SdpaSpy:
    """Records the additive mask of every fused attention call (and runs it)."""

    def __init__(self) -> None:
        self.masks: list[torch.Tensor | None] = []
        self.original = F.scaled_dot_product_attention

    def __call__(self, q, k, v, attn_mask=None, **kwargs):
        self.masks.append(attn_mask)
        return self.original(q, k, v, attn_mask=attn_mask, **kwargs)


def test_zero_init_equals_the_cascade_without_relation_reuse() -> None:
    plain, reuse = _model(False), _model(True)
    missing = reuse.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("segments.1.relation.") for k in missing)
    assert plain.segments[0](torch.zeros(1, 1, 28, 28)).relation is None  # nothing collected when off
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        a, b = plain.forward_all(x), reuse.forward_all(x)
        assert (a[0] - b[0]).abs().max() <= 1e-6  # the coarse blocks' explicit softmax: the fused kernel's result
        assert (a[1] - b[1]).abs().max() <= 1e-6
        fa = plain.segments[1](plain.segments[0](x)).tokens
        fb = reuse.segments[1](reuse.segments[0](x)).tokens
        assert (fa - fb).abs().max() <= 1e-6


def test_fine_logits_change_by_the_upsampled_transformed_coarse_logits(monkeypatch) -> None:
    model = _model()
    _perturb(model)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        cascade = model.segments[0](x)
        logits = _coarse_logits(model, x)
        assert cascade.relation.shape == (3, DEPTH * HEADS, 17, 17)
        assert torch.allclose(cascade.relation, logits, atol=1e-5)
        expected = _expected_biases(model, logits)
        spy = _SdpaSpy()
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        model.segments[1](cascade)
    assert len(spy.masks) == DEPTH  # the fine blocks keep the fused kernel; the mask is what is added to the logits
    for mask, want in zip(spy.masks, expected, strict=True):
        assert mask.shape == (3, HEADS, 50, 50)
        assert (mask - want).abs().max() <= 1e-5
        assert want.abs().max() > 0.1  # the perturbed transform gives a real bias


def test_gradients_reach_the_transform_and_the_coarse_blocks() -> None:
    model = _model().train()
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    relation = model.segments[1].relation
    F.cross_entropy(model.forward_all(x)[1], y).backward()
    assert relation[-1].weight.grad.abs().sum() > 0  # the zero-initialised layer learns
    model.zero_grad()
    _perturb(model)
    assert model.segments[1].reuse[1].weight.abs().sum() == 0  # feature reuse still zero: no gradient path there
    F.cross_entropy(model.forward_all(x)[1], y).backward()
    assert relation[0].weight.grad.abs().sum() > 0
    for tb in model.segments[0].blocks:  # fine loss -> coarse attention logits -> coarse q/k projections
        assert tb.block.attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("knob", [TokenKnob(), TokenKnob("tome", 3), TokenKnob("evit", 0.5)])
def test_realised_equals_simulated_with_relation_reuse(knob) -> None:
    model = set_token_knob(_model(), knob)
    _perturb(model)
    x = torch.randn(12, 1, 28, 28)
    with torch.no_grad():
        cached = model.forward_all(x)
    policy = ConfidencePolicy([float(cached[0].softmax(-1).amax(-1).median())])
    sim_exit = assert_realised_equals_simulated(model, x, policy, cached, (1, 5, 12))
    assert 0 < int((sim_exit == 0).sum()) < 12


def test_cascade_states_slice_and_concatenate_by_rows() -> None:
    model = _model()
    with torch.no_grad():
        state = model.segments[0](torch.randn(5, 1, 28, 28))
    rows = index_state(state, torch.tensor([3, 1]))
    assert isinstance(rows, CascadeState) and torch.equal(rows.relation, state.relation[[3, 1]])
    both = cat_states([rows, index_state(state, torch.tensor([0]))])
    assert torch.equal(both.relation, state.relation[[3, 1, 0]])


def test_coarse_token_reduction_is_unmerged_to_the_grid() -> None:
    """With ToMe merging in the coarse stage, each block's map is on the grid again, and a softmax over the un-merged
    keys gives exactly the proportional attention over the merged ones."""
    model = set_token_knob(_model(), TokenKnob("tome", 3))
    coarse = model.segments[0]
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        relation = coarse(x).relation
        state = coarse.embed(F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True))
        for layer, tb in enumerate(coarse.blocks):
            entry = state
            state, raw = tb(state, return_logits=True)
            unmerged = relation[:, layer * HEADS : (layer + 1) * HEADS]  # [B, H, 17, 17]
            if entry.source is None:
                assert torch.equal(unmerged, raw)
                continue
            n = raw.shape[-1]
            assert n < 17  # the block saw merged tokens
            src = entry.source  # [B, 17] original -> merged token
            one_hot = F.one_hot(src, n).to(raw.dtype)  # [B, 17, n]
            summed = torch.einsum("bhij,bjn->bhin", unmerged.softmax(-1), one_hot)  # probability per merged key
            proportional = (raw + entry.size.log().squeeze(-1)[:, None, None, :]).softmax(-1)  # [B, H, n, n]
            want = proportional.gather(2, src[:, None, :, None].expand(-1, HEADS, -1, n))
            assert torch.allclose(summed, want, atol=1e-6)


def test_fine_biases_are_pooled_over_merged_tokens() -> None:
    bias = torch.arange(16.0).reshape(1, 1, 4, 4)
    source = torch.tensor([[0, 1, 1, 2]])  # originals 1 and 2 were merged into token 1
    state = TokenState(torch.zeros(1, 3, 8), torch.tensor([[[1.0], [2.0], [1.0]]]), source, 1)
    pooled = _merge_map(bias, state)
    want = torch.tensor([[0.0, 1.5, 3.0], [6.0, 7.5, 9.0], [12.0, 13.5, 15.0]])
    assert torch.equal(pooled[0, 0], want)
    plain = TokenState(torch.zeros(1, 4, 8), None, None, 1)
    assert _merge_map(bias, plain) is bias


def test_dynamicvit_predictors_are_refused_with_relation_reuse() -> None:
    model = _model()
    attach_keep_predictors(model, 0.7)
    with pytest.raises(ConfigError, match="relation_reuse=False"):
        model.forward_all(torch.randn(2, 1, 28, 28))
    attach_keep_predictors(_model(relation=False), 0.7)  # without relation reuse they are allowed


def test_checkpoint_round_trip_keeps_relation_reuse(tmp_path) -> None:
    from adaptnn.io import save_checkpoint
    from adaptnn.models import load_model

    model = _model()
    _perturb(model)
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"model_spec": model.model_spec})
    loaded = load_model(path).eval()
    assert loaded.segments[1].relation is not None
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.forward_all(x), loaded.forward_all(x), strict=True))


@pytest.mark.slow
def test_relation_reuse_exports_in_stages_mode_and_serves(tmp_path) -> None:
    """The ONNX stages carry the coarse attention maps in the cascade state; the serving engine, which joins rows of
    different requests at a stage, decides like run_dynamic with either backend."""
    from adaptnn.export import StagesRunner, export_stages
    from adaptnn.export.stages import LOGITS_ATOL
    from adaptnn.serve import Engine, OnnxBackend, TorchBackend
    from test_export_stages import _assert_matches

    model = _model()
    _perturb(model)
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        cached = model.forward_all(x)
    policy = ConfidencePolicy([between_middle_values(cached[0].softmax(-1).amax(-1))])  # none on the threshold
    out = export_stages(model, policy, x, tmp_path / "onnx")
    _assert_matches(model, policy, x, StagesRunner(out))
    reference = model.run_dynamic(x, policy)
    for backend in (OnnxBackend(out), TorchBackend(model, policy)):
        engine = Engine(backend, max_batch=5)
        requests = [engine.submit(x[a:b]) for a, b in ((0, 3), (3, 10), (10, 16))]
        engine.step()
        requests.append(engine.submit(x[:2]))
        engine.drain()
        exits = torch.cat([r.result.exit_index for r in requests])
        logits = torch.cat([r.result.logits for r in requests])
        assert torch.equal(exits, torch.cat([reference.exit_index, reference.exit_index[:2]]))
        want = torch.cat([reference.logits, reference.logits[:2]])
        torch.testing.assert_close(logits, want, atol=LOGITS_ATOL, rtol=1e-4)
