"""Token reduction for vision transformers: token state, ToMe merging, EViT fusing, and blocks that apply them.

Early exits decide how deep a sample goes; token reduction decides how many tokens a ViT carries from block to
block. Both are decisions between (or inside) the segments of a :class:`~adaptnn.runtime.StagedModel`, so the
state passed between ViT segments is a :class:`TokenState`: the tokens plus what merging needs.

* **Token state**: ``tokens [B, N, D]``; ``size [B, N, 1]`` (how many input patches a token stands for; ``None``
  while nothing was merged); ``source [B, N0]`` (the current index of every original token, so dense or
  per-patch outputs can be un-merged with :func:`unmerge`; ``None`` while nothing was merged); ``prefix``
  (leading protected tokens: class, distillation, registers; never merged or dropped).
* **ToMe** (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023): inside each block, after attention,
  the non-protected tokens are split alternately into two sets A and B; every A token is matched to its most
  similar B token (cosine similarity of the attention keys averaged over heads); the ``r`` A tokens with the
  best matches are merged into their B partners, averaging weighted by size. Later attention is *proportional*:
  ``log(size)`` is added to the attention logits of each key through an additive mask, so the fused
  ``scaled_dot_product_attention`` kernel is kept. ``r`` may be constant or decrease with depth.
* **EViT** (Liang et al., "Not All Patches are What You Need", ICLR 2022): at chosen blocks, after attention,
  keep the ``ceil(keep * n)`` patch tokens the class token attends to most (attention averaged over heads) and
  fuse the rest into one token (their average weighted by that attention).

* **DynamicViT** (Rao et al., NeurIPS 2021): a learned :class:`KeepPredictor` before chosen blocks; training
  carries Gumbel-softmax keep masks in ``TokenState.mask`` (dropped tokens hidden from attention by an additive
  mask, :func:`keep_mask_bias`), inference keeps a fixed top-k (:func:`drop_tokens`); trained by the
  ``dynamicvit`` strategy. :func:`keep_rate_warmup` lowers EViT's keep rate gradually when fine-tuning.

A :class:`TokenBlock` runs a transformer block by calling the block's *own* modules (``norm1``, ``attn.qkv``,
``attn.q_norm``/``k_norm``, ``attn.norm``, ``attn.gate``, ``attn.proj``, ``ls1``, ``drop_path1``, ``norm2``,
``mlp``, ``ls2``, ``drop_path2``) with the reduction between attention and MLP. It works for timm's
``Block`` and for :mod:`adaptnn.models.vit`'s blocks (same attribute names). With no reduction it computes
exactly what the block's own forward computes. The knob (method and amount) is set on a whole model with
:func:`set_token_knob`; the reductions are uniform across the batch (every sample keeps the same number of
tokens, so the batch stays dense) and per sample (a sample's result never depends on the others in its batch),
which is what makes cached ``forward_all`` logits replay exactly what ``run_dynamic`` decides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, UnsupportedModelError
from ..runtime.state_types import register_state_type

__all__ = [
    "TokenState",
    "TokenKnob",
    "TokenBlock",
    "TokenEmbed",
    "TokenMap",
    "TokenStateHead",
    "as_token_state",
    "unmerge",
    "proportional_bias",
    "bipartite_merge",
    "evit_fuse",
    "block_attention",
    "check_block",
    "set_token_knob",
    "token_blocks",
    "tome_schedule",
    "TOKEN_METHODS",
    "knob_grid",
    "keep_rate_warmup",
    "KeepRateWarmup",
    "KeepPredictor",
    "keep_mask_bias",
    "drop_tokens",
    "attach_keep_predictors",
]

TOKEN_METHODS = ("none", "tome", "evit")


class TokenState(NamedTuple):
    """What flows between ViT segments. Every tensor has the batch as dim 0 (the runtime compacts it).

    Attributes:
        tokens: ``[B, N, D]``.
        size: ``[B, N, 1]`` float, input patches (or prefix tokens) each token stands for; ``None``: all 1.
        source: ``[B, N0]`` long, current index of each of the ``N0`` original tokens; ``None``: identity.
        prefix: leading protected tokens (class, distillation, registers): never merged or dropped.
        mask: ``[B, N]`` keep decisions of DynamicViT training (1 kept, 0 dropped; straight-through Gumbel
            values): dropped tokens are carried but masked out of attention; ``None``: all kept.
    """

    tokens: Tensor
    size: Tensor | None = None
    source: Tensor | None = None
    prefix: int = 1
    mask: Tensor | None = None


#: exports name the state ``token_state``; ``prefix`` is a constant of the traced graph, not a tensor
register_state_type("token_state", TokenState, constants={"prefix": (0, 65536)})


def as_token_state(x: Tensor | TokenState, prefix: int) -> TokenState:
    """``x`` as a :class:`TokenState` (a plain ``[B, N, D]`` tensor gets no sizes and no sources)."""
    return x if isinstance(x, TokenState) else TokenState(x, None, None, int(prefix))


def unmerge(state: TokenState) -> Tensor:
    """Tokens back at their original positions ``[B, N0, D]``: each original token gets the value of its merged one.

    Mean pooling over the un-merged tokens equals the size-weighted mean over the merged ones.
    """
    if state.source is None:
        if state.size is not None:
            raise ConfigError(
                "cannot un-merge: tokens were merged without source tracking; set track_source=True on the TokenBlocks"
            )
        return state.tokens
    index = state.source.unsqueeze(-1).expand(-1, -1, state.tokens.shape[-1])
    return state.tokens.gather(1, index)


def proportional_bias(size: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Additive attention mask ``[B, 1, 1, N]`` = ``log(size)`` (proportional attention); ``None`` without sizes."""
    if size is None:
        return None
    return size.log().to(dtype).squeeze(-1)[:, None, None, :]


def keep_mask_bias(mask: Tensor, dtype: torch.dtype, eps: float = 1e-6) -> Tensor:
    """Additive attention mask ``[B, 1, N, N]`` hiding dropped keys: ``log(eps + (1 - eps) * G)``.

    ``G[i, j]`` is the keep decision of key ``j`` (1 on the diagonal, so every query still sees itself): the
    masked softmax of DynamicViT, ``exp(a_ij) G_ij / sum_k exp(a_ik) G_ik``, as a bias, so the fused
    ``scaled_dot_product_attention`` is kept. The ``eps`` keeps the gradient to ``G`` finite (it is the masked
    softmax's, up to ``O(eps)``); kept keys get exactly 0.
    """
    n = mask.shape[1]
    g = mask[:, None, :].expand(-1, n, -1)
    eye = torch.eye(n, dtype=torch.bool, device=mask.device)
    g = torch.where(eye, torch.ones_like(g), g)
    return torch.log1p((1.0 - eps) * (g - 1.0)).to(dtype).unsqueeze(1)


def drop_tokens(state: TokenState, score: Tensor, keep: int, track_source: bool = True) -> TokenState:
    """DynamicViT at inference: keep the ``keep`` patch tokens of highest ``score [B, N - prefix]``, drop the rest.

    Kept tokens stay in spatial order; the prefix is always kept. Dropped originals' sources point to token 0
    (they have no token any more: un-merging them is not meaningful, so pooling heads are refused by the strategy).
    """
    x, p = state.tokens, state.prefix
    batch, n_tok, dim = x.shape
    n = n_tok - p
    keep = max(int(keep), 1)
    if keep >= n:
        return state
    kept = score.argsort(dim=-1, descending=True, stable=True)[:, :keep].sort(dim=-1).values
    tokens = torch.cat([x[:, :p], x[:, p:].gather(1, kept.unsqueeze(-1).expand(-1, -1, dim))], dim=1)
    size = None
    if state.size is not None:
        size = torch.cat([state.size[:, :p], state.size[:, p:].gather(1, kept.unsqueeze(-1))], dim=1)
    if not track_source:
        return TokenState(tokens, size, None, p)
    pos = torch.zeros((batch, n), dtype=torch.long, device=x.device)
    pos.scatter_(1, kept, torch.arange(p, p + keep, device=x.device).expand(batch, -1))
    new_pos = torch.cat([torch.arange(p, device=x.device).expand(batch, -1), pos], dim=1)
    return TokenState(tokens, size, _new_source(state, new_pos), p)


class KeepPredictor(nn.Module):
    """DynamicViT's keep-score predictor: an MLP on each token's local feature and the sample's global feature.

    ``LayerNorm -> Linear -> GELU`` gives per-token features; half of them are the local part, the other half is
    averaged over the sample's kept tokens (the global part) and appended to every token; an MLP
    (``d -> d/2 -> d/4 -> 2``) gives log-probabilities of keep / drop (Rao et al., "DynamicViT", NeurIPS 2021).
    The last layer starts biased to keep (about 98%), so fine-tuning a trained ViT starts from the unreduced
    model and the ratio loss (with its warm-up) lowers the keep fractions gradually.

    Attributes:
        keep_rate: fraction of the patch tokens entering this block kept at inference (top-k by keep score).
    """

    def __init__(self, dim: int, keep_rate: float) -> None:
        super().__init__()
        if not 0.0 < float(keep_rate) <= 1.0:
            raise ConfigError(f"DynamicViT keep rate must be in (0, 1], got {keep_rate!r}")
        self.keep_rate = float(keep_rate)
        self.local_dim = dim // 2
        self.in_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, max(dim // 4, 1)), nn.GELU())
        self.out.append(nn.Linear(max(dim // 4, 1), 2))
        with torch.no_grad():  # start by keeping almost everything (keep odds ~e^4): fine-tuning starts unreduced
            self.out[-1].bias.copy_(torch.tensor([2.0, -2.0]))

    def forward(self, patches: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[B, n, 2]`` log-probabilities (keep, drop) of the patch tokens ``[B, n, D]`` (``mask [B, n]``: kept)."""
        h = self.in_proj(patches)
        local, glob = h[..., : self.local_dim], h[..., self.local_dim :]
        if mask is None:
            g = glob.mean(dim=1, keepdim=True)
        else:
            w = mask.unsqueeze(-1).to(glob.dtype)
            g = (glob * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1e-6)
        return self.out(torch.cat([local, g.expand(-1, h.shape[1], -1)], dim=-1)).log_softmax(dim=-1)

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}"


def _sizes(state: TokenState) -> Tensor:
    t = state.tokens
    return state.size if state.size is not None else t.new_ones((t.shape[0], t.shape[1], 1))


def _new_source(state: TokenState, new_pos: Tensor) -> Tensor:
    return new_pos if state.source is None else new_pos.gather(1, state.source)


def head_sum(k: Tensor) -> Tensor:
    """``[B, N, d]`` sum of the keys ``[B, H, N, d]`` over heads: ToMe's metric (the mean up to a scale, which the
    cosine similarity ignores).

    On CPU summed by ``H - 1`` additions: ``k`` is a strided view of the fused qkv projection, and a reduction over
    its head axis runs 10-100x slower there (measured: 11 ms vs 0.1 ms at ``[256, 2, 50, 32]``, about 6% of a
    ToMe forward pass at batch 256). Elsewhere (a GPU) one reduction: each addition would be one more kernel
    launch per block, which is what a GPU pays for at small batches.
    """
    if k.device.type != "cpu":
        return k.sum(dim=1)
    heads = k.unbind(1)
    out = heads[0]
    for h in heads[1:]:
        out = out + h
    return out


def bipartite_merge(state: TokenState, metric: Tensor, r: int, track_source: bool = True) -> TokenState:
    """ToMe's bipartite soft matching: merge ``r`` non-protected tokens into their most similar partners.

    Args:
        state: tokens ``[B, N, D]`` (after attention), sizes, sources, protected prefix.
        metric: ``[B, N, d]`` similarity features (the attention keys averaged over heads).
        r: tokens to remove (clipped to half the non-protected tokens).
        track_source: update ``source`` (needed only to un-merge; skipping it saves a few small kernels per block).

    Returns:
        The state with ``N - r`` tokens ordered ``[prefix, unmerged A, B]``; merged B tokens hold the
        size-weighted average of what was merged into them and the summed size.
    """
    x, p = state.tokens, state.prefix
    batch, n_tok, dim = x.shape
    n = n_tok - p
    r = min(int(r), n // 2)
    if r <= 0:
        return state
    m = metric[:, p:]
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)  # [B, Na, Nb]
    best, dst = scores.max(dim=-1)  # [B, Na]
    order = best.argsort(dim=-1, descending=True)  # per sample, so independent of the batch
    merged_a = order[:, :r]  # [B, r]
    kept_a = order[:, r:]  # [B, Na - r] (token order does not matter to attention)
    dst_merged = dst.gather(1, merged_a)  # [B, r]
    n_a, n_b = scores.shape[1], scores.shape[2]

    # size-weighted tokens with the sizes as one more channel: one gather and one scatter-add move both, and one
    # division at the end (every op is a launch on a GPU, which dominates at batch 1)
    if state.size is None:
        aug = torch.cat([x, x.new_ones(batch, n_tok, 1)], dim=-1)  # sizes 1: the tokens stay exact
    else:
        aug = torch.cat([x * state.size, state.size], dim=-1)
    patches = aug[:, p:]
    a = patches[:, 0::2].gather(1, order.unsqueeze(-1).expand(-1, -1, dim + 1))  # A in ranking order
    b = patches[:, 1::2].scatter_add(1, dst_merged.unsqueeze(-1).expand(-1, -1, dim + 1), a[:, :r])
    out = torch.cat([aug[:, :p], a[:, r:], b], dim=1)  # [prefix, unmerged A, B]
    new_size = out[..., dim:]
    tokens = out[..., :dim] / new_size
    if not track_source:
        return TokenState(tokens, new_size, None, p)

    # where every current token goes: prefix stays, kept A -> p + rank, merged A -> its B, B j -> p + (Na - r) + j
    base = p + n_a - r
    pos_a = torch.empty_like(best, dtype=torch.long)
    pos_a.scatter_(1, kept_a, torch.arange(p, base, device=x.device).expand(batch, -1))
    pos_a.scatter_(1, merged_a, base + dst_merged)
    pos_b = torch.arange(base, base + n_b, device=x.device).expand(batch, -1)
    pos = torch.empty((batch, n), dtype=torch.long, device=x.device)
    pos[:, 0::2] = pos_a
    pos[:, 1::2] = pos_b
    new_pos = torch.cat([torch.arange(p, device=x.device).expand(batch, -1), pos], dim=1)
    return TokenState(tokens, new_size, _new_source(state, new_pos), p)


def evit_fuse(state: TokenState, cls_attn: Tensor, keep: int, track_source: bool = True) -> TokenState:
    """EViT: keep the ``keep`` patch tokens with the highest class attention, fuse the others into one token.

    Args:
        state: tokens ``[B, N, D]`` (after attention), sizes, sources, protected prefix.
        cls_attn: ``[B, N]`` attention of the class token to every token (averaged over heads).
        keep: patch tokens kept (the fused token comes on top); nothing happens when ``keep >= N - prefix - 1``.
        track_source: update ``source`` (see :func:`bipartite_merge`).

    Returns:
        The state ``[prefix, kept (spatial order), fused]`` with ``prefix + keep + 1`` tokens.
    """
    x, p = state.tokens, state.prefix
    batch, n_tok, dim = x.shape
    n = n_tok - p
    keep = max(int(keep), 1)
    if keep >= n - 1:
        return state
    score = cls_attn[:, p:]
    order = score.argsort(dim=-1, descending=True, stable=True)
    kept = order[:, :keep].sort(dim=-1).values
    rest = order[:, keep:]
    size = _sizes(state)
    xp, sp = x[:, p:], size[:, p:]
    keep_x = xp.gather(1, kept.unsqueeze(-1).expand(-1, -1, dim))
    keep_s = sp.gather(1, kept.unsqueeze(-1))
    w = score.gather(1, rest).unsqueeze(-1).to(x.dtype)  # [B, n - keep, 1]
    rest_x = xp.gather(1, rest.unsqueeze(-1).expand(-1, -1, dim))
    fused = (rest_x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    fused_s = sp.gather(1, rest.unsqueeze(-1)).sum(1, keepdim=True)
    tokens = torch.cat([x[:, :p], keep_x, fused], dim=1)
    new_size = torch.cat([size[:, :p], keep_s, fused_s], dim=1)
    if not track_source:
        return TokenState(tokens, new_size, None, p)
    pos = torch.full((batch, n), p + keep, dtype=torch.long, device=x.device)
    pos.scatter_(1, kept, torch.arange(p, p + keep, device=x.device).expand(batch, -1))
    new_pos = torch.cat([torch.arange(p, device=x.device).expand(batch, -1), pos], dim=1)
    return TokenState(tokens, new_size, _new_source(state, new_pos), p)


_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_ATTN_PARTS = ("qkv", "q_norm", "k_norm", "proj", "num_heads", "head_dim")


def check_block(block: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless ``block`` is a pre-norm block with timm's module names."""
    missing = [n for n in _BLOCK_PARTS if not hasattr(block, n)]
    missing += [f"attn.{n}" for n in _ATTN_PARTS if not missing and not hasattr(block.attn, n)]
    if missing:
        raise UnsupportedModelError(
            f"{type(block).__name__} lacks {', '.join(missing)}: token reduction needs a pre-norm transformer block "
            "with timm's Block layout (norm1, attn.qkv, attn.proj, ls1, drop_path1, norm2, mlp, ls2, drop_path2)"
        )
    for name in ("rope", "rotary_emb", "q_proj"):
        if getattr(block.attn, name, None) is not None:
            raise UnsupportedModelError(f"{type(block.attn).__name__} has {name!r}: not supported by token reduction")


def block_attention(
    attn: nn.Module, x: Tensor, bias: Tensor | None, training: bool, return_logits: bool = False
) -> tuple[Tensor, ...]:
    """Self-attention through the attention module's own parts: ``(output [B, N, D], q, k)`` (``[B, H, N, hd]``).

    ``return_logits``: run the softmax explicitly (not the fused kernel) and return the raw logits
    ``q k^T / sqrt(hd)`` ``[B, H, N, N]`` (before ``bias``) fourth, computed once (DVT's relationship reuse).
    """
    batch, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    drop = attn.attn_drop.p if training and hasattr(attn, "attn_drop") else 0.0
    logits = None
    if return_logits:
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # the fused kernel's default scale
        weights = (logits if bias is None else logits + bias).softmax(dim=-1)
        out = F.dropout(weights, drop) @ v if drop else weights @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)
    out = out.transpose(1, 2).reshape(batch, n, attn.num_heads * attn.head_dim)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj(out)
    proj_drop = getattr(attn, "proj_drop", None)
    out = proj_drop(out) if proj_drop is not None else out
    return (out, q, k, logits) if return_logits else (out, q, k)


def _cls_attention(q: Tensor, k: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """``[B, N]`` attention of token 0 to every token, averaged over heads (one query row, so cheap)."""
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # [B, H, 1, N]
    if bias is not None:
        logits = logits + bias[..., :1, :]
    return logits.softmax(dim=-1).mean(dim=1).squeeze(1)


class TokenBlock(nn.Module):
    """A transformer block run on a :class:`TokenState`, optionally reducing tokens between attention and MLP.

    Calls the wrapped block's own modules (see the module docstring), so LayerScale, q/k norms, scale norms and
    gates are all kept; with ``action=None`` the result equals ``block(tokens)``.

    Attributes:
        block: the wrapped block (shared, not copied).
        action: ``None``, ``("tome", r)`` (merge r tokens) or ``("evit", keep_rate)``; set by :func:`set_token_knob`.
        proportional: add ``log(size)`` to the attention logits once tokens were merged.
        track_source: keep ``TokenState.source`` current (for un-merging; class-token models can skip it).
        predictor: DynamicViT's :class:`KeepPredictor` run on the tokens entering the block (``None``: none);
            training draws Gumbel-softmax keep masks (carried in ``TokenState.mask``), inference keeps the top
            ``ceil(keep_rate * n)`` patch tokens. Set by :func:`attach_keep_predictors`.
        last_keep: the ``[B, n]`` training mask this block's predictor drew last (read by the ratio loss).
    """

    def __init__(self, block: nn.Module, proportional: bool = True, track_source: bool = True) -> None:
        super().__init__()
        check_block(block)
        self.block = block
        self.action: tuple[str, float] | None = None
        self.proportional = bool(proportional)
        self.track_source = bool(track_source)
        self.predictor: KeepPredictor | None = None
        self.last_keep: Tensor | None = None

    def __getstate__(self) -> dict:
        """Copies and pickles leave out :attr:`last_keep` (a tensor of the last training graph)."""
        state = self.__dict__.copy()
        state["last_keep"] = None
        return state

    def _predict(self, state: TokenState) -> TokenState:
        """DynamicViT's decision before the block: a Gumbel mask (training) or top-k dropping (inference)."""
        p, x = state.prefix, state.tokens
        if self.training:
            prev = state.mask if state.mask is not None else x.new_ones(x.shape[:2])
            logp = self.predictor(x[:, p:], prev[:, p:])
            keep = F.gumbel_softmax(logp, hard=True, dim=-1)[..., 0] * prev[:, p:]
            self.last_keep = keep
            return state._replace(mask=torch.cat([prev[:, :p], keep], dim=1))
        if state.mask is not None:
            raise ConfigError("a token state with training keep masks reached a block in eval mode")
        n = x.shape[1] - p
        keep = math.ceil(self.predictor.keep_rate * n)
        if keep >= n:
            return state
        return drop_tokens(state, self.predictor(x[:, p:])[..., 0], keep, self.track_source)

    def forward(
        self, state: TokenState, attn_bias: Tensor | None = None, return_logits: bool = False
    ) -> TokenState | tuple[TokenState, Tensor]:
        """The block on ``state``. ``attn_bias`` (``[B, H, N, N]``, the tokens entering attention) is added to the
        attention logits; ``return_logits`` also returns the raw logits (see :func:`block_attention`)."""
        blk = self.block
        if self.predictor is not None:
            state = self._predict(state)
        x = state.tokens
        bias = proportional_bias(state.size, x.dtype) if self.proportional else None
        if state.mask is not None:
            if self.action is not None:
                raise ConfigError("DynamicViT training masks do not combine with ToMe/EViT; set the token knob off")
            masked = keep_mask_bias(state.mask, x.dtype)
            bias = masked if bias is None else bias + masked
        if attn_bias is not None:
            bias = attn_bias if bias is None else bias + attn_bias
        out, q, k, *logits = block_attention(blk.attn, blk.norm1(x), bias, self.training, return_logits)
        x = x + blk.drop_path1(blk.ls1(out))
        state = state._replace(tokens=x)
        if self.action is not None:
            method, amount = self.action
            if method == "tome":
                state = bipartite_merge(state, head_sum(k), int(amount), self.track_source)
            elif method == "evit":
                if state.prefix < 1:
                    raise ConfigError("EViT ranks tokens by class-token attention: the model has no class token")
                n = x.shape[1] - state.prefix
                scale = float(getattr(blk.attn, "scale", k.shape[-1] ** -0.5))
                keep = math.ceil(float(amount) * n)
                state = evit_fuse(state, _cls_attention(q, k, bias, scale), keep, self.track_source)
            x = state.tokens
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        state = state._replace(tokens=x)
        return (state, logits[0]) if return_logits else state

    def extra_repr(self) -> str:
        return f"action={self.action}"


def attach_keep_predictors(
    model: nn.Module, keep_rate: float, locations: Sequence[int] | None = None
) -> list[TokenBlock]:
    """Give the token blocks at ``locations`` a DynamicViT :class:`KeepPredictor` keeping ``keep_rate``.

    ``locations`` default to EViT's (the 4th, 7th and 10th of 12 blocks, scaled to the depth); each predictor
    keeps ``keep_rate`` of the patch tokens entering its block. Blocks that already have one keep it (its
    weights) and get the new ``keep_rate``. To load a DynamicViT model's weights, build the model and make the
    same call first. Returns the blocks with predictors.
    """
    blocks = token_blocks(model)
    if not blocks:
        raise ConfigError(f"{type(model).__name__} has no token blocks: wrap it with adaptnn.adapters.token_vit first")
    where = tuple(locations) if locations is not None else _evit_locations(len(blocks))
    if not where or any(not 0 <= i < len(blocks) for i in where):
        raise ConfigError(f"DynamicViT locations {list(where)} out of range for {len(blocks)} blocks")
    chosen = []
    for i in sorted(set(where)):
        blk = blocks[i]
        if blk.predictor is None:
            dim = blk.block.attn.num_heads * blk.block.attn.head_dim
            ref = next(blk.block.parameters())
            blk.predictor = KeepPredictor(dim, keep_rate).to(ref.device, ref.dtype)
        blk.predictor.keep_rate = float(keep_rate)
        chosen.append(blk)
    cache = getattr(model, "_cost_cache", None)
    if isinstance(cache, dict):
        cache.clear()
    return chosen


class TokenEmbed(nn.Module):
    """Wraps an embedding (image -> ``[B, N, D]`` tokens) so it starts a :class:`TokenState` with ``prefix`` tokens."""

    def __init__(self, embed: nn.Module, prefix: int) -> None:
        super().__init__()
        self.embed = embed
        self.prefix = int(prefix)

    def forward(self, x: Tensor) -> TokenState:
        return TokenState(self.embed(x), None, None, self.prefix)


class TokenMap(nn.Module):
    """Applies a per-token module (e.g. the final LayerNorm) to the tokens of a :class:`TokenState`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, state: TokenState) -> TokenState:
        return state._replace(tokens=self.module(state.tokens))


class TokenStateHead(nn.Module):
    """A head reading a :class:`TokenState`: the tokens as they are (class-token heads) or un-merged (pooling heads).

    Un-merging before a pooling head makes its mean the size-weighted mean of the merged tokens, and equals the
    plain tokens when nothing was merged.
    """

    def __init__(self, head: nn.Module, unmerge_first: bool) -> None:
        super().__init__()
        self.head = head
        self.unmerge_first = bool(unmerge_first)

    def forward(self, state: TokenState) -> Tensor:
        if not isinstance(state, TokenState):
            return self.head(state)
        return self.head(unmerge(state) if self.unmerge_first else state.tokens)


def tome_schedule(r: int, depth: int, schedule: str = "constant") -> list[int]:
    """Tokens ToMe merges in each of ``depth`` blocks: ``r`` everywhere, or decreasing linearly from ``2r`` to 0.

    The decreasing schedule removes about as many tokens in total (``r * depth``) but early, where they cost most.
    """
    if r < 0 or depth < 1:
        raise ConfigError(f"ToMe needs r >= 0 and depth >= 1, got r={r}, depth={depth}")
    if schedule == "constant":
        return [int(r)] * depth
    if schedule == "decreasing":
        if depth == 1:
            return [int(r)]
        return [int(round(2 * r * (depth - 1 - i) / (depth - 1))) for i in range(depth)]
    raise ConfigError(f"ToMe schedule must be 'constant' or 'decreasing', got {schedule!r}")


@dataclass(frozen=True)
class TokenKnob:
    """How many tokens a ViT carries: one deployment setting, chosen jointly with the exit thresholds.

    Attributes:
        method: ``"none"``, ``"tome"`` or ``"evit"``.
        value: ToMe: tokens merged per block ``r``; EViT: the keep rate in ``(0, 1]``.
        schedule: ToMe's ``"constant"`` or ``"decreasing"`` r.
        locations: EViT's reducing blocks (default: after each quarter of the depth, as the paper's 4/7/10 of 12).
    """

    method: str = "none"
    value: float = 0.0
    schedule: str = "constant"
    locations: tuple[int, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.method not in TOKEN_METHODS:
            raise ConfigError(f"token method must be one of {list(TOKEN_METHODS)}, got {self.method!r}")
        if self.method == "evit" and not 0.0 < float(self.value) <= 1.0:
            raise ConfigError(f"EViT keep rate must be in (0, 1], got {self.value!r}")
        if self.method == "tome" and (float(self.value) < 0 or float(self.value) != int(self.value)):
            raise ConfigError(f"ToMe r must be a whole number >= 0, got {self.value!r}")

    @property
    def is_off(self) -> bool:
        """Whether this knob reduces nothing (``none``, ToMe ``r=0``, EViT ``keep=1``)."""
        if self.method == "tome":
            return int(self.value) == 0
        return self.method == "none" or float(self.value) >= 1.0

    def label(self) -> str:
        """Short name, e.g. ``"tome_r8"``, ``"evit_k0.7"``, ``"none"``."""
        if self.method == "tome":
            return f"tome_r{int(self.value)}" + ("_dec" if self.schedule == "decreasing" else "")
        if self.method == "evit":
            return f"evit_k{float(self.value):g}"
        return "none"

    def actions(self, depth: int) -> list[tuple[str, float] | None]:
        """The per-block actions of :class:`TokenBlock` for a model of ``depth`` blocks."""
        if self.is_off:
            return [None] * depth
        if self.method == "tome":
            return [("tome", r) if r > 0 else None for r in tome_schedule(int(self.value), depth, self.schedule)]
        where = self.locations if self.locations is not None else _evit_locations(depth)
        bad = [i for i in where if not 0 <= i < depth]
        if bad:
            raise ConfigError(f"EViT locations {list(where)} out of range for {depth} blocks")
        return [("evit", float(self.value)) if i in where else None for i in range(depth)]

    def to_dict(self) -> dict:
        return {"method": self.method, "value": self.value, "schedule": self.schedule, "locations": self.locations}


def _evit_locations(depth: int) -> tuple[int, ...]:
    """Blocks where EViT reduces by default: 4th, 7th, 10th of 12 (1-based), scaled to ``depth``."""
    return tuple(sorted({min(depth - 1, max(0, round(depth * f) - 1)) for f in (4 / 12, 7 / 12, 10 / 12)}))


def token_blocks(model: nn.Module) -> list[TokenBlock]:
    """The :class:`TokenBlock` modules of ``model`` in order."""
    return [m for m in model.modules() if isinstance(m, TokenBlock)]


def set_token_knob(model: nn.Module, knob: TokenKnob | None) -> nn.Module:
    """Set the token reduction of every :class:`TokenBlock` of ``model`` (``None``: no reduction). Returns ``model``.

    Clears a staged model's cached exit costs (they depend on the knob).
    """
    knob = knob or TokenKnob()
    blocks = token_blocks(model)
    if not blocks:
        raise ConfigError(f"{type(model).__name__} has no token blocks: wrap it with adaptnn.adapters.token_vit first")
    for blk, action in zip(blocks, knob.actions(len(blocks)), strict=True):
        blk.action = action
    cache = getattr(model, "_cost_cache", None)
    if isinstance(cache, dict):
        cache.clear()
    model.token_knob = knob  # plain attribute: read by benchmarks and calibration reports
    return model


def knob_grid(methods: Sequence[str], tome_r: Sequence[int], evit_keep: Sequence[float]) -> list[TokenKnob]:
    """``none`` plus one knob per ToMe ``r`` and EViT keep rate of the requested methods."""
    knobs = [TokenKnob()]
    if "tome" in methods:
        knobs += [TokenKnob("tome", r) for r in tome_r]
    if "evit" in methods:
        knobs += [TokenKnob("evit", k) for k in evit_keep]
    return knobs


def keep_rate_warmup(step: int, warmup_steps: int, target: float, start: float = 1.0) -> float:
    """Keep rate at optimizer ``step`` of a fine-tuning run: ``start`` (1, nothing dropped) -> ``target``.

    EViT fine-tunes with the keep rate lowered gradually, not at once, so the early, still unadapted network is not
    starved of tokens: a cosine from ``start`` at step 0 to ``target`` at ``warmup_steps``, then ``target``.
    """
    if warmup_steps < 0 or not 0.0 < target <= 1.0 or not target <= start <= 1.0:
        raise ConfigError(
            f"keep-rate warm-up needs warmup_steps >= 0 and 0 < target <= start <= 1, got "
            f"warmup_steps={warmup_steps}, target={target}, start={start}"
        )
    if step >= warmup_steps:
        return float(target)
    t = max(int(step), 0) / warmup_steps
    return float(target + (start - target) * 0.5 * (1.0 + math.cos(math.pi * t)))


@dataclass(frozen=True)
class KeepRateWarmup:
    """Sets a model's EViT keep rate for each training step (:func:`keep_rate_warmup`); call it before the step.

    ``KeepRateWarmup(0.7, warmup_steps=3 * steps_per_epoch)(model, step)`` from a strategy's ``training_step`` (or
    any per-step hook) fine-tunes with the keep rate going from 1 to 0.7 over the first three epochs.
    """

    target: float
    warmup_steps: int
    locations: tuple[int, ...] | None = None

    def rate(self, step: int) -> float:
        """The keep rate at ``step``."""
        return keep_rate_warmup(step, self.warmup_steps, self.target)

    def __call__(self, model: nn.Module, step: int) -> float:
        """Set the keep rate of ``step`` on ``model`` (all its token blocks); returns it."""
        rate = self.rate(step)
        set_token_knob(model, TokenKnob("evit", rate, locations=self.locations))
        return rate
