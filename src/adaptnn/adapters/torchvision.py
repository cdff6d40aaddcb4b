"""Exits for torchvision classifiers, from explicit segment lists (no tracing of their code).

Supported families and how they are cut (units are run in order, then the original classifier):

* ``ResNet`` (resnet*, resnext*, wide_resnet*): ``conv1, bn1, relu, maxpool, layer1..layer4``; the classifier is
  ``avgpool, flatten, fc``.
* ``MobileNetV2``, ``MobileNetV3``, ``EfficientNet`` (V1 and V2): the entries of ``features``; the classifier is
  average pooling, flatten and ``classifier``.
* ``ConvNeXt``: the entries of ``features``; the classifier is ``avgpool`` then ``classifier``.

The exit positions are the stage ends: the last unit at each spatial resolution with a reduction of 4 or more
(found by propagating shapes on the meta device); the last one's exit is the original classifier. ``exits=``
chooses among them as for every adapter (:func:`adaptnn.adapters._common.resolve_exits`; default ``"stages"``:
every stage end), and the last exit is checked against the original model when the model is wrapped
(:func:`~adaptnn.adapters._common.check_last_exit`).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..models._registry import CheckpointArg, create_model, register_model
from ..runtime.staged import InputSpec, StagedModel
from ._common import (
    HEAD_OPTIONS,
    assemble,
    check_last_exit,
    default_head,
    plain_name,
    resolve_exits,
    stage_ends,
    trace_shapes,
)

__all__ = ["from_torchvision", "wrap_torchvision", "torchvision_staged"]


#: ``tv_kwargs`` a checkpoint may set: architecture numbers and switches of the supported builders' constructors;
#: others (``weights_backbone``, ``progress``, callables) need ``trust_code``.
_TV_OPTIONS: dict[str, CheckpointArg] = {
    **{k: CheckpointArg(float) for k in ("dropout", "stochastic_depth_prob", "layer_scale")},
    "width_mult": CheckpointArg(float, bounds=(0, 64)),
    **{k: CheckpointArg(int, bounds=(0, 4096)) for k in ("groups", "width_per_group", "round_nearest")},
    **{k: CheckpointArg(bool) for k in ("zero_init_residual", "reduced_tail", "dilated")},
    "replace_stride_with_dilation": CheckpointArg(list[bool] | None),
    "last_channel": CheckpointArg(int | None),
}


@register_model(
    checkpoint_args={
        "arch": CheckpointArg(trusted=lambda v: not plain_name(v), why="it is not a plain torchvision builder name"),
        # the weights come from the checkpoint: never download torchvision's when rebuilding from one
        "weights": CheckpointArg(on_load=None),
        "input_size": CheckpointArg(bounds=(1, 4096)),
        "head_kwargs": HEAD_OPTIONS,
        "tv_kwargs": CheckpointArg(keys=_TV_OPTIONS),
    },
    build_on_meta=True,
)
def torchvision_staged(
    *,
    arch: str = "resnet18",
    exits: str | int | list[int] = "stages",
    num_classes: int = 1000,
    weights: str | None = None,
    input_size: Sequence[int] = (3, 224, 224),
    head: str = "default",
    head_kwargs: dict | None = None,
    tv_kwargs: dict | None = None,
    verify: bool = True,
) -> StagedModel:
    """A torchvision classifier with exits at stage boundaries; registered so checkpoints can rebuild it.

    Args:
        arch: torchvision model builder name, e.g. ``"resnet50"``, ``"mobilenet_v3_large"``.
        exits: where the exits sit, as for every adapter (see :func:`adaptnn.adapters._common.resolve_exits`):
            ``"stages"`` (every stage end) or a list of stage indices.
        num_classes: classes of every exit.
        weights: torchvision weights name (e.g. ``"IMAGENET1K_V1"``; downloads them); default none.
        input_size: one sample's shape ``(3, H, W)``.
        head: head kind of the intermediate exits (``"default"``: pool + linear).
        head_kwargs: options of that head (see :func:`adaptnn.layers.heads.make_head`).
        tv_kwargs: extra keyword arguments of the torchvision builder.
        verify: check the last exit against the original model on a random input (see
            :func:`~adaptnn.adapters._common.check_last_exit`).
    """
    models = importlib.import_module("torchvision.models")
    if arch not in models.list_models(module=models):
        raise ConfigError(f"torchvision has no classification model {arch!r} (see torchvision.models.list_models())")
    model = models.get_model(arch, weights=weights, num_classes=num_classes, **(tv_kwargs or {}))
    return wrap_torchvision(
        model, exits=exits, input_size=input_size, head=head, head_kwargs=head_kwargs, verify=verify
    )


def from_torchvision(
    model: str | nn.Module, exits: str | int | list[int] = "stages", num_classes: int | None = None, **kwargs: object
) -> StagedModel:
    """Wrap a torchvision classifier (a builder name, or an instance you built/trained) with exits.

    A name goes through :func:`adaptnn.create_model` (``torchvision_staged``) so checkpoints can rebuild it; an
    instance is wrapped in place (its modules and weights are shared, not copied). ``exits``: see
    :func:`torchvision_staged`.
    """
    if isinstance(model, str):
        return create_model(
            "torchvision_staged",
            arch=model,
            exits=exits,
            num_classes=1000 if num_classes is None else num_classes,
            **kwargs,
        )
    return wrap_torchvision(model, exits=exits, **kwargs)


def _family(model: nn.Module) -> str:
    tv = importlib.import_module("torchvision.models")
    for name in ("ResNet", "MobileNetV2", "MobileNetV3", "EfficientNet", "ConvNeXt"):
        if isinstance(model, getattr(tv, name)):
            return name
    raise UnsupportedModelError(
        f"the torchvision adapter supports ResNet, MobileNetV2/V3, EfficientNet and ConvNeXt, got "
        f"{type(model).__name__}"
    )


def _units_and_head(model: nn.Module, family: str) -> tuple[list[nn.Module], nn.Module]:
    if family == "ResNet":
        units = [model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3]
        return [*units, model.layer4], nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
    units = list(model.features)
    if family == "ConvNeXt":
        return units, nn.Sequential(model.avgpool, model.classifier)
    pool = model.avgpool if hasattr(model, "avgpool") else nn.AdaptiveAvgPool2d((1, 1))  # MobileNetV2 pools in forward
    return units, nn.Sequential(pool, nn.Flatten(1), model.classifier)


def _num_classes(head: nn.Module) -> int:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].out_features)


def wrap_torchvision(
    model: nn.Module,
    *,
    exits: str | int | list[int] = "stages",
    input_size: Sequence[int] = (3, 224, 224),
    head: str = "default",
    head_kwargs: dict | None = None,
    verify: bool = True,
) -> StagedModel:
    """Cut an instantiated torchvision classifier into a staged model (shares its modules).

    See :func:`torchvision_staged`.
    """
    family = _family(model)
    input_size = tuple(int(s) for s in input_size)
    if len(input_size) != 3:
        raise ConfigError(f"input_size is one sample's (channels, height, width), got {list(input_size)}")
    units, final_head = _units_and_head(model, family)
    num_classes = _num_classes(final_head)
    shapes = trace_shapes(units, input_size)
    positions = stage_ends(shapes, input_size[-1])  # the last one's exit is the original classifier
    exit_units = resolve_exits(exits, positions, "stage")
    make = default_head("cnn", head, head_kwargs)
    staged = assemble(
        units,
        exit_units,
        final_head,
        lambda i: make(shapes[i][0], num_classes),
        input_spec=InputSpec(input_size),
        num_classes=num_classes,
    )
    staged.train(model.training)
    if verify:
        size = (input_size[0], *(min(s, 64) for s in input_size[1:]))  # small: the check only needs some input
        x = torch.randn((1, *size), generator=torch.Generator().manual_seed(0))
        check_last_exit(model, staged, x.to(next(model.parameters()).device))
    return staged
