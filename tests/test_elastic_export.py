"""A chosen member of an elastic family, materialised, exports to ONNX like any staged model and runs the same.

The elastic CNN's member goes through the ``stages`` export (one file per stage, onnxruntime runner with real
early exit); the elastic ViT's member through the ``graph`` export (one graph with per-sample exits), since the
``stages`` manifest does not yet carry a :class:`~adaptnn.layers.tokens.TokenState`'s integer prefix. Both are
compared with the *elastic* model running that member: exits equal and logits within 1e-4 for every sample whose
score is clear of a threshold.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

import adaptnn
from adaptnn.export import StagesRunner, export_graph, export_stages
from adaptnn.policies import ConfidencePolicy

BAND = 1e-5  # samples whose score lies this close to a threshold may legitimately exit elsewhere
ATOL = 1e-4


def _sharpen(model):
    """Scale the exit heads' weights: an untrained model's confidences all sit near 1/C, too close to threshold."""
    with torch.no_grad():
        for head in model.heads:
            for m in head.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.mul_(30.0)
    return model


def _policy(model, x: torch.Tensor) -> ConfidencePolicy:
    """Confidence thresholds at each exit's median score (between two distinct scores): a real mix of exits."""
    with torch.no_grad():
        scores, _ = ConfidencePolicy([0.5] * (model.num_exits - 1)).scores(model.forward_all(x))
    thresholds = []
    for row in scores[:-1]:
        ordered = torch.unique(row.double()).sort().values
        i = max(len(ordered) // 2, 1)
        thresholds.append(float(ordered[i - 1 : i + 1].mean()))
    return ConfidencePolicy(thresholds)


def _compare(elastic, policy: ConfidencePolicy, x: torch.Tensor, logits, exit_index) -> None:
    """ONNX results == the elastic member's ``run_dynamic`` outside the threshold band."""
    ref = elastic.run_dynamic(x, policy)
    with torch.no_grad():
        scores, _ = policy.scores(elastic.forward_all(x))
    limits = torch.tensor([policy.threshold_at(k) for k in range(elastic.num_exits - 1)]).unsqueeze(1)
    clear = ~((scores[:-1] - limits).abs() < BAND).any(dim=0).numpy()
    assert clear.mean() >= 0.75
    np.testing.assert_array_equal(np.asarray(exit_index)[clear], ref.exit_index.numpy()[clear])
    np.testing.assert_allclose(np.asarray(logits)[clear], ref.logits.numpy()[clear], atol=ATOL, rtol=0)
    assert len(set(np.asarray(exit_index).tolist())) > 1  # early and late exits both exercised


def test_materialised_elastic_cnn_member_exports_in_stages_mode(tmp_path) -> None:
    torch.manual_seed(0)
    elastic = _sharpen(adaptnn.create_model("elastic_cnn_digits", widths=[8, 16, 16, 32]).eval())
    x = torch.randn(24, 1, 8, 8)
    elastic.set_variant(width=0.5, depth=1)
    plain = elastic.materialise()
    policy = _policy(elastic, x)
    out = export_stages(plain, policy, x, tmp_path / "onnx", exporter="torchscript")
    logits, exit_index, _ = StagesRunner(out).run(x.numpy())
    _compare(elastic, policy, x, logits, exit_index)
    never = StagesRunner(out, thresholds=[None] * (elastic.num_exits - 1)).run(x.numpy())[0]
    with torch.no_grad():
        np.testing.assert_allclose(never, elastic(x).numpy(), atol=ATOL, rtol=0)  # last exit == the member


def test_materialised_elastic_vit_member_exports_as_one_graph(tmp_path) -> None:
    torch.manual_seed(0)
    elastic = _sharpen(adaptnn.create_model("elastic_vit_tiny_conv_fmnist", width_mults=[0.5, 1.0]).eval())
    x = torch.randn(16, 1, 28, 28)
    elastic.set_variant(width=0.5, depth=1)
    plain = elastic.materialise()
    policy = _policy(elastic, x)
    path = export_graph(plain, policy, x, tmp_path / "vit.onnx")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(thresholds: list[float]):
        feeds = {"x": x.numpy(), "thresholds": np.asarray(thresholds, dtype=np.float32)}
        return session.run(None, feeds)

    logits, exit_index, _ = run(policy.thresholds)
    _compare(elastic, policy, x, logits, exit_index)
    logits, exit_index, _ = run([2.0] * (elastic.num_exits - 1))  # confidence never exceeds 2: the last exit
    assert (exit_index == elastic.num_exits - 1).all()
    with torch.no_grad():
        np.testing.assert_allclose(logits, elastic(x).numpy(), atol=ATOL, rtol=0)
