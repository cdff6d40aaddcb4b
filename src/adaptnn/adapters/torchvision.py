"""Exits for torchvision classifiers, from explicit segment lists (no tracing of their code).

Supported families and how they are cut (units are run in order, then the original classifier):

* ``ResNet`` (resnet*, resnext*, wide_resnet*): ``conv1, bn1, relu, maxpool, layer1..layer4``; the classifier is
  ``avgpool, flatten, fc``.
* ``MobileNetV2``, ``MobileNetV3``, ``EfficientNet`` (V1 and V2): the entries of ``features``; the classifier is
  average pooling, flatten and ``classifier``.
* ``ConvNeXt``: the entries of ``features``; the classifier is ``avgpool`` then ``classifier``.

``exits="stages"`` puts an exit after the last unit at each spatial resolution with a reduction of 4 or more
(found by propagating shapes on the meta device), except the last, which is the original classifier.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..models._registry import create_model, register_model
from ..runtime.staged import InputSpec, StagedModel
from ._common import assemble, default_head, resolve_exits, stage_ends, trace_shapes

__all__ = ["from_torchvision", "wrap_torchvision", "torchvision_staged"]


@register_model
def torchvision_staged(
    *,
    arch: str = "resnet18",
    exits: str | list[int] = "stages",
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
        exits: ``"stages"`` or a list of stage indices (0-based, negative from the end).
        num_classes: classes of every exit.
        weights: torchvision weights name (e.g. ``"IMAGENET1K_V1"``; downloads them); default none.
        input_size: one sample's shape ``(3, H, W)``.
        head: head kind of the intermediate exits (``"default"``: pool + linear).
        head_kwargs: options of that head (see :func:`adaptnn.heads.make_head`).
        tv_kwargs: extra keyword arguments of the torchvision builder.
        verify: check the cut against the original model on a random input.
    """
    models = importlib.import_module("torchvision.models")
    if arch not in models.list_models(module=models):
        raise ConfigError(f"torchvision has no classification model {arch!r} (see torchvision.models.list_models())")
    model = models.get_model(arch, weights=weights, num_classes=num_classes, **(tv_kwargs or {}))
    return wrap_torchvision(
        model, exits=exits, input_size=input_size, head=head, head_kwargs=head_kwargs, verify=verify
    )


def from_torchvision(
    model: str | nn.Module, exits: str | list[int] = "stages", num_classes: int | None = None, **kwargs: object
) -> StagedModel:
    """Wrap a torchvision classifier (a builder name, or an instance you built/trained) with exits.

    A name goes through :func:`adaptnn.create_model` (``torchvision_staged``) so checkpoints can rebuild it; an
    instance is wrapped in place (its modules and weights are shared, not copied).
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
    raise ConfigError(
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
    exits: str | list[int] = "stages",
    input_size: Sequence[int] = (3, 224, 224),
    head: str = "default",
    head_kwargs: dict | None = None,
    verify: bool = True,
) -> StagedModel:
    """Cut an instantiated torchvision classifier into a staged model (shares its modules)."""
    family = _family(model)
    input_size = tuple(int(s) for s in input_size)
    if len(input_size) != 3:
        raise ConfigError(f"input_size is one sample's (channels, height, width), got {list(input_size)}")
    units, final_head = _units_and_head(model, family)
    num_classes = _num_classes(final_head)
    shapes = trace_shapes(units, input_size)
    candidates = stage_ends(shapes, input_size[-1])[:-1]  # the last stage's exit is the original classifier
    exit_units = resolve_exits(exits, candidates, len(units), "stage")
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
        _verify(model, staged, input_size)
    return staged


def _verify(model: nn.Module, staged: StagedModel, input_size: tuple) -> None:
    was_training = model.training
    model.eval()
    staged.eval()
    try:
        size = (input_size[0], *(min(s, 64) for s in input_size[1:]))
        x = torch.randn((1, *size), generator=torch.Generator().manual_seed(0))
        x = x.to(next(model.parameters()).device)
        with torch.no_grad():
            ref = model(x)
            state = x
            for segment in staged.segments:
                state = segment(state)
            got = staged.heads[-1](state)
    finally:
        model.train(was_training)
        staged.train(was_training)
    if not torch.equal(ref, got):
        raise ConfigError(f"cutting {type(model).__name__} changed its output: this variant is not supported")
