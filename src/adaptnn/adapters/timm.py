"""Exits for timm models: CNNs at stage boundaries, ViT/DeiT every few blocks.

``from_timm("resnet50", exits="stages")`` builds a :class:`~adaptnn.runtime.StagedModel` whose last exit is the
timm model's own ``forward_head`` (so its logits equal the original model's, bit for bit) and whose earlier
exits are new heads from :func:`adaptnn.layers.heads.make_head`.

How a model is cut:

* **CNNs** (ResNet, ConvNeXt, EfficientNet, MobileNetV3, RegNet, ... anything whose ``forward_features``
  applies its top-level children one after the other): the children are flattened into units down to the
  modules named in timm's ``feature_info``; the exit positions are the ``feature_info`` entries with a
  reduction of 4 or more (the stem gets none), the last one being the original classifier.
* **Vision transformers** (timm's ``VisionTransformer`` and subclasses such as DeiT and distilled DeiT): the
  embedding (patches, class/register tokens, positions) is the first unit, then one unit per block, then the
  final norm; the exit positions are the blocks (the last block's exit is the original classifier, after the
  final norm). Intermediate heads read the class token (or mean-pool the patch tokens when the model pools
  by average or has no class token).

``exits=`` chooses among those positions as for every adapter (:func:`adaptnn.adapters._common.resolve_exits`):
``"stages"`` (default) is every stage end of a CNN and 4 evenly spaced exits of a ViT. The last exit is checked
against the original model on a random input when the model is wrapped
(:func:`~adaptnn.adapters._common.check_last_exit`): a model whose forward does more than chaining its
children is refused with :class:`~adaptnn.errors.UnsupportedModelError` rather than wrapped wrongly.

timm is an optional dependency: ``pip install 'adaptnn[timm]'``. Nothing is downloaded unless
``pretrained=True`` is passed (timm then fetches weights the usual way); rebuilding from a checkpoint never downloads
(``pretrained`` is off, the weights come from the file) and accepts only plain timm names and allow-listed
``timm_kwargs`` unless the user passes ``trust_code`` (see :func:`adaptnn.models.load_model`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..models._registry import CheckpointArg, create_model, register_model
from ..runtime.staged import InputSpec, StagedModel
from ._common import (
    HEAD_OPTIONS,
    ShellCall,
    assemble,
    check_last_exit,
    default_head,
    plain_name,
    require,
    resolve_exits,
    shell,
)

__all__ = ["from_timm", "wrap_timm", "timm_staged"]

_VIT_TRUNK = ("patch_embed", "pos_drop", "patch_drop", "norm_pre", "blocks", "norm")


#: ``timm_kwargs`` a checkpoint may set: architecture numbers and switches of timm's model constructors. Anything
#: else (``pretrained_cfg``/``pretrained_cfg_overlay`` with a ``file`` or ``hf_hub_id``, ``checkpoint_path``,
#: ``cache_dir``, layer names resolved by timm) reads files or downloads, so it needs ``trust_code``.
#: Sizes are bounded: timm lays out per-block lists before building modules, and the lossless check runs a real
#: forward pass at ``img_size``/``input_size``.
_TIMM_OPTIONS: dict[str, CheckpointArg] = {
    **{
        k: CheckpointArg(int, bounds=(0, 1024))
        for k in ("in_chans", "patch_size", "depth", "num_heads", "reg_tokens", "output_stride")
    },
    **{k: CheckpointArg(int, bounds=(0, 65536)) for k in ("embed_dim", "stem_width")},
    **{
        k: CheckpointArg(float)
        for k in (
            "drop_rate",
            "drop_path_rate",
            "drop_block_rate",
            "attn_drop_rate",
            "proj_drop_rate",
            "pos_drop_rate",
            "patch_drop_rate",
            "mlp_ratio",
        )
    },
    **{
        k: CheckpointArg(bool)
        for k in ("class_token", "dynamic_img_size", "dynamic_img_pad", "qkv_bias", "qk_norm", "no_embed_class")
    },
    **{k: CheckpointArg(bool | None) for k in ("pre_norm", "fc_norm")},
    "img_size": CheckpointArg(int | list[int], bounds=(1, 1024)),
    "init_values": CheckpointArg(float | None),
    "global_pool": CheckpointArg(str),
}


@register_model(
    checkpoint_args={
        "arch": CheckpointArg(
            trusted=lambda v: not plain_name(v),
            why="a prefixed or path-like timm name (hf-hub:, local-dir:) downloads a model or reads a local folder",
        ),
        "pretrained": CheckpointArg(on_load=False),  # the weights come from the checkpoint: no download
        "input_size": CheckpointArg(bounds=(1, 1024)),  # the lossless check runs the model at this size
        "head_kwargs": HEAD_OPTIONS,
        "timm_kwargs": CheckpointArg(keys=_TIMM_OPTIONS),
    },
    build_on_meta=True,
)
def timm_staged(
    *,
    arch: str = "resnet18",
    exits: str | int | list[int] = "stages",
    num_classes: int = 1000,
    pretrained: bool = False,
    input_size: Sequence[int] | None = None,
    head: str = "default",
    head_kwargs: dict | None = None,
    timm_kwargs: dict | None = None,
    verify: bool = True,
) -> StagedModel:
    """A timm model with exits (see the module docstring); registered so checkpoints can rebuild it.

    Args:
        arch: timm model name, e.g. ``"resnet50"``, ``"convnext_tiny"``, ``"deit_small_patch16_224"``.
        exits: where the exits sit, as for every adapter (see :func:`adaptnn.adapters._common.resolve_exits`):
            ``"stages"``, ``"all"``, an int N (ViT: every N blocks) or a list of stage (CNN) / block (ViT) indices.
        num_classes: classes of every exit (the timm classifier is built with this many).
        pretrained: load timm's pretrained weights (downloads them; off by default).
        input_size: one sample's shape ``(3, H, W)``; default: the model's pretrained config.
        head: head kind for the intermediate exits (``"default"``: pool+linear for CNNs, token head for ViTs).
        head_kwargs: options of that head (see :func:`adaptnn.layers.heads.make_head`).
        timm_kwargs: extra keyword arguments of ``timm.create_model`` (e.g. ``{"img_size": 64}``).
        verify: check the last exit against the original model on a random input (see
            :func:`~adaptnn.adapters._common.check_last_exit`).
    """
    timm = require("timm", "timm")
    try:
        model = timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **(timm_kwargs or {}))
    except RuntimeError as err:
        if "Unknown model" in str(err) or "unknown model" in str(err):
            raise ConfigError(f"timm has no model {arch!r} (see timm.list_models())") from None
        raise
    return wrap_timm(model, exits=exits, input_size=input_size, head=head, head_kwargs=head_kwargs, verify=verify)


def from_timm(
    model: str | nn.Module, exits: str | int | list[int] = "stages", num_classes: int | None = None, **kwargs: object
) -> StagedModel:
    """Wrap a timm model (a name, or a model you built/trained) as a staged model with exits.

    A name goes through :func:`adaptnn.create_model` (``timm_staged``) so checkpoints can rebuild it; a
    module is wrapped in place (shared weights; rebuild it yourself before loading a state dict).

    Args:
        model: timm model name or instance.
        exits: see :func:`timm_staged`.
        num_classes: classes (names only; default 1000). An instance keeps its own classifier.
        **kwargs: further arguments of :func:`timm_staged` (names) or :func:`wrap_timm` (instances).
    """
    if isinstance(model, str):
        return create_model(
            "timm_staged", arch=model, exits=exits, num_classes=1000 if num_classes is None else num_classes, **kwargs
        )
    if num_classes is not None and num_classes != getattr(model, "num_classes", num_classes):
        raise ConfigError(
            f"the model has {model.num_classes} classes, got num_classes={num_classes}; call "
            "model.reset_classifier(num_classes) first"
        )
    return wrap_timm(model, exits=exits, **kwargs)


def _is_vit(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("patch_embed", "blocks", "_pos_embed", "forward_head"))


def wrap_timm(
    model: nn.Module,
    *,
    exits: str | int | list[int] = "stages",
    input_size: Sequence[int] | None = None,
    head: str = "default",
    head_kwargs: dict | None = None,
    verify: bool = True,
) -> StagedModel:
    """Cut an instantiated timm model into a staged model (shares its modules). See :func:`timm_staged`."""
    if not hasattr(model, "forward_head") or not hasattr(model, "forward_features"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a timm classification model (no forward_features/forward_head)"
        )
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if num_classes < 1:
        raise ConfigError("the timm model has no classifier (num_classes=0); create it with num_classes > 0")
    vit = _is_vit(model)
    if input_size is None:
        if vit and not getattr(model, "dynamic_img_size", False):
            input_size = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
        else:
            input_size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    input_size = tuple(int(s) for s in input_size)
    if len(input_size) != 3:
        raise ConfigError(f"input_size is one sample's (channels, height, width), got {list(input_size)}")
    was_training = model.training
    model.eval()
    try:
        if vit:
            units, head_for, trunk = _vit_units(model, head, head_kwargs, num_classes)
            depth = len(model.blocks)
            positions = list(range(1, depth)) + [len(units) - 1]  # blocks (unit 0 is the embedding); the final norm
            exit_units = resolve_exits(exits, positions, "block", stages=_quarters(depth))
        else:
            units, candidates, head_for, trunk = _cnn_units(model, head, head_kwargs, num_classes, input_size)
            exit_units = resolve_exits(exits, [*candidates, len(units) - 1], "stage")
        final_head = ShellCall(shell(model, set(model._modules) - trunk, keep_direct_tensors=False), "forward_head")
        staged = assemble(
            units, exit_units, final_head, head_for, input_spec=InputSpec(input_size), num_classes=num_classes
        )
        if verify:
            x = torch.randn((1, *input_size), generator=torch.Generator().manual_seed(0))
            check_last_exit(
                model,
                staged,
                x.to(next(model.parameters()).device),
                hint="its forward does more than chain its children, which the timm adapter needs",
            )
    finally:
        model.train(was_training)
    staged.train(was_training)
    return staged


def _cnn_units(model: nn.Module, head: str, head_kwargs: dict | None, num_classes: int, input_size: tuple):
    """Units of a CNN whose forward_features chains its children, stage-end unit indices, head builder, trunk."""
    feature_info = getattr(model, "feature_info", None)
    if not feature_info:
        raise UnsupportedModelError(f"{type(model).__name__} has no feature_info: cannot place stage exits")
    feature_names = [f["module"] for f in feature_info]
    # which top-level children forward_features calls, in call order, and their output shapes (meta copy)
    meta = copy.deepcopy(model).to("meta")
    order: list[str] = []
    shapes: dict[str, tuple] = {}

    def record(module: nn.Module, inputs: object, output: object, name: str) -> None:
        order.append(name)
        shapes[name] = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else ()

    for name, child in meta.named_modules():
        if name:
            child.register_forward_hook(lambda m, i, o, name=name: record(m, i, o, name))
    with torch.no_grad():
        meta.forward_features(torch.empty((1, *input_size), device="meta"))
    del meta
    top = set(model._modules)
    order = [n for n in order if n in top]
    if len(order) != len(set(order)):
        raise UnsupportedModelError(
            f"{type(model).__name__}.forward_features calls a child twice ({order}): cannot cut it"
        )

    names: list[str] = []
    units: list[nn.Module] = []

    def expand(name: str, module: nn.Module) -> None:
        nested = any(f.startswith(name + ".") for f in feature_names)
        if nested and isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            for child_name, child in module.named_children():
                expand(f"{name}.{child_name}", child)
        else:
            names.append(name)
            units.append(module)

    for name in order:
        expand(name, model._modules[name])
    stage_chs: dict[int, int] = {}
    for f in feature_info:
        if f["module"] not in names:
            raise UnsupportedModelError(
                f"feature module {f['module']!r} of {type(model).__name__} is not a unit of its chain"
            )
        if f.get("reduction", 1) >= 4:
            shape = shapes.get(f["module"], ())
            if len(shape) != 3 or shape[0] != int(f["num_chs"]):
                raise UnsupportedModelError(
                    f"{type(model).__name__}: feature {f['module']!r} has shape {list(shape)}, not [channels, h, w] "
                    f"with {f['num_chs']} channels; only NCHW CNNs are supported"
                )
            stage_chs[names.index(f["module"])] = int(f["num_chs"])
    # the last stage ends the backbone: the original classifier's exit covers it
    candidates = sorted(stage_chs)[:-1]
    make = default_head("cnn", head, head_kwargs)
    return units, candidates, lambda i: make(stage_chs[i], num_classes), set(order)


class _ViTEmbed(nn.Module):
    """Patch embedding, class/register tokens and positions of a timm ViT (its own code, on a shell)."""

    def __init__(self, vit_shell: nn.Module) -> None:
        super().__init__()
        self.vit = vit_shell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit
        return v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))


def _vit_units(model: nn.Module, head: str, head_kwargs: dict | None, num_classes: int):
    """Units of a timm ViT (embedding, blocks, final norm), head builder, trunk module names."""
    embed = _ViTEmbed(shell(model, {"patch_embed", "pos_drop", "patch_drop", "norm_pre"}))
    units = [embed, *model.blocks, model.norm]
    dim = int(model.embed_dim)
    has_cls = getattr(model, "cls_token", None) is not None
    pool = "cls" if has_cls and getattr(model, "global_pool", "token") in ("token", "map") else "mean"
    options = {}
    if head in ("default", "vit", "token"):  # token heads read the model's own pooling choice
        options = {"pool": pool, "num_prefix_tokens": int(getattr(model, "num_prefix_tokens", 1))}
    options.update(head_kwargs or {})
    make = default_head("vit", head, options)
    return units, lambda i: make(dim, num_classes), set(_VIT_TRUNK)


def _quarters(depth: int) -> list[int]:
    """Blocks ending each quarter of a ViT of ``depth`` blocks: its ``"stages"`` (4 exits, the last the classifier)."""
    return sorted({max(0, round(depth * k / 4) - 1) for k in (1, 2, 3, 4)})
