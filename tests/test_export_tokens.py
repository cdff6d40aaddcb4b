"""ONNX export and serving of token-state models (ViTs): the ``TokenState`` between stages crosses the ONNX
boundary as tensors plus a constant ``prefix`` recorded in the manifest (validated on load), and is rebuilt as a
``TokenState`` (a registered state type, never a class named by the manifest)."""

from __future__ import annotations

import json
import math
import shutil
from typing import NamedTuple

import numpy as np
import onnxruntime  # noqa: F401  (the export extra)
import pytest
import torch

from adaptnn import ConfidencePolicy, ConfigError, create_model
from adaptnn.export import StagesRunner, export_graph, export_stages, read_manifest
from adaptnn.export.manifest import rebuild_state, state_tree
from adaptnn.export.stages import LOGITS_ATOL
from adaptnn.layers.tokens import TokenKnob, TokenState, set_token_knob
from adaptnn.serve import Engine, OnnxBackend, TorchBackend
from test_export_stages import _assert_matches, _between, _scores

N = 16


def _vit(knob: TokenKnob | None = None, **kwargs):
    torch.manual_seed(0)
    args = {"embed_dim": 32, "depth": 2, "num_heads": 2, "exits": [0], **kwargs}
    model = create_model("vit_tiny_conv_fmnist", **args)
    model = set_token_knob(model, knob).eval()
    return model, torch.randn(N, 1, 28, 28)


def _policy(model, x) -> ConfidencePolicy:
    scores = _scores(model, ConfidencePolicy([math.inf] * (model.num_exits - 1)), x)
    return ConfidencePolicy([_between(scores[k], 0.5) for k in range(model.num_exits - 1)])


_EXPORTS: dict[str, tuple] = {}


def _exported(name: str, tmp_path_factory) -> tuple:
    """``(name, model, policy, x, export dir)`` of the plain or the ToMe-reduced ViT, exported once per module."""
    if name not in _EXPORTS:
        model, x = _vit(None if name == "plain" else TokenKnob("tome", 8))
        policy = _policy(model, x)
        _EXPORTS[name] = (name, model, policy, x, export_stages(model, policy, x, tmp_path_factory.mktemp(name) / "o"))
    return _EXPORTS[name]


@pytest.fixture(scope="module", params=["plain", "tome"])
def vit_export(request, tmp_path_factory):
    return _exported(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def plain_export(tmp_path_factory):
    return _exported("plain", tmp_path_factory)


def test_vit_stages_match_run_dynamic(vit_export) -> None:
    name, model, policy, x, out = vit_export
    manifest = read_manifest(out)
    assert manifest["exporter"] == ["dynamo"]
    node = manifest["stages"][1]["state_in"]["items"][0]  # (model state, policy state): the model's TokenState
    assert node["kind"] == "named" and node["type"] == "token_state"
    assert dict(zip(node["fields"], node["items"], strict=True))["prefix"] == {"kind": "const", "value": 1}
    runner = StagesRunner(out)
    exits = _assert_matches(model, policy, x, runner)
    assert 0 < int((exits == 0).sum()) < len(x)  # both exits taken: the carried token state is compacted
    _assert_matches(model, policy, x[:1], runner)
    _assert_matches(model, policy, torch.cat([x, x[:3]]), runner)  # a batch size not seen at export
    tokens = runner.run_stage(0, [x.numpy()])[0][0]
    assert tokens.shape[1] == (50 if name == "plain" else 50 - 8)  # ToMe merged 8 tokens in stage 0's one block


def test_engine_with_onnx_backend_decides_like_run_dynamic(vit_export) -> None:
    _, model, policy, x, out = vit_export
    reference = model.run_dynamic(x, policy)
    for backend in (OnnxBackend(out), TorchBackend(model, policy)):
        engine = Engine(backend, max_batch=5)
        requests = [engine.submit(x[a:b]) for a, b in ((0, 3), (3, 10), (10, N))]
        engine.step()
        requests.append(engine.submit(x[:2]))  # joins rows of other requests at a later stage
        engine.drain()
        exits = torch.cat([r.result.exit_index for r in requests])
        logits = torch.cat([r.result.logits for r in requests])
        assert torch.equal(exits, torch.cat([reference.exit_index, reference.exit_index[:2]]))
        torch.testing.assert_close(
            logits, torch.cat([reference.logits, reference.logits[:2]]), atol=LOGITS_ATOL, rtol=1e-4
        )


def _crafted(out, tmp_path, edit) -> StagesRunner:
    crafted = tmp_path / "crafted"
    shutil.rmtree(crafted, ignore_errors=True)
    shutil.copytree(out, crafted)
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest["stages"][1]["state_in"]["items"][0])
    (crafted / "manifest.json").write_text(json.dumps(manifest))
    return StagesRunner(crafted)


def _set_field(name, value):
    def edit(node):
        node["items"][node["fields"].index(name)] = value

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (_set_field("prefix", {"kind": "const", "value": -1}), "prefix must be an integer in 0..65536"),
        (_set_field("prefix", {"kind": "const", "value": "1"}), "prefix must be an integer"),
        (_set_field("prefix", {"kind": "const", "value": True}), "prefix must be an integer"),
        (_set_field("prefix", {"kind": "const", "value": 10**12}), "prefix must be an integer"),
        (_set_field("prefix", {"kind": "tensor", "index": 0}), "prefix must be a constant node"),
        (_set_field("size", {"kind": "const", "value": 1}), "size is not a constant field"),
        (lambda node: node.update(type="builtins.eval"), "unknown state type 'builtins.eval'"),
        (lambda node: node.update(type="adaptnn.layers.tokens.TokenState"), "unknown state type"),
        (lambda node: node.update(fields=node["fields"][::-1]), "must list the fields"),
        (lambda node: node["items"].pop(), "must list the fields"),
        (lambda node: node.update(kind="const", value=1), "constant node outside"),
    ],
)
def test_hostile_token_manifest_is_refused_in_one_line(plain_export, tmp_path, edit, match) -> None:
    out = plain_export[-1]
    with pytest.raises(ConfigError, match=match) as info:
        _crafted(out, tmp_path, edit)
    assert "\n" not in str(info.value) and "stage 1 is malformed" in str(info.value)


class _Unregistered(NamedTuple):
    tokens: torch.Tensor
    prefix: int = 1


def test_token_state_tree_round_trip_and_refusals() -> None:
    tokens, size = torch.randn(2, 5, 4), torch.ones(2, 5, 1)
    state = (TokenState(tokens, size, None, 3), None)
    tree, tensors = state_tree(state)
    assert len(tensors) == 2  # tokens and size; None fields and the prefix are no tensors
    back = rebuild_state(json.loads(json.dumps(tree)), tensors)
    assert type(back[0]) is TokenState and back[0].prefix == 3 and back[0].source is None and back[1] is None
    assert back[0].tokens is tokens and back[0].size is size
    with pytest.raises(ConfigError, match="_Unregistered, a NamedTuple no adaptnn module registered"):
        state_tree(_Unregistered(tokens))
    with pytest.raises(ConfigError, match=r"prefix must be an integer in 0\.\.65536, got -2"):
        state_tree(TokenState(tokens, prefix=-2))
    bad = json.loads(json.dumps(tree))
    bad["items"][0]["type"] = "os.system"
    with pytest.raises(ConfigError, match="unknown state type 'os.system'"):
        rebuild_state(bad, tensors)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["evit", "dvt", "elastic", "timm_registers", "evit_graph"])
def test_token_families_export(family, tmp_path) -> None:
    """EViT (a stable sort, exported as TopK), DVT (a CascadeState holding a TokenState), the elastic ViT and a timm
    ViT with register tokens (prefix 3) with ToMe, in stages mode; EViT in graph mode too."""
    torch.manual_seed(0)
    x = torch.randn(N, 1, 28, 28)
    if family.startswith("evit"):
        model, x = _vit(TokenKnob("evit", 0.5), depth=3, exits=[0, 1])
    elif family == "dvt":
        model = create_model("dvt_vit_tiny_conv_fmnist", embed_dim=32, depth=1).eval()
    elif family == "elastic":
        model = create_model("elastic_vit_tiny_conv_fmnist", embed_dim=32, num_heads=2).eval()
    else:
        from timm.models.vision_transformer import VisionTransformer

        from adaptnn.adapters.vit_tokens import token_vit

        vit = VisionTransformer(
            img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, reg_tokens=2
        )
        model = set_token_knob(token_vit(vit.eval(), exits=[0]), TokenKnob("tome", 2)).eval()
        x = torch.randn(N, 3, 32, 32)
    policy = _policy(model, x)
    if family == "evit_graph":
        export_graph(model, policy, x, tmp_path / "vit.onnx")  # verified against run_dynamic before it is written
        return
    out = export_stages(model, policy, x, tmp_path / "onnx")
    _assert_matches(model, policy, x, StagesRunner(out))
    if family == "timm_registers":
        node = read_manifest(out)["stages"][1]["state_in"]["items"][0]
        assert dict(zip(node["fields"], node["items"], strict=True))["prefix"]["value"] == 3
    assert np.isfinite(StagesRunner(out).run(x)[0]).all()
