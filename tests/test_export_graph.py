"""In-graph early exit in ONNX (one graph, any batch) and the batch-1 ``If`` export, checked against run_dynamic.

Every backbone family (mecnn, MSDNet, a timm CNN, torchvision, the Hugging Face encoder) is exported once per mode
(module fixtures); thresholds are graph inputs, so every scenario (mixed exits, everyone leaving at the first exit,
nobody leaving early, recalibrated thresholds, batch 1) runs the same file. ``cond`` is checked on mecnn in the
unit tier and on every other family in the slow tier.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from adaptnn import ConfidencePolicy, create_model
from adaptnn.export.cond import export_cond
from adaptnn.export.graph import export_graph
from adaptnn.policies import EntropyPolicy, MarginPolicy
from adaptnn.policies.base import ThresholdPolicy

BAND = 1e-5  # samples whose score lies this close to a threshold may legitimately exit elsewhere


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _quantile_thresholds(policy: ThresholdPolicy, outs: list[torch.Tensor], q: float) -> list[float]:
    """Thresholds between two neighbouring scores at each exit's ``q`` quantile (never exactly on a score)."""
    scores, _ = policy.scores(outs)
    thresholds = []
    for row in scores[:-1]:
        ordered = torch.unique(row.double()).sort().values  # distinct scores: ties never straddle a threshold
        i = min(max(int(q * len(ordered)), 1), len(ordered) - 1)
        thresholds.append(float(ordered[i - 1 : i + 1].mean()))
    return thresholds


def _feeds(x: torch.Tensor, policy: ThresholdPolicy, num_exits: int) -> dict[str, np.ndarray]:
    thresholds = [policy.threshold_at(k) for k in range(num_exits - 1)]
    feeds = {"x": x.numpy(), "thresholds": np.asarray(thresholds, dtype=np.float32)}
    if policy.temperatures is not None:
        feeds["temperatures"] = np.asarray(policy.temperatures, dtype=np.float32)
    return feeds


def _check_against_dynamic(session, model, policy: ThresholdPolicy, x: torch.Tensor) -> np.ndarray:
    """ORT outputs == run_dynamic outside the threshold band; returns the ORT exit indices."""
    logits, exit_index, macs = session.run(None, _feeds(x, policy, model.num_exits))
    ref = model.run_dynamic(x, policy)
    with torch.no_grad():
        scores, _ = policy.scores(model.forward_all(x))
    limits = torch.tensor([policy.threshold_at(k) for k in range(model.num_exits - 1)]).unsqueeze(1)
    near = ((scores[:-1] - limits).abs() < BAND).any(dim=0).numpy()
    clear = ~near
    assert len(clear) < 8 or clear.mean() >= 0.75  # the band excuses only a few samples
    assert logits.shape == tuple(ref.logits.shape) and exit_index.dtype == np.int64
    np.testing.assert_array_equal(exit_index[clear], ref.exit_index.numpy()[clear])
    np.testing.assert_allclose(logits[clear], ref.logits.numpy()[clear], atol=1e-4, rtol=0)
    np.testing.assert_allclose(macs[clear], ref.macs.numpy()[clear], rtol=1e-9)
    return exit_index


def tiny_bert(batch: int, seq: int = 9):
    """A random-weight 3-layer BERT classifier (exits after layers 0 and 1) and padded token ids."""
    import transformers

    from adaptnn.adapters.hf import wrap_hf

    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=4,
    )
    model = wrap_hf(transformers.BertForSequenceClassification(config).eval(), exits=[0, 1]).eval()
    ids = torch.randint(1, 100, (batch, seq))
    ids[::3, 6:] = 0  # padded rows: the mask in the state must follow the compaction
    return model, ids


def _registered(name: str, **kwargs):
    def build(batch: int):
        model = create_model(name, **kwargs).eval()
        return model, torch.randn(batch, *model.input_spec.shape)

    return build


def _build(factory, batch: int):
    torch.manual_seed(0)
    model, x = factory(batch)
    with torch.no_grad():
        outs = model.forward_all(x)
    return model, x, outs


CASES = {
    # model factory, policy family, temperature scale (None: no temperatures input)
    "mecnn_digits": (_registered("mecnn_digits"), EntropyPolicy, 0.01),
    "msdnet_test_tiny": (_registered("msdnet_test_tiny"), ConfidencePolicy, None),
    "timm_test_resnet": (
        _registered("timm_staged", arch="test_resnet", num_classes=7, input_size=(3, 32, 32)),
        MarginPolicy,
        None,
    ),
    "torchvision_resnet18": (
        _registered("torchvision_staged", arch="resnet18", num_classes=5, input_size=(3, 32, 32)),
        ConfidencePolicy,
        0.05,
    ),
    "hf_tiny_bert": (tiny_bert, ConfidencePolicy, None),
}


def _calibrated(name: str, model, outs, q: float = 0.5) -> ThresholdPolicy:
    _, family, scale = CASES[name]
    # random-weight logits are nearly uniform: small temperatures spread the scores well beyond BAND
    temps = None if scale is None else [scale * (1.0 + 0.25 * k) for k in range(model.num_exits)]
    policy = family([0.5] * (model.num_exits - 1), temperatures=temps)
    return policy.with_thresholds(_quantile_thresholds(policy, outs, q))


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    model, x, outs = _build(CASES[request.param][0], 24)
    policy = _calibrated(request.param, model, outs)
    path = export_graph(model, policy, x, tmp_path_factory.mktemp("graph") / f"{request.param}.onnx")
    return model, x, outs, policy, _session(path)


def test_graph_inputs_and_outputs(exported):
    model, _, _, policy, session = exported
    names = [i.name for i in session.get_inputs()]
    assert names == (["x", "thresholds", "temperatures"] if policy.temperatures else ["x", "thresholds"])
    assert [o.name for o in session.get_outputs()] == ["logits", "exit_index", "macs"]


def test_mixed_exits_match_run_dynamic(exported):
    model, x, _, policy, session = exported
    exits = _check_against_dynamic(session, model, policy, x)
    assert len(set(exits.tolist())) >= 2  # really mixed: the compaction path is exercised


def test_runtime_thresholds_change_exits_like_run_dynamic(exported):
    model, x, outs, policy, session = exported
    base = session.run(None, _feeds(x, policy, model.num_exits))[1]
    for q in (0.2, 0.8):
        other = policy.with_thresholds(_quantile_thresholds(policy, outs, q))
        exits = _check_against_dynamic(session, model, other, x)
        assert not np.array_equal(exits, base)  # a new calibration moves exits without a re-export


def test_runtime_temperatures_match_run_dynamic(exported):
    model, x, _, policy, session = exported
    if policy.temperatures is None:  # exported without temperatures: the graph takes none at run time
        assert "temperatures" not in [i.name for i in session.get_inputs()]
        return
    refitted = type(policy)(policy.thresholds, temperatures=[t * 1.5 for t in policy.temperatures])
    exits = _check_against_dynamic(session, model, refitted, x)
    assert not np.array_equal(exits, session.run(None, _feeds(x, policy, model.num_exits))[1])


def test_everyone_leaves_first_zero_survivors(exported):
    model, x, _, policy, session = exported
    everyone = policy.with_thresholds([-1.0] * (model.num_exits - 1))  # later stages see a 0-row batch
    exits = _check_against_dynamic(session, model, everyone, x)
    assert (exits == 0).all()


def test_nobody_leaves_early(exported):
    model, x, _, policy, session = exported
    nobody = policy.with_thresholds([math.inf] * (model.num_exits - 1))
    exits = _check_against_dynamic(session, model, nobody, x)
    assert (exits == model.num_exits - 1).all()


def test_batch_one_and_other_batch_sizes(exported):
    model, x, _, policy, session = exported
    for n in (1, 3):
        _check_against_dynamic(session, model, policy, x[:n])


@pytest.mark.parametrize("exported", ["hf_tiny_bert"], indirect=True)
def test_token_length_is_dynamic_for_the_hf_encoder(exported):
    model, x, _, policy, session = exported
    assert model.input_spec.shape == (None,)
    assert session.get_inputs()[0].shape[1] != x.shape[1]  # symbolic, not the example's 9 tokens
    for ids in (x[:, :4], torch.cat([x, x[:, :6]], dim=1)):  # shorter and longer than the example
        _check_against_dynamic(session, model, policy, ids)  # MACs follow the length too


def _check_cond(name: str, tmp_path) -> None:
    """``cond`` at batch 1 == run_dynamic sample by sample, also with thresholds changed at run time."""
    model, x, outs = _build(CASES[name][0], 16)
    policy = _calibrated(name, model, outs)
    path = export_cond(model, policy, x, tmp_path / "cond.onnx")  # verified on 8 samples before writing
    graph = onnx.load(str(path)).graph
    assert sum(node.op_type == "If" for node in graph.node) == 1  # nested: the others live in its branches
    session = _session(path)
    seen: set[int] = set()
    for q in (0.2, 0.5, 0.8):  # thresholds are inputs: other calibrations, same file
        other = policy.with_thresholds(_quantile_thresholds(policy, outs, q))
        exits = model.run_dynamic(x, other).exit_index
        got = [_check_against_dynamic(session, model, other, x[i : i + 1]).item() for i in range(x.shape[0])]
        assert got == exits.tolist()  # thresholds sit between neighbouring scores: no sample is in the band
        seen.update(got)
    assert seen == set(range(model.num_exits))  # samples leaving at every exit, each branch taken
    everyone = policy.with_thresholds([-1.0] * (model.num_exits - 1))
    assert _check_against_dynamic(session, model, everyone, x[:1]).tolist() == [0]


def test_cond_export_batch_one_matches_run_dynamic(tmp_path):
    _check_cond("mecnn_digits", tmp_path)


@pytest.mark.slow  # one cond export per family (the unit tier covers mecnn)
@pytest.mark.parametrize("name", [n for n in CASES if n != "mecnn_digits"])
def test_cond_export_every_family(name, tmp_path):
    _check_cond(name, tmp_path)


class _GatherThenConv(torch.nn.Module):
    """relu(conv(x)) -> nonzero/index_select -> conv -> conv: the shape of an exit graph's compaction."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x))
        keep = torch.nonzero(h.mean(dim=(1, 2, 3)) > h.mean()).squeeze(1)
        torch._check(keep.shape[0] != 0)
        return self.c3(self.c2(h.index_select(0, keep)))


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="AOTInductor (torch 2.14.1, CPU) returns silently wrong values after a data-dependent gather "
    "(observed: max error 0.67 on outputs of magnitude 0.64; torch.export itself is exact): never use AOTInductor "
    "for exit graphs. A strict XPASS means a release fixed it.",
)
def test_aotinductor_trap_after_data_dependent_gather(tmp_path):
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    model = _GatherThenConv().eval()
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        assert torch.equal(program.module()(x), expected)  # the exported program is right
        package = aoti_compile_and_package(program, package_path=str(tmp_path / "gather.pt2"))
        got = aoti_load_package(package)(x)
    assert got.shape == expected.shape  # the shapes are right: only the values are not
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
