"""Token reduction on timm ViTs: exact with reduction off, special tokens protected, merging bookkeeping right."""

from __future__ import annotations

import math

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

import adaptnn
from adaptnn.adapters.vit_tokens import token_vit, tokenize_staged
from adaptnn.errors import ConfigError
from adaptnn.layers.tokens import (
    KeepRateWarmup,
    TokenKnob,
    TokenState,
    bipartite_merge,
    evit_fuse,
    head_sum,
    keep_rate_warmup,
    set_token_knob,
    token_blocks,
    tome_schedule,
    unmerge,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two on a loaded box


BASE = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=7)
VARIANTS = {
    "plain": dict(),
    "layerscale": dict(init_values=0.1),
    "registers": dict(reg_tokens=4),
    "qk_norm": dict(qk_norm=True),
    "avg_pool": dict(global_pool="avg", class_token=False),
    "avg_pool_with_cls": dict(global_pool="avg"),
    "everything": dict(init_values=1e-2, reg_tokens=2, qk_norm=True, qkv_bias=True),
}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "distilled":
        model = VisionTransformerDistilled(**BASE)
    else:
        model = VisionTransformer(**BASE, **VARIANTS[name])
    if isinstance(getattr(model, "ls1", None), torch.nn.Module):
        pass
    for blk in model.blocks:  # LayerScale at 0.1 would hide a dropped ls; randomise it
        for ls in (blk.ls1, blk.ls2):
            if hasattr(ls, "gamma"):
                ls.gamma.data.uniform_(0.2, 2.0)
    return model.eval()


ALL = [*VARIANTS, "distilled"]
OFF_KNOBS = [TokenKnob(), TokenKnob("tome", 0), TokenKnob("evit", 1.0)]


@pytest.mark.parametrize("name", ALL)
def test_reduction_off_equals_the_unpatched_timm_model(name: str) -> None:
    model = _model(name)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        staged = token_vit(model, exits=[1])
        for knob in OFF_KNOBS:
            set_token_knob(staged, knob)
            got = staged(x)
            assert (got - ref).abs().max().item() <= 1e-6, (name, knob)


@pytest.mark.parametrize("name", ["plain", "layerscale", "qk_norm", "distilled"])
def test_reduction_changes_outputs_and_is_close(name: str) -> None:
    """A real reduction runs, changes the logits, and (random weights) keeps them in the same ballpark."""
    model = _model(name)
    x = torch.randn(2, 3, 32, 32)
    staged = token_vit(model).eval()
    with torch.no_grad():
        ref = model(x)
        for knob in (TokenKnob("tome", 4), TokenKnob("evit", 0.5)):
            got = set_token_knob(staged, knob)(x)
            assert got.shape == ref.shape and torch.isfinite(got).all()
            assert not torch.equal(got, ref)


def _ids_state(batch: int = 2, n: int = 21, dim: int = 8, prefix: int = 3) -> TokenState:
    tokens = torch.randn(batch, n, dim)
    tokens[:, :prefix] = 1000.0 + torch.arange(prefix, dtype=torch.float32)[None, :, None]  # recognisable
    return TokenState(tokens, None, None, prefix)


@pytest.mark.parametrize("r", [1, 5, 9, 50])
def test_bipartite_merge_protects_prefix_and_conserves_mass(r: int) -> None:
    state = _ids_state()
    out = bipartite_merge(state, state.tokens, r)
    n = state.tokens.shape[1] - state.prefix
    assert out.tokens.shape[1] == state.tokens.shape[1] - min(r, n // 2)
    assert torch.equal(out.tokens[:, :3], state.tokens[:, :3])  # class/dist/registers untouched
    assert torch.equal(out.source[:, :3], torch.arange(3).expand(2, -1))
    # sizes sum to the number of tokens; size-weighted sum of tokens is conserved
    assert torch.allclose(out.size.sum(1).squeeze(-1), torch.full((2,), 21.0))
    assert torch.allclose((out.tokens * out.size).sum(1), state.tokens.sum(1), atol=1e-3)
    # un-merging: every original token maps to a merged token whose value is the mean of its group
    full = unmerge(out)
    for b in range(2):
        for j in range(out.tokens.shape[1]):
            group = (out.source[b] == j).nonzero().flatten()
            assert len(group) == int(out.size[b, j])
            assert torch.allclose(state.tokens[b, group].mean(0), out.tokens[b, j], atol=1e-5)
    assert full.shape == state.tokens.shape


def test_bipartite_merge_twice_keeps_sources_consistent() -> None:
    state = _ids_state(n=30)
    s1 = bipartite_merge(state, state.tokens, 6)
    s2 = bipartite_merge(s1, s1.tokens, 6)
    for b in range(2):
        for j in range(s2.tokens.shape[1]):
            group = (s2.source[b] == j).nonzero().flatten()
            assert len(group) == int(s2.size[b, j])
            assert torch.allclose(state.tokens[b, group].mean(0), s2.tokens[b, j], atol=1e-4)


def test_merge_picks_most_similar_pairs() -> None:
    """Two identical patch tokens (an A and a B one) are the pair ToMe merges first."""
    torch.manual_seed(1)
    tokens = torch.randn(1, 9, 16)
    tokens[0, 3] = tokens[0, 6] * 1.0001  # positions 1.. : A = 1,3,5,7 ; B = 2,4,6,8 (prefix 1)
    out = bipartite_merge(TokenState(tokens, None, None, 1), tokens, 1)
    assert out.source[0, 3] == out.source[0, 6]
    assert int(out.size.max()) == 2


@pytest.mark.parametrize("keep", [1, 4, 10])
def test_evit_keeps_top_attention_and_fuses_rest(keep: int) -> None:
    state = _ids_state(n=15, prefix=2)
    attn = torch.rand(2, 15)
    out = evit_fuse(state, attn, keep)
    assert out.tokens.shape[1] == 2 + keep + 1
    assert torch.equal(out.tokens[:, :2], state.tokens[:, :2])
    top = attn[:, 2:].topk(keep).indices.sort().values + 2
    assert torch.equal(out.tokens[:, 2 : 2 + keep], state.tokens.gather(1, top[..., None].expand(-1, -1, 8)))
    assert torch.allclose(out.size.sum(1).squeeze(-1), torch.full((2,), 15.0))
    assert (out.source[:, 2:] >= 2).all()


@pytest.mark.parametrize("name", ["registers", "distilled"])
@pytest.mark.parametrize("knob", [TokenKnob("tome", 8), TokenKnob("tome", 3, "decreasing"), TokenKnob("evit", 0.3)])
def test_special_tokens_survive_every_reduction(name: str, knob: TokenKnob) -> None:
    model = _model(name)
    prefix = model.num_prefix_tokens
    staged = set_token_knob(token_vit(model, exits=[0, 2], track_source=True), knob).eval()  # sources checked
    x = torch.randn(2, 3, 32, 32)
    seen = []
    with torch.no_grad():
        staged.walk(x, segment=lambda j, m, s: seen.append(m(s)) or seen[-1])
    for state in seen:
        assert state.prefix == prefix
        assert state.source is None or torch.equal(state.source[:, :prefix], torch.arange(prefix).expand(2, -1))
        if state.size is not None:
            assert torch.equal(state.size[:, :prefix], torch.ones(2, prefix, 1))
            assert torch.allclose(state.size.sum(1).squeeze(-1), torch.full((2,), float(state.source.shape[1])))
    assert seen[-1].tokens.shape[1] < 64 + prefix


def test_tome_schedules() -> None:
    assert tome_schedule(4, 3) == [4, 4, 4]
    dec = tome_schedule(4, 5, "decreasing")
    assert dec == sorted(dec, reverse=True) and dec[-1] == 0 and abs(sum(dec) - 20) <= 2
    with pytest.raises(ConfigError):
        tome_schedule(4, 3, "zigzag")
    with pytest.raises(ConfigError):
        TokenKnob("evit", 1.5)
    with pytest.raises(ConfigError):
        TokenKnob("tome", 2.5)


def test_tokenize_staged_shares_weights_with_from_timm() -> None:
    from adaptnn import from_timm

    model = _model("plain")
    staged = from_timm(model, exits=[1])
    tok = tokenize_staged(staged)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = staged.forward_all(x), tok.forward_all(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert {id(p) for p in staged.parameters()} == {id(p) for p in tok.parameters()}


def test_tokenize_refuses_what_it_cannot_reduce() -> None:
    from adaptnn import create_model
    from adaptnn.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError):
        tokenize_staged(create_model("mecnn_digits"))
    avg = _model("avg_pool")
    with pytest.raises(ConfigError):
        token_vit(avg, track_source=False)  # its mean-pooling head needs the sources to un-merge
    staged = set_token_knob(token_vit(avg), TokenKnob("tome", 8))
    with pytest.raises(ConfigError):  # EViT ranks by class attention: no class token, no EViT
        set_token_knob(staged, TokenKnob("evit", 0.5))(torch.randn(1, 3, 32, 32))


def test_keep_rate_warmup_goes_from_one_to_the_target() -> None:
    rates = [keep_rate_warmup(s, 10, 0.5) for s in range(14)]
    assert rates[0] == 1.0 and rates[10:] == [0.5] * 4
    assert all(a > b for a, b in zip(rates[:10], rates[1:11], strict=True))  # strictly decreasing during warm-up
    assert rates[5] == pytest.approx(0.75)  # cosine: half way at half the warm-up
    assert keep_rate_warmup(0, 0, 0.7) == 0.7  # no warm-up: the target at once
    with pytest.raises(ConfigError):
        keep_rate_warmup(0, 10, 1.5)
    torch.manual_seed(0)
    model = adaptnn.create_model("vit_tiny_conv_fmnist", embed_dim=32, depth=3, exits=[0])
    warm = KeepRateWarmup(0.5, warmup_steps=4, locations=(1,))
    assert warm(model, 0) == 1.0 and all(b.action is None for b in token_blocks(model))  # keep 1: nothing reduced
    assert warm(model, 4) == 0.5 and [b.action for b in token_blocks(model)] == [None, ("evit", 0.5), None]
    with torch.no_grad():
        state = model.segments[0](torch.randn(2, 1, 28, 28))
        state = model.segments[1](state)
    assert state.tokens.shape[1] == 1 + math.ceil(0.5 * 49) + 1  # class + kept + fused


def test_tome_metric_head_sum_merges_like_the_mean_of_keys_over_heads() -> None:
    """The keys summed by additions equal H x their mean over heads, on the strided qkv view the block makes, and
    ToMe's cosine matching makes the same merges with either."""
    torch.manual_seed(0)
    batch, n, heads, hd = 5, 17, 3, 8
    qkv = torch.randn(batch, n, 3 * heads * hd).reshape(batch, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    k = qkv[1]  # [B, H, N, hd], not contiguous
    torch.testing.assert_close(head_sum(k), k.mean(dim=1) * heads, rtol=1e-6, atol=1e-6)
    state = TokenState(torch.randn(batch, n, 12), None, None, 1)
    by_sum, by_mean = bipartite_merge(state, head_sum(k), 5), bipartite_merge(state, k.mean(dim=1), 5)
    assert torch.equal(by_sum.source, by_mean.source)
    torch.testing.assert_close(by_sum.tokens, by_mean.tokens, rtol=0, atol=0)


def test_sources_are_tracked_by_default_only_where_a_head_unmerges() -> None:
    """Class-token models skip the index bookkeeping of source tracking; mean-pooling heads need it and get it."""
    from adaptnn.layers.tokens import token_blocks

    cls_model, avg_model = token_vit(_model("registers")), token_vit(_model("avg_pool"))
    assert not any(b.track_source for b in token_blocks(cls_model))
    assert all(b.track_source for b in token_blocks(avg_model))
    reduced = set_token_knob(cls_model, TokenKnob("tome", 8)).eval()
    with torch.no_grad():
        state = reduced.segments[0](torch.randn(2, 3, 32, 32))
    assert state.source is None and state.size is not None and state.tokens.shape[1] < 64


def test_unmerge_refuses_merged_tokens_without_sources() -> None:
    """A model that skipped source tracking cannot un-merge a reduced state (no silent [B, N', D] answer)."""
    x = torch.randn(2, 9, 4)
    merged = bipartite_merge(TokenState(x, None, None, 1), x, 3, track_source=False)
    assert merged.source is None and merged.tokens.shape[1] == 6
    with pytest.raises(ConfigError, match="track_source"):
        unmerge(merged)
    assert torch.equal(unmerge(TokenState(x, None, None, 1)), x)  # nothing merged: the tokens themselves
