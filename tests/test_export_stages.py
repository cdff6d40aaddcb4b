"""ONNX ``stages`` export: one file per stage + manifest, run by onnxruntime with real early exit.

Every family exports, and the onnxruntime runner reproduces ``run_dynamic``: same exit for every sample whose
score is not within the band of a threshold, logits within 1e-4; thresholds changed at run time move the exits
exactly as ``run_dynamic`` with those thresholds. Manifests are data: ``..`` and absolute paths are refused.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnxruntime  # noqa: E402,F401  (the export extra: installed by the dev extra, so CI always runs this file)
import pytest
import torch

from adaptnn import ConfigError, create_model
from adaptnn.export import StagesRunner, export_stages, read_manifest
from adaptnn.export.stages import LOGITS_ATOL, SCORE_BAND
from adaptnn.policies import ConfidencePolicy, EntropyPolicy, MarginPolicy
from test_export_graph import tiny_bert  # the same tiny Hugging Face encoder in every mode


def _digits():
    return create_model("mecnn_digits").eval(), torch.randn(24, 1, 8, 8)


def _msdnet():
    return create_model("msdnet_test_tiny").eval(), torch.randn(16, 3, 16, 16)


def _timm():
    model = create_model("timm_staged", arch="test_resnet", num_classes=7, input_size=(3, 32, 32), exits=[1, -1])
    return model.eval(), torch.randn(12, 3, 32, 32)


def _torchvision():
    model = create_model("torchvision_staged", arch="resnet18", num_classes=5, input_size=(3, 32, 32), exits=[1, -1])
    return model.eval(), torch.randn(12, 3, 32, 32)


def _hf():
    return tiny_bert(12)  # a random 3-layer BERT: the packaged MiniLM runs in the slow tier


FAMILIES = {"mecnn_digits": _digits, "msdnet_test_tiny": _msdnet, "timm": _timm, "torchvision": _torchvision, "hf": _hf}


def _between(scores: torch.Tensor, q: float) -> float:
    """A threshold strictly between two observed scores, far from both (no sample sits on the band)."""
    values = torch.unique(scores.double()).sort().values
    i = min(max(int(q * len(values)), 1), len(values) - 1)
    return float((values[i - 1] + values[i]) / 2)


def _scores(model, policy, x):
    with torch.no_grad():
        return policy.scores(model.forward_all(x))[0]


def _assert_matches(model, policy, x, runner, thresholds=None):
    ref = model.run_dynamic(x, policy)
    logits, exit_index, macs = runner.run(x, thresholds=thresholds)
    scores = _scores(model, policy, x)
    t = torch.tensor([policy.threshold_at(k) for k in range(model.num_exits - 1)], dtype=torch.float64)
    near = ((scores[:-1].double() - t[:, None]).abs() <= SCORE_BAND).any(0)
    exits = torch.from_numpy(exit_index)
    assert torch.equal(exits[~near], ref.exit_index[~near])
    same = exits == ref.exit_index
    torch.testing.assert_close(torch.from_numpy(logits)[same], ref.logits[same].float(), atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_allclose(macs[same.numpy()], ref.macs[same].numpy())
    return exits


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, tmp_path_factory):
    torch.manual_seed(0)
    model, x = FAMILIES[request.param]()
    scores = _scores(model, ConfidencePolicy([math.inf] * (model.num_exits - 1)), x)
    policy = ConfidencePolicy([_between(scores[k], 0.5) for k in range(model.num_exits - 1)])
    out = export_stages(model, policy, x, tmp_path_factory.mktemp(request.param) / "onnx")
    return request.param, model, policy, x, out


def test_stages_match_run_dynamic(exported):
    name, model, policy, x, out = exported
    manifest = read_manifest(out)
    assert manifest["num_exits"] == model.num_exits and len(manifest["stages"]) == model.num_exits
    assert manifest["exporter"] == ["dynamo"], f"{name} needed the TorchScript exporter"
    runner = StagesRunner(out)
    exits = _assert_matches(model, policy, x, runner)
    assert 0 < int((exits == 0).sum()) < len(x)  # a real mix of exits: compaction is exercised
    _assert_matches(model, policy, x[:1], runner)
    # batch size not seen at export
    _assert_matches(model, policy, torch.cat([x, x[:3]]), runner)
    if name == "hf":  # the token dim is dynamic too: shorter and longer sequences than the example
        assert manifest["input"]["shape"] == [None]
        _assert_matches(model, policy, x[:, :5], runner)
        _assert_matches(model, policy, torch.cat([x, x[:, :7]], dim=1), runner)


def test_thresholds_changed_at_run_time(exported):
    _, model, policy, x, out = exported
    scores = _scores(model, policy, x)
    runner = StagesRunner(out)
    for q in (0.2, 0.8):
        thresholds = [_between(scores[k], q) for k in range(model.num_exits - 1)]
        _assert_matches(model, policy.with_thresholds(thresholds), x, runner, thresholds=thresholds)
    runner.thresholds = [-math.inf] * (model.num_exits - 1)
    assert (runner.run(x)[1] == 0).all()
    assert (StagesRunner(out, thresholds=[None] * (model.num_exits - 1)).run(x)[1] == model.num_exits - 1).all()


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    torch.manual_seed(1)
    model, x = _digits()
    policy = EntropyPolicy([0.01, 0.02, 0.03], temperatures=[1.5, 1.0, 0.5, 1.0])
    out = export_stages(model, policy, x, tmp_path_factory.mktemp("entropy") / "onnx", exporter="torchscript")
    return model, policy, x, out


def test_entropy_with_temperatures_and_torchscript_exporter(digits_export):
    model, policy, x, out = digits_export
    manifest = read_manifest(out)
    assert manifest["exporter"] == ["torchscript"] and manifest["temperatures"] == [1.5, 1.0, 0.5, 1.0]
    assert manifest["policy"]["name"] == "entropy"
    _assert_matches(model, policy, x, StagesRunner(out))


def test_manifest_cannot_point_outside(digits_export, tmp_path):
    _, _, _, out = digits_export
    (tmp_path / "secret.onnx").write_bytes(b"")
    for bad in ("../secret.onnx", str(tmp_path / "secret.onnx"), "sub/../../secret.onnx"):
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["stages"][0]["file"] = bad
        crafted = tmp_path / f"crafted{abs(hash(bad))}"
        crafted.mkdir()
        for f in out.iterdir():
            (crafted / f.name).write_bytes(f.read_bytes())
        (crafted / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ConfigError, match="outside the export directory"):
            StagesRunner(crafted)
    with pytest.raises(ConfigError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable adaptnn export manifest"):
        read_manifest(tmp_path)


def test_runner_checks_inputs_and_thresholds(digits_export):
    _, _, _, out = digits_export
    runner = StagesRunner(out)
    with pytest.raises(ConfigError, match="3 thresholds"):
        runner.run(np.zeros((2, 1, 8, 8), np.float32), thresholds=[0.5])
    with pytest.raises(Exception, match="expected a batch of shape"):
        runner.run(np.zeros((2, 8, 8), np.float32))


def test_existing_output_is_refused(tmp_path):
    model, x = _digits()
    export_stages(model, MarginPolicy([0.5, 0.5, 0.5]), x, tmp_path / "margin", exporter="torchscript")
    with pytest.raises(ConfigError, match="not empty"):
        export_stages(model, MarginPolicy([0.5, 0.5, 0.5]), x, tmp_path / "margin")


def test_cli_refuses_other_formats_and_modes(tmp_path, capsys):
    from adaptnn.cli import main

    assert main(["export", str(tmp_path), "--format", "tflite"]) == 2
    assert "--format 'tflite' is not supported" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--mode", "sideways"]) == 2
    assert "--mode must be one of stages, graph, cond" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--opset", "0"]) == 2  # checked before any work
    assert "--opset must be between 18" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "a_file")]) == 2
    assert "is a file; give a directory" in capsys.readouterr().err
    assert main(["export", str(tmp_path)]) == 2  # not a run directory: one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("adaptnn export: error:") and "Traceback" not in err


@pytest.mark.integration  # a whole run-directory workflow (train, calibrate, export)
def test_cli_exports_a_calibrated_run(tmp_path, capsys):
    from adaptnn.cli import main

    run_dir = tmp_path / "quick"
    assert main(["quickstart", "--run_dir", str(run_dir), "--epochs", "2", "--tolerance", "0.9"]) == 0
    assert main(["export", str(run_dir), "--format", "onnx", "--mode", "stages", "--opset", "18"]) == 0
    assert "verified against run_dynamic" in capsys.readouterr().out
    out = run_dir / "onnx_stages"
    manifest = read_manifest(out)
    calibration = json.loads((run_dir / "calibration.json").read_text())
    assert manifest["policy"]["name"] == calibration["policy_spec"]["name"] and manifest["opset"] == 18
    logits, exit_index, macs = StagesRunner(out).run(np.zeros((3, 1, 8, 8), np.float32))
    assert logits.shape == (3, 10) and exit_index.shape == (3,) and macs.shape == (3,)
    for mode, name in (("graph", "model.onnx"), ("cond", "model_cond.onnx")):  # the other modes, verified the same way
        assert main(["export", str(run_dir), "--mode", mode]) == 0
        assert "verified against run_dynamic" in capsys.readouterr().out
        assert (run_dir / f"onnx_{mode}" / name).is_file()
    assert main(["export", str(run_dir)]) == 2  # exists: refused without --overwrite
    assert "not empty" in capsys.readouterr().err


def test_verification_catches_a_different_model(digits_export):
    import copy

    from adaptnn.export import ExportMismatchError, verify_export

    model, policy, x, out = digits_export
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.heads[-1].parameters():
            p.add_(0.5)
    with pytest.raises(ExportMismatchError, match="export verification failed"):
        verify_export(out, other, policy, x)
    verify_export(out, model, policy, x)  # the model it was exported from passes


@pytest.mark.slow  # the packaged all-MiniLM-L6-v2 (6 layers, 22M parameters) in all three modes
def test_packaged_minilm_exports_in_every_mode(tmp_path):
    from adaptnn.export import export_cond, export_graph

    torch.manual_seed(0)
    model = create_model("hf_staged", path="all-MiniLM-L6-v2", exits=[2], num_classes=4).eval()
    ids = torch.randint(1, 30522, (12, 9))
    ids[::3, 6:] = 0
    scores = _scores(model, ConfidencePolicy([math.inf] * (model.num_exits - 1)), ids)
    policy = ConfidencePolicy([_between(scores[k], 0.5) for k in range(model.num_exits - 1)])
    out = export_stages(model, policy, ids, tmp_path / "stages")  # each export is verified before it is written
    _assert_matches(model, policy, ids[:, :5], StagesRunner(out))
    assert export_graph(model, policy, ids, tmp_path / "graph.onnx").is_file()
    assert export_cond(model, policy, ids, tmp_path / "cond.onnx").is_file()
