"""In-graph early exit in ONNX (one graph, any batch) and the batch-1 ``If`` export, checked against run_dynamic.

Each model is exported once (module fixtures); thresholds are graph inputs, so every scenario (mixed exits,
everyone leaving at the first exit, nobody leaving early, recalibrated thresholds, batch 1) runs the same file.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from adaptnn import ConfidencePolicy, ConfigError, create_model
from adaptnn.export.cond import export_cond
from adaptnn.export.graph import export_graph
from adaptnn.policies import EntropyPolicy, MarginPolicy, PatiencePolicy
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
        ordered = row.sort().values
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


def _build(name: str, batch: int, **kwargs):
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    x = torch.randn(batch, *model.input_spec.shape)
    with torch.no_grad():
        outs = model.forward_all(x)
    return model, x, outs


CASES = {
    # model name, create kwargs, policy family, temperature scale (None: no temperatures input)
    "mecnn_digits": ("mecnn_digits", {}, EntropyPolicy, 0.01),
    "msdnet_test_tiny": ("msdnet_test_tiny", {}, ConfidencePolicy, None),
    "timm_test_resnet": (
        "timm_staged",
        {"arch": "test_resnet", "num_classes": 7, "input_size": (3, 32, 32)},
        MarginPolicy,
        None,
    ),
    "torchvision_resnet18": (
        "torchvision_staged",
        {"arch": "resnet18", "num_classes": 5, "input_size": (3, 32, 32)},
        ConfidencePolicy,
        0.05,
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    name, kwargs, family, scale = CASES[request.param]
    model, x, outs = _build(name, 24, **kwargs)
    # random-weight logits are nearly uniform: small temperatures spread the scores well beyond BAND
    temps = None if scale is None else [scale * (1.0 + 0.25 * k) for k in range(model.num_exits)]
    policy = family([0.5] * (model.num_exits - 1), temperatures=temps)
    policy = policy.with_thresholds(_quantile_thresholds(policy, outs, 0.5))
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


def test_stateful_policy_is_refused(tmp_path):
    model, x, _ = _build("mecnn_digits", 2)
    with pytest.raises(ConfigError, match="patience"):
        export_graph(model, PatiencePolicy(1), x, tmp_path / "p.onnx")
    with pytest.raises(ConfigError, match="patience"):
        export_cond(model, PatiencePolicy(1), x, tmp_path / "p.onnx")
    assert not (tmp_path / "p.onnx").exists()


def test_cond_export_batch_one_matches_run_dynamic(tmp_path):
    model, x, outs = _build("mecnn_digits", 24)
    policy = ConfidencePolicy([0.5] * (model.num_exits - 1), temperatures=[0.01] * model.num_exits)
    policy = policy.with_thresholds(_quantile_thresholds(policy, outs, 0.5))
    path = export_cond(model, policy, x[:1], tmp_path / "cond.onnx")
    graph = onnx.load(str(path)).graph
    assert sum(node.op_type == "If" for node in graph.node) == 1  # nested: the others live in its branches
    session = _session(path)
    seen, exits = set(), model.run_dynamic(x, policy).exit_index
    for i in range(x.shape[0]):
        got = _check_against_dynamic(session, model, policy, x[i : i + 1]).tolist()
        seen.update(got)
        assert got == [int(exits[i])]  # thresholds sit between neighbouring scores: no sample is in the band
    assert seen == set(range(model.num_exits))  # samples leaving at every exit, each branch taken
    everyone = policy.with_thresholds([-1.0] * (model.num_exits - 1))
    assert _check_against_dynamic(session, model, everyone, x[:1]).tolist() == [0]


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
