"""Deep Incubation (Model-Assembling): train a staged model's segments independently inside a shallow meta model.

The recipe (Ni et al., "Deep Incubation", 2023), on a :class:`~adaptnn.runtime.StagedModel` ``T`` with segments
``T_1..T_L``:

1. :func:`build_meta_model`: a shallow model ``M`` with the *same interfaces*: meta segment ``M_i`` maps the
   state entering ``T_i`` to the state leaving it (one conv-BN-ReLU with the right stride for feature maps; a
   patch embedding for a ViT's image-to-tokens segment; one pre-norm transformer block for tokens ``[B, N, D]``;
   for :class:`~adaptnn.layers.tokens.TokenState` interfaces, as between the native ViT's segments, one block of
   the target's own shape run as a token block, after a patch embedding in the image-to-tokens segment and
   followed by a final LayerNorm where the target's segment ends with one), with copies of ``T``'s heads; ``M``
   is trained end to end (cheap: it is shallow).
2. :func:`hybrid_model` ``i``: ``M`` with ``M_i`` replaced by ``T_i`` (and ``T``'s heads after segment ``i``);
   the meta parts are frozen (eval mode, no gradients), so training the hybrid trains ``T_i`` alone. Each
   ``i`` is an independent job (:func:`train_stage`): it needs only ``M``'s weights and the data, writes its
   own checkpoint (:func:`stage_state`, atomic safetensors) and can run in another process or machine.
3. :func:`assemble`: ``T``'s weights are the union of the jobs' tensors, taken unchanged; then fine-tune ``T``
   end to end with the ordinary Trainer.

Interfaces: plain tensors (the native CNN families, timm/torchvision CNNs, timm ViTs via ``timm_staged``) and
token states without token reduction (the native ViT family, ``vit_tiny_conv_*``); other nested states
(MSDNet's multi-scale lists, DVT's cascade state, token states carrying merge sizes, sources or keep masks) are
refused.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..errors import CheckpointError, ConfigError
from ..io.checkpoint import load_checkpoint, load_weights, save_checkpoint
from ..layers.tokens import TokenBlock, TokenEmbed, TokenMap, TokenState
from ..models.vit import Block
from ..runtime.staged import StagedModel
from .config import TrainConfig, check_int
from .trainer import Trainer

__all__ = [
    "IncubationConfig",
    "assemble",
    "build_meta_model",
    "hybrid_model",
    "interface_shapes",
    "stage_keys",
    "stage_state",
    "train_meta",
    "train_stage",
]


@dataclass
class IncubationConfig:
    """Epochs of each phase of Deep Incubation (the other optimisation settings come from the run's ``train``).

    Attributes:
        meta_epochs: end-to-end epochs of the shallow meta model.
        stage_epochs: epochs of every stage job (each trains one target segment inside the meta model).
        finetune_epochs: end-to-end epochs of the assembled target.
        jobs: stage jobs run at the same time (separate processes).
    """

    meta_epochs: int = 5
    stage_epochs: int = 5
    finetune_epochs: int = 5
    jobs: int = 1

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        check_int("incubate.meta_epochs", self.meta_epochs, 1)
        check_int("incubate.stage_epochs", self.stage_epochs, 1)
        check_int("incubate.finetune_epochs", self.finetune_epochs, 0)
        check_int("incubate.jobs", self.jobs, 1)


@dataclass(frozen=True)
class _Interface:
    """The per-sample state between two segments: a tensor's shape, or a TokenState's tokens shape and prefix."""

    shape: tuple[int, ...]
    prefix: int | None = None  # None: a plain tensor


def _interfaces(model: StagedModel, input_shape: tuple[int, ...]) -> list[_Interface]:
    found = [_Interface(tuple(input_shape))]

    def record(j: int, module: nn.Module, state: Any) -> Any:
        out = module(state)
        if isinstance(out, TokenState):
            if out.size is not None or out.source is not None or out.mask is not None:
                raise ConfigError(
                    f"Deep Incubation needs token states without token reduction; segment {j} returns one with "
                    "merge sizes, sources or keep masks (set the token knob off, drop DynamicViT predictors)"
                )
            found.append(_Interface(tuple(out.tokens.shape[1:]), int(out.prefix)))
        elif isinstance(out, Tensor):
            found.append(_Interface(tuple(out.shape[1:])))
        else:
            raise ConfigError(
                "Deep Incubation needs tensor or token states between segments; "
                f"segment {j} returns {type(out).__name__}"
            )
        return out

    was_training = model.training
    model.eval()
    with torch.no_grad():
        model.walk(torch.zeros(2, *input_shape), segment=record)
    model.train(was_training)
    return found


def interface_shapes(model: StagedModel, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per-sample shapes of the state entering segment 0 and leaving every segment (``L + 1`` shapes).

    A :class:`~adaptnn.layers.tokens.TokenState`'s shape is its tokens' ``(N, D)``.
    """
    return [interface.shape for interface in _interfaces(model, input_shape)]


class _MetaPatchEmbed(nn.Module):
    """Image ``[C, H, W]`` to ``n_tokens`` tokens of ``dim``: a patch convolution, learned extra tokens, positions."""

    def __init__(self, shape_in: tuple[int, ...], n_tokens: int, dim: int) -> None:
        super().__init__()
        c, h, w = shape_in
        patch = next(
            (
                p
                for p in range(1, min(h, w) + 1)
                if h % p == 0 and w % p == 0 and 0 <= n_tokens - (h // p) * (w // p) <= 8
            ),
            None,
        )
        if patch is None:
            raise ConfigError(f"no patch size turns a {list(shape_in)} image into {n_tokens} tokens (+ up to 8 extra)")
        self.proj = nn.Conv2d(c, dim, patch, stride=patch)
        self.extra = nn.Parameter(torch.zeros(1, n_tokens - (h // patch) * (w // patch), dim))
        self.pos = nn.Parameter(torch.randn(1, n_tokens, dim) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.extra.expand(len(x), -1, -1), tokens], dim=1) + self.pos


def _meta_segment(shape_in: tuple[int, ...], shape_out: tuple[int, ...]) -> nn.Module:
    if len(shape_in) == 3 and len(shape_out) == 3:  # feature maps [C, H, W]
        stride = max(1, round(shape_in[1] / shape_out[1]))
        return nn.Sequential(
            nn.Conv2d(shape_in[0], shape_out[0], 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(shape_out[0]),
            nn.ReLU(inplace=True),
        )
    if len(shape_in) == 3 and len(shape_out) == 2:  # a ViT's embedding (+ its first blocks): image to tokens
        return _MetaPatchEmbed(shape_in, shape_out[0], shape_out[1])
    if len(shape_in) == 2 and len(shape_out) == 2 and shape_in[0] == shape_out[0]:  # tokens [N, D]: one block
        dim = shape_in[1]
        if shape_out[1] != dim:
            return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, shape_out[1]), nn.GELU())
        heads = next(h for h in (max(1, dim // 64), 4, 2, 1) if dim % h == 0)
        return nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
    raise ConfigError(f"no meta segment for a segment mapping {list(shape_in)} to {list(shape_out)}")


def _meta_token_block(segment: nn.Module, dim: int) -> TokenBlock:
    """One pre-norm block shaped like the first token block of the target ``segment`` (heads, MLP width)."""
    ref = next((m.block for m in segment.modules() if isinstance(m, TokenBlock)), None)
    heads = getattr(getattr(ref, "attn", None), "num_heads", None)
    if not isinstance(heads, int) or dim % heads:
        heads = next(h for h in (max(1, dim // 64), 4, 2, 1) if dim % h == 0)
    first = next((m for m in getattr(ref, "mlp", nn.Identity()).modules() if isinstance(m, nn.Linear)), None)
    mlp_ratio = first.out_features / dim if first is not None and first.in_features == dim else 4.0
    block = Block(dim, heads, mlp_ratio)
    for module in block.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
    return TokenBlock(block)


def _meta_token_segment(segment: nn.Module, entering: _Interface, leaving: _Interface) -> nn.Module:
    """Meta segment for a segment leaving a TokenState: [patch embedding,] one token block [, final LayerNorm]."""
    if leaving.prefix is None:
        raise ConfigError(
            f"no meta segment for a segment turning a token state into a plain {list(leaving.shape)} tensor"
        )
    n_tokens, dim = leaving.shape
    units: list[nn.Module] = []
    if entering.prefix is None and len(entering.shape) == 3:  # image to tokens
        embed = _MetaPatchEmbed(entering.shape, n_tokens, dim)
        if embed.extra.shape[1] != leaving.prefix:
            raise ConfigError(
                f"segment leaves {n_tokens} tokens with {leaving.prefix} prefix tokens; a patch embedding of the "
                f"{list(entering.shape)} image gives {embed.extra.shape[1]} extra tokens"
            )
        units.append(TokenEmbed(embed, leaving.prefix))
    elif entering.prefix != leaving.prefix or entering.shape != leaving.shape:
        raise ConfigError(
            f"no meta segment for a segment mapping {list(entering.shape)} (prefix {entering.prefix}) to "
            f"tokens {list(leaving.shape)} (prefix {leaving.prefix})"
        )
    units.append(_meta_token_block(segment, dim))
    children = list(segment.children())
    if children and isinstance(children[-1], TokenMap) and isinstance(children[-1].module, nn.LayerNorm):
        units.append(TokenMap(nn.LayerNorm(dim)))  # the target's final norm (its last head reads normed tokens)
    return nn.Sequential(*units)


def build_meta_model(target: StagedModel, input_shape: tuple[int, ...], seed: int = 0) -> StagedModel:
    """The shallow meta model: one small layer per target segment with the same interfaces, copies of its heads."""
    found = _interfaces(target, input_shape)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        segments = [
            _meta_token_segment(seg, a, b)
            if a.prefix is not None or b.prefix is not None
            else _meta_segment(a.shape, b.shape)
            for seg, a, b in zip(target.segments, found[:-1], found[1:], strict=True)
        ]
    meta = StagedModel(
        segments,
        [copy.deepcopy(h) for h in target.heads],
        target.exit_after,
        input_spec=target.input_spec,
        num_classes=target.num_classes,
    )
    for module in meta.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    spec = getattr(target, "model_spec", {"name": "unknown", "kwargs": {}})
    meta.model_spec = {"name": "incubation_meta", "kwargs": {"target": spec}}
    return meta


class _Frozen(nn.Module):
    """A module kept in eval mode with frozen parameters whatever ``train()`` is called with."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    def train(self, mode: bool = True) -> _Frozen:
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, x: Any) -> Any:
        return self.module(x)


def hybrid_model(meta: StagedModel, target: StagedModel, index: int) -> StagedModel:
    """The meta model with segment ``index`` (and the heads after it) taken from ``target``; the rest frozen.

    ``target``'s modules are shared, not copied: training the hybrid trains them in place.
    """
    if not 0 <= index < len(target.segments):
        raise ConfigError(f"stage index must be in [0, {len(target.segments) - 1}], got {index}")
    segments = [target.segments[j] if j == index else _Frozen(copy.deepcopy(m)) for j, m in enumerate(meta.segments)]
    heads = [
        target.heads[k] if seg == index else _Frozen(copy.deepcopy(meta.heads[k]))
        for k, seg in enumerate(target.exit_after)
    ]
    hybrid = StagedModel(
        segments, heads, target.exit_after, input_spec=target.input_spec, num_classes=target.num_classes
    )
    hybrid.model_spec = {"name": "incubation_hybrid", "kwargs": {"stage": index, "meta": meta.model_spec}}
    return hybrid


def stage_keys(target: StagedModel, index: int) -> list[str]:
    """The target's ``state_dict`` keys that job ``index`` trains: segment ``index`` and the heads after it."""
    prefixes = [f"segments.{index}."] + [f"heads.{k}." for k, seg in enumerate(target.exit_after) if seg == index]
    return [key for key in target.state_dict() if key.startswith(tuple(prefixes))]


def stage_state(target: StagedModel, index: int) -> dict[str, Tensor]:
    """Job ``index``'s tensors of the target (copies, on the CPU), keyed as in the target's ``state_dict``."""
    state = target.state_dict()
    return {key: state[key].detach().cpu().clone() for key in stage_keys(target, index)}


def assemble(target: StagedModel, stage_paths: list[str | Path]) -> StagedModel:
    """Load every job's checkpoint into ``target`` unchanged; they must cover its weights exactly once."""
    state: dict[str, Tensor] = {}
    for path in stage_paths:
        for key, value in load_checkpoint(path).model_state.items():
            if key in state:
                raise CheckpointError(f"{path}: tensor {key!r} is also in another stage checkpoint")
            state[key] = value
    load_weights(target, state, source="the assembled stage checkpoints")
    return target


def _phase_config(config: TrainConfig, epochs: int) -> TrainConfig:
    phase = copy.copy(config)
    phase.epochs = epochs
    phase.curriculum = copy.deepcopy(config.curriculum)
    phase.teacher = copy.deepcopy(config.teacher)
    return phase


def train_meta(
    meta: StagedModel, train_set: Dataset, config: TrainConfig, run_dir: str | Path, epochs: int, *, resume: bool = True
) -> StagedModel:
    """Train the meta model end to end for ``epochs`` (a Trainer run in ``run_dir``, resumable)."""
    Trainer(meta, train_set, _phase_config(config, epochs), run_dir).fit(resume=resume)
    return meta


def train_stage(
    meta: StagedModel,
    target: StagedModel,
    index: int,
    train_set: Dataset,
    config: TrainConfig,
    run_dir: str | Path,
    out: str | Path,
    epochs: int,
    *,
    meta_info: dict[str, Any] | None = None,
) -> Path:
    """Job ``index``: train target segment ``index`` inside the frozen meta model; write its tensors to ``out``."""
    hybrid = hybrid_model(meta, target, index)
    Trainer(hybrid, train_set, _phase_config(config, epochs), run_dir).fit(resume=True)
    info = dict(meta_info or {}, stage=index, keys=len(stage_keys(target, index)))
    return save_checkpoint(out, stage_state(target, index), info)
