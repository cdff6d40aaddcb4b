"""Stateful exit rules export in every mode: their state travels as tensors, compacted with the model's state.

Patience (a counter and the previous prediction), the averaged and boosted ensembles (the running combination,
returned as the prediction) and the learned rule (its features' history, its MLP inside the graph) are exported
in ``graph``, ``stages`` and ``cond`` mode and compared with ``run_dynamic``, also with thresholds changed at run
time. One export per mode runs in the unit tier, the whole matrix (learned included) in the slow tier. Rules that
cannot be carried fail with one line naming the policy.
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch

from adaptnn import ConfigError, create_model
from adaptnn.export import StagesRunner, export_cond, export_graph, export_stages
from adaptnn.policies import (
    AveragedEnsemblePolicy,
    BoostedEnsemblePolicy,
    ConfidencePolicy,
    PatiencePolicy,
    fit_learned_policy,
)
from adaptnn.policies.base import ThresholdPolicy

BAND = 1e-5  # continuous scores this close to a threshold may round either way in another runtime
BATCH = 24


@pytest.fixture(scope="module")
def digits():
    """mecnn_digits whose exits agree on about half of the samples (class 0 favoured by every head), so the
    patience counter grows for some samples and not for others."""
    torch.manual_seed(0)
    model = create_model("mecnn_digits").eval()
    x = torch.randn(BATCH, 1, 8, 8)
    with torch.no_grad():
        for k, head in enumerate(model.heads):
            logits = model.forward_all(x)[k]
            gap = (logits[:, 1:].amax(dim=1) - logits[:, 0]).sort().values
            head.fc.bias[0] += float(gap[BATCH // 2 - 1 : BATCH // 2 + 1].mean())  # between two samples: no tie
        outs = model.forward_all(x)
    return model, x, outs


def _quantile(policy: ThresholdPolicy, outs, q: float) -> ThresholdPolicy:
    """Thresholds between two neighbouring scores at each exit's ``q`` quantile (never on a score)."""
    scores, _ = policy.scores(outs)
    thresholds = []
    for row in scores[:-1]:
        values = torch.unique(row.double()).sort().values
        i = min(max(int(q * len(values)), 1), len(values) - 1)
        thresholds.append(float(values[i - 1 : i + 1].mean()))
    return policy.with_thresholds(thresholds)


def _policy(name: str, outs, q: float = 0.5) -> ThresholdPolicy:
    num_exits = len(outs)
    temps = [0.05 * (1 + 0.2 * k) for k in range(num_exits)]  # spreads near-uniform random-weight scores
    if name == "patience":
        return PatiencePolicy([1.0] * (num_exits - 1)) if q == 0.5 else PatiencePolicy([0.0 if q < 0.5 else 2.0] * 3)
    if name == "average":
        base: ThresholdPolicy = AveragedEnsemblePolicy([0.5] * (num_exits - 1), temperatures=temps)
    elif name == "boosted":
        base = BoostedEnsemblePolicy([0.5] * (num_exits - 1), r=0.5, temperatures=temps)
    else:
        labels = torch.arange(outs[0].shape[0]) % outs[0].shape[1]
        base = fit_learned_policy(outs, labels, steps=30, temperatures=temps)
    return _quantile(base, outs, q)


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _runner(mode: str, exported, policy: ThresholdPolicy):
    """``run(x, policy) -> (logits, exit_index)`` for an exported file or directory."""
    if mode == "stages":
        runner = StagesRunner(exported)
        return lambda x, p: runner.run(x, thresholds=p.thresholds)[:2]
    session = _session(exported)

    def run(x: torch.Tensor, p: ThresholdPolicy):
        feeds = {"x": x.numpy(), "thresholds": np.asarray(p.thresholds, dtype=np.float32)}
        if p.temperatures is not None:
            feeds["temperatures"] = np.asarray(p.temperatures, dtype=np.float32)
        return session.run(None, feeds)[:2]

    if mode == "graph":
        return run

    def one_by_one(x: torch.Tensor, p: ThresholdPolicy):
        rows = [run(x[i : i + 1], p) for i in range(x.shape[0])]
        return np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])

    return one_by_one


def _assert_like_run_dynamic(run, model, policy: ThresholdPolicy, x: torch.Tensor) -> np.ndarray:
    logits, exits = run(x, policy)
    ref = model.run_dynamic(x, policy)
    if isinstance(policy, PatiencePolicy):  # exact counts: no band
        clear = np.ones(x.shape[0], dtype=bool)
    else:
        with torch.no_grad():
            scores, _ = policy.scores(model.forward_all(x))
        limits = torch.tensor(policy.thresholds[: model.num_exits - 1]).unsqueeze(1)
        clear = ~((scores[:-1] - limits).abs() < BAND).any(dim=0).numpy()
    np.testing.assert_array_equal(exits[clear], ref.exit_index.numpy()[clear])
    # the prediction is the rule's (the ensembles return their combination, not the exit's logits)
    np.testing.assert_allclose(logits[clear], ref.logits.float().numpy()[clear], atol=1e-4, rtol=1e-4)
    return exits


def _export(mode: str, model, policy, x, tmp_path):
    if mode == "stages":
        return export_stages(model, policy, x, tmp_path / "stages")
    if mode == "graph":
        return export_graph(model, policy, x, tmp_path / "graph.onnx")
    return export_cond(model, policy, x, tmp_path / "cond.onnx")


def _check(name: str, mode: str, digits, tmp_path) -> None:
    model, x, outs = digits
    policy = _policy(name, outs)
    exported = _export(mode, model, policy, x, tmp_path)  # verified against run_dynamic before it is written
    run = _runner(mode, exported, policy)
    exits = _assert_like_run_dynamic(run, model, policy, x)
    assert len(set(exits.tolist())) >= 2  # mixed exits: the carried state is compacted
    for q in (0.2, 0.8):  # thresholds changed at run time move the exits as in run_dynamic
        other = _policy(name, outs, q)
        moved = _assert_like_run_dynamic(run, model, other, x)
        assert not np.array_equal(moved, exits)
    everyone = policy.with_thresholds([-math.inf] * (model.num_exits - 1))
    assert (_assert_like_run_dynamic(run, model, everyone, x[:4]) == 0).all()


UNIT = [("patience", "stages"), ("boosted", "graph"), ("average", "cond")]
MATRIX = [(p, m) for p in ("patience", "average", "boosted", "learned") for m in ("graph", "stages", "cond")]


@pytest.mark.parametrize(("name", "mode"), UNIT)
def test_stateful_policy_exports(name, mode, digits, tmp_path):
    _check(name, mode, digits, tmp_path)


@pytest.mark.slow  # every stateful rule in every mode (the unit tier exports each rule and each mode once)
@pytest.mark.parametrize(("name", "mode"), [c for c in MATRIX if c not in UNIT])
def test_stateful_policy_exports_every_mode(name, mode, digits, tmp_path):
    if (name, mode) == ("learned", "cond"):
        # torch 2.14.1 cannot decompose a tensor constant created inside a cond branch (the learned rule's one-hot
        # exit feature): a one-line error naming the policy, nothing written. A pass here means torch fixed it.
        with pytest.raises(ConfigError, match=r"cond\.onnx failed \(policy LearnedPolicy \('learned'\)\)"):
            _check(name, mode, digits, tmp_path)
        assert not (tmp_path / "cond.onnx").exists()
        return
    _check(name, mode, digits, tmp_path)


class _Primed(ConfidencePolicy):
    """A rule that starts with per-sample state: nothing to carry it from at the first stage."""

    name = "primed"

    def init_state(self, batch_size: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(batch_size, device=device)


class _PythonBranch(ConfidencePolicy):
    """A rule whose step branches in Python on a value: not traceable."""

    name = "python_branch"

    def step(self, exit_index, logits, state):
        score, prediction, state = super().step(exit_index, logits, state)
        return (score if float(score.mean()) > 0.5 else score * 0.5), prediction, state


@pytest.mark.parametrize("mode", ["graph", "stages", "cond"])
def test_unexportable_policies_fail_naming_the_policy(mode, digits, tmp_path):
    model, x, _ = digits
    with pytest.raises(ConfigError, match=r"_Primed \('primed'\) starts with a per-sample state"):
        _export(mode, model, _Primed([0.5] * 3), x, tmp_path)
    with pytest.raises(ConfigError, match="export needs a threshold rule.*got object"):
        _export(mode, model, object(), x, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written


def test_untraceable_policy_fails_naming_the_policy(digits, tmp_path):
    model, x, _ = digits
    with pytest.raises(ConfigError, match=r"graph\.onnx failed \(policy _PythonBranch \('python_branch'\)\)"):
        export_graph(model, _PythonBranch([0.5] * 3), x, tmp_path / "graph.onnx")
    assert not any(tmp_path.iterdir())
