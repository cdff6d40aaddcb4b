"""Elastic (nested) modules: one set of weights, many widths and depths (slimmable / SortedNet style).

Every member of an elastic family uses a *prefix* of each layer's weights: a layer of ``C`` output channels run at
width multiplier ``w`` computes only its first ``round(C * w)`` channels, and reads as many input channels as the
tensor it receives has (so layers need no bookkeeping of their neighbours and residual sums stay aligned). Depth is
chosen per segment by running only the leading blocks of an :class:`ElasticSequential` (trailing blocks skipped).

* :class:`ElasticConv2d`, :class:`ElasticLinear`, :class:`ElasticLayerNorm`: prefix-sliced views of one weight;
* :class:`ElasticQKV`: a fused query/key/value projection keeping its first attention heads (the attention module
  owning it runs with as many heads; :mod:`adaptnn.layers.elastic_tokens` makes ViT blocks elastic with it);
* :class:`ElasticBatchNorm2d`: shared affine parameters (prefix-sliced) and one row of running statistics per
  variant (switchable statistics), so every member normalises with statistics of its own activations;
  :func:`recalibrate_bn` recomputes one variant's row from data and changes nothing else;
  :class:`ElasticBatchNormAct2d` is the same for timm's ``BatchNormAct2d`` (then its own drop and activation);
* :class:`ElasticStagedModel`: a :class:`~adaptnn.runtime.StagedModel` with a fixed list of valid
  :class:`Variant` s (stored in its weights as ``variant_table``; loading weights trained for another list fails),
  ``set_variant(width=, depth=)`` and the ``use_variant`` context manager;
* :func:`materialise` turns the active variant into a plain, smaller model (plain ``nn.Conv2d`` / ``nn.BatchNorm2d``
  / ``nn.Linear``, skipped blocks removed) with the same outputs, ready to export like any staged model.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, InputError, UnsupportedModelError
from ..runtime.staged import InputSpec, StagedModel

__all__ = [
    "Variant",
    "scaled",
    "ElasticConv2d",
    "ElasticLinear",
    "ElasticQKV",
    "ElasticBatchNorm2d",
    "ElasticBatchNormAct2d",
    "ElasticLayerNorm",
    "ElasticSequential",
    "ElasticStagedModel",
    "apply_variant",
    "materialise",
    "recalibrate_bn",
    "elasticize",
    "verify_full_member",
    "MatryoshkaHead",
    "matryoshka_heads",
    "matryoshka_loss",
    "record_nested",
    "least_squares_stitch",
    "stitch",
]


@dataclass(frozen=True)
class Variant:
    """One member of an elastic family.

    Attributes:
        width: width multiplier in (0, 1]; every elastic layer keeps its first ``round(C * width)`` channels.
        depth: blocks run in each elastic segment (the trailing ones are skipped); ``None``: all of them.
    """

    width: float = 1.0
    depth: int | None = None

    @property
    def name(self) -> str:
        """Short label, e.g. ``w0.5_d1`` (``w1`` for the full width at full depth)."""
        return f"w{self.width:g}" + ("" if self.depth is None else f"_d{self.depth}")

    def key(self) -> tuple[float, float]:
        """Sort key, smallest member first (full depth sorts after every finite depth)."""
        return (float(self.width), float("inf") if self.depth is None else float(self.depth))

    def to_dict(self) -> dict[str, Any]:
        return {"width": self.width, "depth": self.depth, "name": self.name}


def scaled(channels: int, width: float) -> int:
    """Channels kept at width multiplier ``width``: ``round(channels * width)``, at least 1."""
    return max(1, int(channels * width + 0.5))


def _prefix(t: Tensor, *sizes: int) -> Tensor:
    """``t[:sizes[0], :sizes[1], ...]``, slicing only the dims that shrink.

    A full-range slice is not free in training: it is one more view in the forward and, in the backward, a
    zero-filled full-size gradient plus a copy, per layer and per member of a sorted step.
    """
    for dim, n in enumerate(sizes):
        if n < t.shape[dim]:
            t = t.narrow(dim, 0, n)
    return t


class ElasticConv2d(nn.Conv2d):
    """``nn.Conv2d`` running on a prefix of its channels.

    Input channels follow the input tensor; output channels are ``scaled(out_channels, width)`` unless
    ``fixed_out``. Depthwise convolutions (``groups == in_channels == out_channels``) keep as many channels as they
    receive. Other grouped convolutions and non-zero padding modes are refused at construction.
    """

    def __init__(self, *args: Any, fixed_out: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.depthwise = self.groups > 1 and self.groups == self.in_channels == self.out_channels
        if self.groups > 1 and not self.depthwise:
            raise ConfigError(f"ElasticConv2d supports groups=1 or depthwise convolutions, got groups={self.groups}")
        if self.padding_mode != "zeros":
            raise ConfigError(f"ElasticConv2d supports padding_mode='zeros', got {self.padding_mode!r}")
        self.fixed_out = fixed_out
        self.width = 1.0

    def active_out(self, in_channels: int) -> int:
        """Output channels for an input of ``in_channels`` channels at the current width."""
        if self.depthwise:
            return in_channels
        return self.out_channels if self.fixed_out else scaled(self.out_channels, self.width)

    def sliced(self, in_channels: int) -> tuple[Tensor, Tensor | None, int]:
        """``(weight, bias, groups)`` of the sub-convolution for an input of ``in_channels`` channels."""
        out = self.active_out(in_channels)
        if self.depthwise:
            weight, groups = _prefix(self.weight, out), out
        else:
            weight, groups = _prefix(self.weight, out, in_channels), 1
        bias = None if self.bias is None else _prefix(self.bias, out)
        return weight, bias, groups

    def forward(self, x: Tensor) -> Tensor:
        cin = x.shape[1]
        if cin > self.in_channels:
            raise InputError(f"{type(self).__name__} got {cin} input channels, has {self.in_channels}")
        if cin == self.in_channels and self.active_out(cin) == self.out_channels:
            return super().forward(x)
        weight, bias, groups = self.sliced(cin)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def to_plain(self, in_channels: int) -> nn.Conv2d:
        weight, bias, groups = self.sliced(in_channels)
        conv = nn.Conv2d(
            in_channels,
            weight.shape[0],
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=groups,
            bias=bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        _copy_params(conv, weight, bias)
        return conv


class ElasticLinear(nn.Linear):
    """``nn.Linear`` on a prefix of its features: inputs follow the tensor, outputs ``scaled(out, width)``.

    ``fixed_out=True`` keeps every output (a classifier's classes, an embedding's full size).
    """

    def __init__(self, *args: Any, fixed_out: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fixed_out = fixed_out
        self.width = 1.0

    def active_out(self) -> int:
        return self.out_features if self.fixed_out else scaled(self.out_features, self.width)

    def forward(self, x: Tensor) -> Tensor:
        cin, out = x.shape[-1], self.active_out()
        if cin == self.in_features and out == self.out_features:
            return super().forward(x)
        bias = None if self.bias is None else _prefix(self.bias, out)
        return F.linear(x, _prefix(self.weight, out, cin), bias)

    def to_plain(self, in_features: int) -> nn.Linear:
        out = self.active_out()
        linear = nn.Linear(
            in_features, out, bias=self.bias is not None, device=self.weight.device, dtype=self.weight.dtype
        )
        _copy_params(linear, self.weight[:out, :in_features], None if self.bias is None else self.bias[:out])
        return linear


class ElasticQKV(ElasticLinear):
    """A fused query/key/value projection that keeps the first ``scaled(num_heads, width)`` attention heads.

    Its rows are laid out ``(3, num_heads, head_dim)`` (timm's and the native ViT's layout), so a member with ``h``
    heads keeps the first ``h * head_dim`` rows of each of the q, k and v blocks (a prefix per block, not one
    prefix). :func:`apply_variant` sets the owning attention module's ``num_heads`` to :meth:`active_heads`; its
    output projection (an :class:`ElasticLinear` with ``fixed_out``) then reads the first ``h * head_dim`` features,
    which are exactly the kept heads' outputs.
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        head_dim: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, 3 * num_heads * head_dim, bias=bias, device=device, dtype=dtype)
        self.num_heads = int(num_heads)
        self.head_dim = int(head_dim)

    def active_heads(self) -> int:
        """Heads kept at the current width."""
        return scaled(self.num_heads, self.width)

    def active_out(self) -> int:
        return 3 * self.active_heads() * self.head_dim

    def _rows(self, t: Tensor, heads: int) -> Tensor:
        rest = t.shape[1:]
        return t.view(3, self.num_heads, self.head_dim, *rest)[:, :heads].reshape(3 * heads * self.head_dim, *rest)

    def sliced(self, in_features: int) -> tuple[Tensor, Tensor | None]:
        """``(weight, bias)`` of the member's projection for inputs of ``in_features`` features."""
        h = self.active_heads()
        bias = None if self.bias is None else self._rows(self.bias, h)
        return self._rows(self.weight[:, :in_features], h), bias

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] == self.in_features and self.active_heads() == self.num_heads:
            return F.linear(x, self.weight, self.bias)
        weight, bias = self.sliced(x.shape[-1])
        return F.linear(x, weight, bias)

    def to_plain(self, in_features: int) -> nn.Linear:
        weight, bias = self.sliced(in_features)
        linear = nn.Linear(
            in_features, weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
        )
        _copy_params(linear, weight, bias)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_heads={self.num_heads}, head_dim={self.head_dim}"


class ElasticBatchNorm2d(nn.Module):
    """Batch norm with prefix-sliced affine parameters and one row of running statistics per variant.

    ``running_mean`` / ``running_var`` are ``[num_variants, C]``; the row ``variant_index`` (set by
    :func:`apply_variant`) is the one used and updated. A narrow member's channels see other statistics than the
    same channels in a wide member, which is why the statistics are per variant while the affine parameters are
    shared (they are trained by every member).
    """

    def __init__(self, num_features: int, num_variants: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        if num_variants < 1:
            raise ConfigError(f"ElasticBatchNorm2d needs num_variants >= 1, got {num_variants}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_variants, num_features))
        self.register_buffer("running_var", torch.ones(num_variants, num_features))
        self.variant_index = num_variants - 1

    def forward(self, x: Tensor) -> Tensor:
        c, i = x.shape[1], self.variant_index
        return F.batch_norm(
            x,
            _prefix(self.running_mean[i], c),
            _prefix(self.running_var[i], c),
            _prefix(self.weight, c),
            _prefix(self.bias, c),
            self.training,
            self.momentum,
            self.eps,
        )

    def to_plain(self, num_features: int) -> nn.BatchNorm2d:
        c, i = num_features, self.variant_index
        bn = nn.BatchNorm2d(c, eps=self.eps, momentum=self.momentum, device=self.weight.device, dtype=self.weight.dtype)
        _copy_params(bn, self.weight[:c], self.bias[:c])
        with torch.no_grad():
            bn.running_mean.copy_(self.running_mean[i, :c])
            bn.running_var.copy_(self.running_var[i, :c])
        return bn

    def extra_repr(self) -> str:
        return f"{self.num_features}, variants={self.running_mean.shape[0]}, eps={self.eps}, momentum={self.momentum}"


class ElasticBatchNormAct2d(ElasticBatchNorm2d):
    """timm's ``BatchNormAct2d`` made elastic: :class:`ElasticBatchNorm2d`, then the source's ``drop`` and ``act``.

    ``drop`` and ``act`` are the source module's own (channel-agnostic) modules, so no timm code is copied;
    :meth:`to_plain` gives back a plain module of the source's class (same forward, same state-dict keys).
    """

    def __init__(self, source: nn.BatchNorm2d, num_variants: int) -> None:
        super().__init__(source.num_features, num_variants, eps=source.eps, momentum=source.momentum or 0.1)
        self.plain_class = type(source)
        self.drop = source.drop
        self.act = source.act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))

    def to_plain(self, num_features: int) -> nn.BatchNorm2d:
        bn = super().to_plain(num_features)
        plain = self.plain_class(
            num_features, eps=self.eps, momentum=self.momentum, apply_act=False, device=bn.weight.device
        ).to(dtype=bn.weight.dtype)
        plain.load_state_dict(bn.state_dict())
        plain.drop, plain.act = copy.deepcopy(self.drop), copy.deepcopy(self.act)
        return plain


def _is_timm_bn_act(module: nn.Module) -> bool:
    """Whether ``module`` is exactly timm's ``BatchNormAct2d`` (read from the loaded module: timm is optional)."""
    norm_act = sys.modules.get("timm.layers.norm_act")
    return norm_act is not None and type(module) is getattr(norm_act, "BatchNormAct2d", None)


class ElasticLayerNorm(nn.LayerNorm):
    """LayerNorm over the last dim with prefix-sliced affine parameters (normalises the features it receives)."""

    def forward(self, x: Tensor) -> Tensor:
        d = x.shape[-1]
        if d == self.normalized_shape[0]:
            return super().forward(x)
        weight = None if self.weight is None else self.weight[:d]
        bias = None if self.bias is None else self.bias[:d]
        return F.layer_norm(x, (d,), weight, bias, self.eps)

    def to_plain(self, features: int) -> nn.LayerNorm:
        affine = self.weight is not None
        ref = self.weight if affine else None
        ln = nn.LayerNorm(
            features,
            eps=self.eps,
            elementwise_affine=affine,
            bias=self.bias is not None,
            device=None if ref is None else ref.device,
            dtype=None if ref is None else ref.dtype,
        )
        weight = None if self.weight is None else self.weight[:features]
        _copy_params(ln, weight, None if self.bias is None else self.bias[:features])
        return ln


class ElasticSequential(nn.Sequential):
    """A segment whose trailing blocks can be skipped: runs the first ``depth`` children (``None``: all)."""

    depth: int | None = None

    def active(self) -> list[nn.Module]:
        children = list(self)
        return children if self.depth is None else children[: max(1, min(self.depth, len(children)))]

    def forward(self, x: Any) -> Any:
        for module in self.active():
            x = module(x)
        return x


_SLICED = (ElasticConv2d, ElasticLinear, ElasticBatchNorm2d, ElasticLayerNorm)


def _copy_params(module: nn.Module, weight: Tensor | None, bias: Tensor | None) -> None:
    with torch.no_grad():
        if weight is not None:
            module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)


def apply_variant(module: nn.Module, variant: Variant, index: int) -> None:
    """Set every elastic layer under ``module`` to ``variant`` (``index``: its row of batch-norm statistics).

    An attention module whose ``qkv`` is an :class:`ElasticQKV` gets ``num_heads`` = the heads that projection keeps.
    """
    # one walk, and ``_modules.get`` rather than ``getattr``: a missing attribute of an ``nn.Module`` raises and
    # catches an exception, which made switching members cost ~0.4 ms (twice per member of every sorted step)
    for m in module.modules():
        if isinstance(m, (ElasticConv2d, ElasticLinear)):
            m.width = variant.width
        elif isinstance(m, ElasticBatchNorm2d):
            m.variant_index = index
        elif isinstance(m, ElasticSequential):
            m.depth = variant.depth
        qkv = m._modules.get("qkv")
        if isinstance(qkv, ElasticQKV):  # the owner comes before its qkv in the walk: set the width here
            qkv.width = variant.width
            m.num_heads = qkv.active_heads()
            if hasattr(m, "attn_dim"):  # timm's Attention reshapes its output by it
                m.attn_dim = m.num_heads * qkv.head_dim


def _check_variants(variants: Iterable[Variant]) -> tuple[Variant, ...]:
    out = sorted({v if isinstance(v, Variant) else Variant(**v) for v in variants}, key=Variant.key)
    if not out:
        raise ConfigError("an elastic model needs at least one variant")
    for v in out:
        if not 0.0 < v.width <= 1.0 or (v.depth is not None and v.depth < 1):
            raise ConfigError(f"variant {v.name}: width must be in (0, 1] and depth >= 1 (or None), got {v}")
    return tuple(out)


class ElasticStagedModel(StagedModel):
    """A staged model whose members are the listed :class:`Variant` s of one set of weights.

    Args:
        segments, heads, exit_after, input_spec, num_classes: as :class:`~adaptnn.runtime.StagedModel`.
        variants: the valid members (the ones trained). Their ``(width, depth)`` table is a buffer, saved with the
            weights; weights saved for another list do not load (:class:`~adaptnn.errors.CheckpointError`), and
            :meth:`set_variant` refuses any member not listed (:class:`~adaptnn.errors.ConfigError`). Every
            :class:`ElasticBatchNorm2d` must hold one statistics row per variant, in this (sorted) order.

    The model starts at its largest variant (widest, deepest).
    """

    def __init__(
        self,
        segments: Sequence[nn.Module],
        heads: Sequence[nn.Module],
        exit_after: Sequence[int] | None = None,
        *,
        variants: Iterable[Variant],
        input_spec: InputSpec | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(segments, heads, exit_after, input_spec=input_spec, num_classes=num_classes)
        self.variants: tuple[Variant, ...] = _check_variants(variants)
        table = [[v.width, -1.0 if v.depth is None else float(v.depth)] for v in self.variants]
        self.register_buffer("variant_table", torch.tensor(table, dtype=torch.float64))
        for m in self.modules():
            if isinstance(m, ElasticBatchNorm2d) and m.running_mean.shape[0] != len(self.variants):
                raise ConfigError(
                    f"an ElasticBatchNorm2d holds {m.running_mean.shape[0]} statistics rows for "
                    f"{len(self.variants)} variants"
                )
        self._cost_caches: dict[Variant, dict] = {}
        self._variant = self.variants[-1]
        self._set(self._variant)

    @property
    def variant(self) -> Variant:
        """The active member."""
        return self._variant

    @property
    def largest(self) -> Variant:
        return self.variants[-1]

    @property
    def smallest(self) -> Variant:
        return self.variants[0]

    def resolve(self, width: float | Variant | None = None, depth: int | None = None) -> Variant:
        """The listed variant asked for (``width=None``: the full width; a :class:`Variant` as is).

        Raises:
            ConfigError: one line naming the variant asked for and the valid ones.
        """
        if isinstance(width, Variant):
            wanted = width
        else:
            wanted = Variant(1.0 if width is None else float(width), None if depth is None else int(depth))
        if wanted in self.variants:
            return wanted
        # ``depth=None`` also names the deepest listed depth of that width
        same_width = [v for v in self.variants if v.width == wanted.width]
        if wanted.depth is None and same_width:
            return same_width[-1]
        raise ConfigError(
            f"variant {wanted.name} is not one this model was built and trained for; "
            f"valid variants: {', '.join(v.name for v in self.variants)}"
        )

    def set_variant(self, width: float | Variant | None = None, depth: int | None = None) -> Variant:
        """Make a listed member active (see :meth:`resolve`); returns it."""
        variant = self.resolve(width, depth)
        self._set(variant)
        return variant

    def _set(self, variant: Variant) -> None:
        apply_variant(self, variant, self.variants.index(variant))
        self._variant = variant
        self._cost_cache = self._cost_caches.setdefault(variant, {})  # exit_costs cached per member

    @contextlib.contextmanager
    def use_variant(self, width: float | Variant | None = None, depth: int | None = None) -> Iterator[Variant]:
        """Run the block with a member active and restore the previous one afterwards."""
        previous = self._variant
        variant = self.set_variant(width, depth)
        try:
            yield variant
        finally:
            self._set(previous)

    def materialise(self, variant: Variant | None = None) -> StagedModel:
        """The member ``variant`` (default: the active one) as a plain :class:`StagedModel` (:func:`materialise`)."""
        with self.use_variant(variant or self._variant):
            return materialise(self)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        error_msgs = args[-1]
        saved = state_dict.get(prefix + "variant_table")
        if saved is not None and (
            saved.shape != self.variant_table.shape or not torch.equal(saved.to(self.variant_table), self.variant_table)
        ):
            error_msgs.append(
                f"the weights were trained for variants {_table_names(saved)}, the model lists "
                f"{', '.join(v.name for v in self.variants)}"
            )
            return
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, variants=[{', '.join(v.name for v in self.variants)}]"


def _table_names(table: Tensor) -> str:
    try:
        rows = table.reshape(-1, 2).tolist()
        return ", ".join(Variant(float(w), None if d < 0 else int(d)).name for w, d in rows)
    except Exception:  # a malformed table: say so
        return f"(an unreadable table of shape {list(table.shape)})"


def _example_input(model: nn.Module, example: Tensor | None) -> Tensor:
    if example is not None:
        return example[:1]
    spec = getattr(model, "input_spec", None)
    if spec is None or any(s is None for s in spec.shape):
        raise ConfigError("materialise needs an example input for a model without a fully known input_spec")
    param = next(model.parameters())
    dtype = param.dtype if spec.dtype_kind == "float" else torch.long
    return torch.zeros((1, *spec.shape), dtype=dtype, device=param.device)


def materialise(model: nn.Module, example: Tensor | None = None) -> nn.Module:
    """The active variant of ``model`` as a plain module with the same outputs (a deep copy; ``model`` untouched).

    Elastic layers become plain ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm2d`` / ``nn.LayerNorm`` holding the
    sliced weights (and the variant's batch-norm statistics); an :class:`ElasticSequential` becomes an
    ``nn.Sequential`` of its active blocks. An :class:`ElasticStagedModel` becomes a plain
    :class:`~adaptnn.runtime.StagedModel` (same exits, input spec and classes). The input width of every layer is
    read from one forward pass on ``example`` (default: a zero sample shaped like ``model.input_spec``).
    """
    copy_ = copy.deepcopy(model)
    seen: dict[nn.Module, int] = {}

    def record(module: nn.Module, inputs: tuple) -> None:
        x = inputs[0]
        seen[module] = x.shape[1] if isinstance(module, (ElasticConv2d, ElasticBatchNorm2d)) else x.shape[-1]

    handles = [m.register_forward_pre_hook(record) for m in copy_.modules() if isinstance(m, _SLICED)]
    was_training = copy_.training
    copy_.eval()
    try:
        with torch.no_grad():
            x = _example_input(copy_, example)
            if isinstance(copy_, StagedModel):
                copy_.walk(x)
            else:
                copy_(x)
    finally:
        for h in handles:
            h.remove()
    plain = _plain(copy_, seen)
    if isinstance(plain, ElasticStagedModel):
        out = StagedModel(
            list(plain.segments),
            list(plain.heads),
            plain.exit_after,
            input_spec=plain.input_spec,
            num_classes=plain.num_classes,
        )
        plain = out
    return plain.train(was_training)


def _plain(module: nn.Module, seen: dict[nn.Module, int]) -> nn.Module:
    if isinstance(module, _SLICED):
        if module not in seen:  # never reached by the active variant's forward pass: keep it whole
            full = (
                module.weight.shape[1] if isinstance(module, (ElasticConv2d, ElasticLinear)) else module.weight.shape[0]
            )
            if isinstance(module, ElasticConv2d) and module.depthwise:
                full = module.in_channels
            return module.to_plain(full)
        return module.to_plain(seen[module])
    if isinstance(module, ElasticSequential):
        return nn.Sequential(*[_plain(m, seen) for m in module.active()])
    for name, child in list(module.named_children()):
        setattr(module, name, _plain(child, seen))
    return module


def _elastic_bns(model: nn.Module) -> list[ElasticBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, ElasticBatchNorm2d)]


def recalibrate_bn(
    model: ElasticStagedModel,
    variant: Variant | float | None,
    loader: Iterable[Any],
    *,
    num_batches: int | None = None,
) -> int:
    """Recompute the batch-norm statistics row of one member from data (exact averages over the batches).

    Only that row of every :class:`ElasticBatchNorm2d`'s ``running_mean`` / ``running_var`` changes: no parameter,
    no other member's statistics (the model's mode and active variant are restored). Each batch of ``loader`` is
    an input tensor or a tuple whose first item is one. Returns the number of batches used.
    """
    bns = _elastic_bns(model)
    if not bns:
        raise ConfigError("recalibrate_bn: the model has no ElasticBatchNorm2d layer")
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    used = 0
    with model.use_variant(variant) as active:
        row = model.variants.index(active)
        model.eval()
        for bn in bns:
            bn.train()
            bn.running_mean[row].zero_()
            bn.running_var[row].fill_(1.0)
        try:
            with torch.no_grad():
                for batch in loader:
                    if num_batches is not None and used >= num_batches:
                        break
                    x = batch[0] if isinstance(batch, (tuple, list)) else batch
                    x = x.to(bns[0].weight.device)
                    for bn in bns:
                        bn.momentum = 1.0 / (used + 1)  # running average: batch n gets weight 1/(n+1)
                    model(x)
                    used += 1
        finally:
            for bn, momentum in zip(bns, momenta, strict=True):
                bn.momentum = momentum
            model.train(was_training)
    if used == 0:
        raise ConfigError("recalibrate_bn: the loader gave no batch")
    return used


_PLAIN = (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.LayerNorm)


def _convert(module: nn.Module, num_variants: int, fixed_out: int | None) -> nn.Module:
    """The elastic twin of a plain layer (same weights; batch-norm statistics copied into every variant's row)."""
    bn_act = _is_timm_bn_act(module)
    if isinstance(module, _PLAIN) and not isinstance(module, _SLICED) and type(module) not in _PLAIN and not bn_act:
        raise UnsupportedModelError(
            f"cannot make {type(module).__name__} elastic: it subclasses {type(module).__mro__[1].__name__} with a "
            "forward of its own (only plain Conv2d, BatchNorm2d, Linear and LayerNorm layers and timm's "
            "BatchNormAct2d are converted)"
        )
    if isinstance(module, nn.Conv2d) and not isinstance(module, ElasticConv2d):
        try:
            conv = ElasticConv2d(
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=module.groups,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
                device=module.weight.device,
                dtype=module.weight.dtype,
            )
        except ConfigError as err:
            raise ConfigError(f"cannot make {module} elastic: {err}") from None
        _copy_params(conv, module.weight, module.bias)
        return conv
    if isinstance(module, nn.BatchNorm2d):
        if not module.affine or not module.track_running_stats:
            raise ConfigError(f"cannot make {module} elastic: it needs affine=True and track_running_stats=True")
        if bn_act:
            bn = ElasticBatchNormAct2d(module, num_variants)
        else:
            bn = ElasticBatchNorm2d(module.num_features, num_variants, eps=module.eps, momentum=module.momentum or 0.1)
        bn.to(device=module.weight.device, dtype=module.weight.dtype)
        _copy_params(bn, module.weight, module.bias)
        with torch.no_grad():
            bn.running_mean.copy_(module.running_mean.expand_as(bn.running_mean))
            bn.running_var.copy_(module.running_var.expand_as(bn.running_var))
        return bn
    if isinstance(module, nn.Linear) and not isinstance(module, ElasticLinear):
        linear = ElasticLinear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            fixed_out=module.out_features == fixed_out,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        _copy_params(linear, module.weight, module.bias)
        return linear
    if (
        isinstance(module, nn.LayerNorm)
        and not isinstance(module, ElasticLayerNorm)
        and len(module.normalized_shape) == 1
    ):
        ln = ElasticLayerNorm(
            module.normalized_shape[0],
            eps=module.eps,
            elementwise_affine=module.weight is not None,
            bias=module.bias is not None,
        ).to(module.weight.device if module.weight is not None else "cpu")
        _copy_params(ln, module.weight, module.bias)
        return ln
    if isinstance(module, nn.Sequential) and not isinstance(module, ElasticSequential):
        children = list(module.children())
        if len(children) >= 2 and len({type(c) for c in children}) == 1 and any(True for _ in children[0].children()):
            module = ElasticSequential(*children)  # a stage of repeated blocks: its trailing blocks may be skipped
    for name, child in list(module.named_children()):
        setattr(module, name, _convert(child, num_variants, fixed_out))
    return module


def elasticize(
    model: StagedModel,
    *,
    width_mults: Sequence[float],
    depths: Sequence[int | None] = (None,),
    verify: bool = True,
    example: Tensor | None = None,
) -> ElasticStagedModel:
    """An elastic family made from any staged CNN (a torchvision ResNet, a timm CNN, a native model); a deep copy.

    Convolutions (plain or depthwise), linear layers, LayerNorms and BatchNorms become their elastic twins with the
    same weights (every variant's statistics row starts from the pretrained statistics: recalibrate or train the
    smaller members); every ``nn.Sequential`` of two or more blocks of one class becomes an
    :class:`ElasticSequential` (depth = leading blocks kept). Linear layers with ``num_classes`` outputs keep all
    of them. At width 1 and full depth the result computes exactly what ``model`` computes.

    Args:
        model: the staged model.
        width_mults: the members' width multipliers, in (0, 1].
        depths: the members' blocks per repeated stage (``None``: all).
        verify: check on ``example`` (default: a zero sample of ``model.input_spec``) that the full member's exits
            equal the model's (rtol 1e-4).
        example: input for that check.

    Raises:
        UnsupportedModelError: a layer subclass with a forward of its own, or a failed check.
        ConfigError: grouped (non-depthwise) convolutions, BatchNorms without affine parameters or running
            statistics, or invalid variants.
    """
    variants = _check_variants(Variant(float(w), None if d is None else int(d)) for w in width_mults for d in depths)
    copy_ = copy.deepcopy(model)
    segments = [_convert(s, len(variants), model.num_classes) for s in copy_.segments]
    heads = [_convert(h, len(variants), model.num_classes) for h in copy_.heads]
    elastic = ElasticStagedModel(
        segments,
        heads,
        model.exit_after,
        variants=variants,
        input_spec=model.input_spec,
        num_classes=model.num_classes,
    )
    if verify:  # lossless: the full member computes what the source model computes
        verify_full_member(model, elastic, example)
    return elastic


def verify_full_member(model: StagedModel, elastic: ElasticStagedModel, example: Tensor | None = None) -> None:
    """Check that ``elastic``'s largest member computes ``model``'s exits (rtol 1e-4) on ``example``.

    ``example`` defaults to a zero sample of ``model.input_spec``; both models' modes and the active member are
    restored. Raises :class:`~adaptnn.errors.UnsupportedModelError` with the largest difference.
    """
    x = _example_input(model, example)
    was = model.training, elastic.training
    model.eval(), elastic.eval()
    try:
        with torch.no_grad(), elastic.use_variant(elastic.largest):
            want, got = model.forward_all(x), elastic.forward_all(x)
    finally:
        model.train(was[0]), elastic.train(was[1])
    for a, b in zip(want, got, strict=True):
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
            raise UnsupportedModelError(
                f"the elastic copy's full member differs from the model (max abs diff {(a - b).abs().max():.3g}): "
                "a layer's forward is not what the elastic conversion assumes"
            )


class MatryoshkaHead(nn.Module):
    """A nested-embedding head (Matryoshka Representation Learning): every listed prefix of one embedding classifies.

    Pooled features (``[b, c]``, or ``[b, c, h, w]`` averaged) go through a linear map to an ``embed_dim``
    embedding; the first ``m`` coordinates, for each ``m`` in ``dims``, feed a linear classifier of their own
    (weight-tied: the prefix ``[:, :m]`` of one ``num_classes x embed_dim`` matrix). ``forward`` returns the logits of
    the active truncation (:meth:`set_dim`), :meth:`forward_nested` those of every truncation (for
    :func:`matryoshka_loss`), :meth:`embed` the truncated embedding. Only the listed truncations are valid: they
    are the ones trained, and :meth:`set_dim` refuses others.

    Args:
        in_features: channels of the features.
        num_classes: classes.
        embed_dim: full embedding size.
        dims: the nested sizes trained (each in [1, embed_dim]; ``embed_dim`` is added).
    """

    def __init__(self, in_features: int, num_classes: int, embed_dim: int, dims: Sequence[int]) -> None:
        super().__init__()
        nested = sorted({int(d) for d in dims} | {int(embed_dim)})
        if nested[0] < 1 or nested[-1] > embed_dim:
            raise ConfigError(f"Matryoshka dims must lie in [1, {embed_dim}], got {list(dims)}")
        self.dims = tuple(nested)
        self.embed_dim = int(embed_dim)
        self.proj = nn.Linear(in_features, embed_dim)
        self.fc = nn.Linear(embed_dim, num_classes)
        self.dim = self.embed_dim
        self._record: list[list[Tensor]] | None = None  # set by record_nested

    def set_dim(self, dim: int) -> None:
        """Make truncation ``dim`` active (one of :attr:`dims`)."""
        if int(dim) not in self.dims:
            raise ConfigError(
                f"embedding truncation {dim} was not trained; valid truncations: {', '.join(map(str, self.dims))}"
            )
        self.dim = int(dim)

    def _features(self, x: Tensor) -> Tensor:
        return x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x

    def embed(self, x: Tensor) -> Tensor:
        """The embedding truncated to the active size, ``[b, dim]``."""
        return self.proj(self._features(x))[:, : self.dim]

    def _classify(self, z: Tensor, m: int) -> Tensor:
        return F.linear(z[:, :m], self.fc.weight[:, :m], self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        z = self.proj(self._features(x))
        if self._record is not None:  # under record_nested: every truncation's logits, from this one projection
            self._record.append([self._classify(z, m) for m in self.dims])
        return self._classify(z, self.dim)

    def __getstate__(self) -> dict:
        """Copies and pickles leave out a recording in progress."""
        state = self.__dict__.copy()
        state["_record"] = None
        return state

    def forward_nested(self, x: Tensor) -> list[Tensor]:
        """Logits ``[b, C]`` of every truncation, smallest first (one projection shared by all)."""
        z = self.proj(self._features(x))
        return [self._classify(z, m) for m in self.dims]


def matryoshka_heads(model: nn.Module) -> list[MatryoshkaHead]:
    """Every :class:`MatryoshkaHead` of ``model`` in module order."""
    return [m for m in model.modules() if isinstance(m, MatryoshkaHead)]


@contextlib.contextmanager
def record_nested(model: nn.Module) -> Iterator[list[list[Tensor]]]:
    """Collect, in call order, every Matryoshka head's logits of all its truncations (one list per head call).

    Lets a training loss see each exit's nested logits from the ordinary forward pass (no second pass, and the
    same wrapped forward as the Trainer's): under ``model.forward_all(x)`` the i-th entry belongs to the i-th
    Matryoshka exit.
    """
    records: list[list[Tensor]] = []
    heads = matryoshka_heads(model)
    for head in heads:
        head._record = records
    try:
        yield records
    finally:
        for head in heads:
            head._record = None


def matryoshka_loss(nested_logits: Sequence[Tensor], targets: Tensor, weights: Sequence[float] | None = None) -> Tensor:
    """``sum_m w_m * CE(logits_m, y)`` over the truncations (MRL's loss; default weights 1)."""
    weights = [1.0] * len(nested_logits) if weights is None else [float(w) for w in weights]
    if len(weights) != len(nested_logits):
        raise ConfigError(f"got {len(weights)} weights for {len(nested_logits)} truncations")
    return sum(w * F.cross_entropy(lg.float(), targets) for w, lg in zip(weights, nested_logits, strict=True))


def least_squares_stitch(source: Tensor, target: Tensor) -> nn.Conv2d | nn.Linear:
    """A 1x1 convolution (maps ``[b, c, h, w]``) or linear layer (``[..., d]``) mapping ``source`` to ``target``.

    Its weight and bias solve ``min ||source W + bias - target||^2`` over every position of the batch
    (SN-Net's least-squares initialisation of a stitching layer), computed in float64.
    """
    if source.dim() == 4:
        if source.shape[2:] != target.shape[2:] or source.shape[0] != target.shape[0]:
            raise ConfigError(f"cannot stitch maps of shapes {list(source.shape)} and {list(target.shape)}")
        a = source.permute(0, 2, 3, 1).reshape(-1, source.shape[1])
        b = target.permute(0, 2, 3, 1).reshape(-1, target.shape[1])
        layer: nn.Conv2d | nn.Linear = nn.Conv2d(source.shape[1], target.shape[1], 1)
    else:
        if source.shape[:-1] != target.shape[:-1]:
            raise ConfigError(f"cannot stitch features of shapes {list(source.shape)} and {list(target.shape)}")
        a, b = source.reshape(-1, source.shape[-1]), target.reshape(-1, target.shape[-1])
        layer = nn.Linear(source.shape[-1], target.shape[-1])
    a1 = torch.cat([a.double(), a.new_ones(a.shape[0], 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(a1.cpu(), b.double().cpu()).solution  # [c_in + 1, c_out]
    weight = solution[:-1].T.to(source.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight.reshape(layer.weight.shape))
        layer.bias.copy_(solution[-1].to(source.dtype))
    return layer.to(source.device)


def stitch(front: StagedModel, back: StagedModel, after: int, sample: Tensor) -> StagedModel:
    """SN-Net stitching: ``front``'s segments ``0..after``, a least-squares stitching layer, ``back``'s remaining ones.

    Both models must have the same segments and exits layout (e.g. two members of one elastic family, materialised,
    or two trained widths of one architecture). The stitching layer maps ``front``'s state after segment ``after``
    to ``back``'s (fitted on ``sample``, see :func:`least_squares_stitch`); exits up to ``after`` use ``front``'s
    heads, later ones ``back``'s. The result shares modules with both models (no copies): keep several stitches
    of one pair and switch between them at run time by picking one.
    """
    if len(front.segments) != len(back.segments) or tuple(front.exit_after) != tuple(back.exit_after):
        raise ConfigError("stitch needs two models with the same segments and exits layout")
    if not 0 <= after < len(front.segments) - 1:
        raise ConfigError(f"stitch after segment {after}: expected 0 <= after < {len(front.segments) - 1}")
    state_front, state_back = sample, sample
    with torch.no_grad():
        for j in range(after + 1):
            state_front = front.segments[j](state_front)
            state_back = back.segments[j](state_back)
    layer = least_squares_stitch(state_front, state_back)
    segments = [
        *front.segments[: after + 1],
        nn.Sequential(layer, back.segments[after + 1]),
        *back.segments[after + 2 :],
    ]
    heads = [front.heads[k] if seg <= after else back.heads[k] for k, seg in enumerate(front.exit_after)]
    return StagedModel(segments, heads, front.exit_after, input_spec=front.input_spec, num_classes=front.num_classes)
