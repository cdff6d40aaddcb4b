"""Exit policies: semantics of each rule and the simulated == real invariant for every one of them."""

import math

import pytest
import torch
from torch import nn

from adaptnn import ConfigError, StagedModel, create_model
from adaptnn.policies import (
    POLICY_NAMES,
    AveragedEnsemblePolicy,
    BoostedEnsemblePolicy,
    ConfidencePolicy,
    EntropyPolicy,
    ExitPolicy,
    LearnedPolicy,
    MarginPolicy,
    NeverExit,
    PatiencePolicy,
    ThresholdPolicy,
    fit_learned_policy,
    fit_temperatures,
    make_policy,
    max_softmax,
    simulate_exits,
)
from adaptnn.runtime import InputSpec
from helpers import TupleSegment, randomise_stats


class _Head(nn.Module):
    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, classes)
        nn.init.normal_(self.fc.weight, std=1.5)

    def forward(self, state):
        return self.fc(state[0])


def _tuple_model(dim: int = 10, classes: int = 4, exits: int = 4) -> StagedModel:
    model = StagedModel(
        [TupleSegment(dim) for _ in range(exits)],
        [_Head(dim, classes) for _ in range(exits)],
        input_spec=InputSpec((dim,)),
        num_classes=classes,
    )
    return model.double().eval()


def _cnn() -> StagedModel:
    return randomise_stats(create_model("mecnn_digits").double().eval())


MODELS = {"tuple_state": (_tuple_model, (10,)), "cnn": (_cnn, (1, 8, 8))}


def _family(name: str, logits: torch.Tensor, labels: torch.Tensor, temperature: bool) -> ThresholdPolicy:
    k = logits.shape[0]
    if name == "patience":
        return PatiencePolicy([None] * (k - 1))
    if name == "learned":
        return fit_learned_policy(logits, labels, steps=30, temperatures=[1.3] * k if temperature else None)
    temps = torch.linspace(0.7, 2.0, k).tolist() if temperature else None
    return {
        "confidence": ConfidencePolicy,
        "entropy": EntropyPolicy,
        "margin": MarginPolicy,
        "average": AveragedEnsemblePolicy,
        "boosted": lambda t, temperatures: BoostedEnsemblePolicy(t, r=0.7, temperatures=temperatures),
    }[name]([None] * (k - 1), temperatures=temps)


# every rule on both models; temperature scaling on the small model (patience ignores temperatures: argmax only)
_CASES = [(m, p, False) for m in MODELS for p in POLICY_NAMES] + [
    ("tuple_state", p, True) for p in POLICY_NAMES if p != "patience"
]


@pytest.mark.parametrize("model_name, policy_name, temperature", _CASES)
def test_run_dynamic_matches_simulation_for_every_policy(model_name, policy_name, temperature):
    build, shape = MODELS[model_name]
    model = build()
    gen = torch.Generator().manual_seed(3)
    x_all = torch.randn(40, *shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        logits_all = torch.stack(model.forward_all(x_all))
    labels = torch.randint(0, logits_all.shape[-1], (40,), generator=gen)
    family = _family(policy_name, logits_all, labels, temperature)
    scores, _ = family.scores(logits_all)
    costs = model.exit_costs(x_all)
    used = set()
    for batch in [1, 7, 40]:
        x = x_all[:batch]
        with torch.no_grad():
            logits = model.forward_all(x)
        for trial in range(3):
            # thresholds at random points of the observed score range so that every exit gets used
            lo, hi = scores.min().item(), scores.max().item()
            thresholds = (torch.rand(model.num_exits - 1, generator=gen) * (hi - lo) + lo).tolist()
            if policy_name == "patience":
                thresholds = [float(round(t)) for t in thresholds]
            if trial == 2:
                thresholds[1] = math.inf
            policy = family.with_thresholds(thresholds)
            sim_exit, sim_pred = simulate_exits(policy, logits)
            out = model.run_dynamic(x, policy)
            assert torch.equal(out.exit_index, sim_exit), (batch, thresholds)
            torch.testing.assert_close(out.logits, sim_pred.to(out.logits.dtype), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(out.macs, costs[sim_exit])
            # and the exit is the first k whose score reaches its threshold
            s, _ = family.scores(logits)
            passes = torch.cat([s[:-1] >= torch.tensor(thresholds).unsqueeze(1), torch.ones(1, batch, dtype=bool)])
            assert torch.equal(passes.float().argmax(0), sim_exit)
            used.update(sim_exit.tolist())
    if not (model_name == "cnn" and policy_name == "patience"):  # the random CNN predicts one class everywhere
        assert len(used) >= 2, "thresholds never split the samples between exits"


def test_boosted_ensemble_semantics():
    f = torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 0.0, 4.0]]])  # K=3, N=1, C=3
    r = 0.5
    a0 = f[0]
    a1 = f[1] + r * a0
    a2 = f[2] + r * a1
    policy = BoostedEnsemblePolicy([math.inf, math.inf], r=r)
    scores, preds = policy.scores(f)
    torch.testing.assert_close(scores[:, 0], torch.stack([max_softmax(a) for a in (a0, a1, a2)]).squeeze(1))
    assert preds[:, 0].tolist() == [0, 0, 2]  # the ensemble keeps class 0 at exit 1 though f_1 says 1
    # prediction returned is A_s at the exit taken
    conf1 = float(max_softmax(a1))
    exit_index, prediction = simulate_exits(BoostedEnsemblePolicy([math.inf, conf1], r=r), f)
    assert exit_index.tolist() == [1]
    torch.testing.assert_close(prediction, a1)
    _, prediction = simulate_exits(BoostedEnsemblePolicy([math.inf, math.inf], r=r), f)
    torch.testing.assert_close(prediction, a2)
    # r = 0: every exit alone, i.e. the plain confidence rule
    s0, _ = BoostedEnsemblePolicy([0.5, 0.5], r=0.0).scores(f)
    s1, _ = ConfidencePolicy([0.5, 0.5]).scores(f)
    torch.testing.assert_close(s0, s1)
    with pytest.raises(ConfigError, match="r >= 0"):
        BoostedEnsemblePolicy([0.5], r=-1)


def test_averaged_ensemble_semantics():
    f = torch.randn(3, 5, 4)
    scores, preds = AveragedEnsemblePolicy([0.9, 0.9]).scores(f)
    mean = torch.cumsum(f.softmax(-1), 0) / torch.arange(1, 4).view(3, 1, 1)
    torch.testing.assert_close(scores, mean.amax(-1))
    assert torch.equal(preds, mean.argmax(-1))


def test_patience_counts_unchanged_predictions():
    # predictions per exit for 3 samples: a a a a / a b b b / a b a a
    cls = torch.tensor([[0, 0, 0], [0, 1, 1], [0, 1, 0], [0, 1, 0]])  # [K, N]
    logits = nn.functional.one_hot(cls, 3).double() * 5
    scores, _ = PatiencePolicy(2).scores(logits)
    assert scores.T.tolist() == [[0, 1, 2, 3], [0, 0, 1, 2], [0, 0, 0, 1]]
    exit_index, _ = simulate_exits(PatiencePolicy(2), logits)
    assert exit_index.tolist() == [2, 3, 3]
    exit_index, _ = simulate_exits(PatiencePolicy(1), logits)
    assert exit_index.tolist() == [1, 2, 3]
    exit_index, _ = simulate_exits(PatiencePolicy(0), logits)
    assert exit_index.tolist() == [0, 0, 0]
    with pytest.raises(ConfigError, match="integer >= 0"):
        PatiencePolicy(-1)


def test_entropy_and_margin_scores():
    logits = torch.nan_to_num(torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 0], [0.5, 0.5, 0, 0]]).log(), neginf=-1e4)
    ent, _ = EntropyPolicy([0.5]).scores(logits.unsqueeze(0).expand(2, -1, -1))
    torch.testing.assert_close(ent[0], torch.tensor([0.0, 1.0, 0.5]), atol=1e-5, rtol=0)
    mar, _ = MarginPolicy([0.5]).scores(logits.unsqueeze(0).expand(2, -1, -1))
    torch.testing.assert_close(mar[0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-5, rtol=0)


def test_temperature_changes_scores_not_predictions():
    f = torch.randn(3, 50, 6) * 4
    plain, p_plain = ConfidencePolicy([0.5, 0.5]).scores(f)
    hot, p_hot = ConfidencePolicy([0.5, 0.5], temperatures=[2.0, 2.0, 2.0]).scores(f)
    assert torch.equal(p_plain, p_hot)
    assert torch.all(hot <= plain + 1e-7) and torch.any(hot < plain - 1e-3)
    with pytest.raises(ConfigError, match="temperatures"):
        ConfidencePolicy([0.5], temperatures=[1.0, -1.0])
    with pytest.raises(ConfigError, match="2 temperatures but the model has 3"):
        simulate_exits(ConfidencePolicy([0.5, 0.5], temperatures=[1.0, 1.0]), f)


def test_fit_temperatures_recovers_known_temperature():
    gen = torch.Generator().manual_seed(0)
    n, c = 4000, 5
    true_logits = torch.randn(n, c, generator=gen) * 2
    labels = torch.multinomial(true_logits.softmax(-1), 1, generator=gen).squeeze(1)
    # exit 0 is over-confident by 3x, exit 1 is calibrated, exit 2 under-confident by 2x
    with torch.inference_mode():  # as returned by adaptnn.evaluate.collect_logits
        logits = torch.stack([true_logits * 3, true_logits, true_logits / 2])
        labels = labels.clone()
    temps = fit_temperatures(logits, labels)
    assert temps[0] == pytest.approx(3.0, rel=0.1)
    assert temps[1] == pytest.approx(1.0, rel=0.1)
    assert temps[2] == pytest.approx(0.5, rel=0.1)


def test_learned_policy_learns_correctness():
    gen = torch.Generator().manual_seed(0)
    n, c, k = 3000, 4, 3
    labels = torch.randint(0, c, (n,), generator=gen)
    # logits whose confidence is informative: the margin of the true class grows with the exit
    logits = torch.randn(k, n, c, generator=gen)
    for e in range(k):
        logits[e, torch.arange(n), labels] += 1.0 + e
    policy = fit_learned_policy(logits, labels, steps=200)
    assert isinstance(policy, LearnedPolicy) and isinstance(policy, ExitPolicy)
    scores, preds = policy.scores(logits)
    correct = preds == labels
    # the learned probability separates right from wrong predictions at every exit
    for e in range(k):
        assert scores[e][correct[e]].mean() > scores[e][~correct[e]].mean() + 0.1
    with pytest.raises(ConfigError, match="trained for 3 exits"):
        simulate_exits(policy, logits[:2])


def test_make_policy_and_bad_names():
    logits = torch.randn(3, 20, 4)
    labels = torch.randint(0, 4, (20,))
    for name in POLICY_NAMES:
        policy = make_policy(name, 3, val_logits=logits, val_labels=labels, steps=5)
        exit_index, _ = simulate_exits(policy, logits)
        assert exit_index.tolist() == [2] * 20  # built with every exit disabled
    with pytest.raises(ConfigError, match="unknown policy"):
        make_policy("nope", 3)
    with pytest.raises(ConfigError, match="needs val_logits"):
        make_policy("learned", 3)
    with pytest.raises(ConfigError, match="threshold"):
        simulate_exits(ConfidencePolicy([0.5]), logits)


def test_never_exit_and_legacy_imports():
    from adaptnn import ConfidencePolicy as Top
    from adaptnn.policies import ExitPolicy as EP

    assert Top is ConfidencePolicy and EP is ExitPolicy
    exit_index, _ = simulate_exits(NeverExit(), torch.randn(4, 3, 2))
    assert exit_index.tolist() == [3, 3, 3]


def test_policies_round_trip_through_json():
    import json

    from adaptnn.io import to_jsonable
    from adaptnn.policies import policy_from_dict, policy_to_dict

    logits = torch.randn(3, 40, 4)
    labels = torch.randint(0, 4, (40,))
    for name in POLICY_NAMES:
        policy = make_policy(name, 3, val_logits=logits, val_labels=labels, steps=5, temperature=name != "patience")
        policy = policy.with_thresholds([0.3, math.inf] if name != "patience" else [1.0, math.inf])
        text = json.dumps(to_jsonable(policy_to_dict(policy)), allow_nan=False)
        again = policy_from_dict(json.loads(text))
        assert type(again) is type(policy)
        a, _ = policy.scores(logits)
        b, _ = again.scores(logits)
        torch.testing.assert_close(a, b)
        assert torch.equal(simulate_exits(policy, logits)[0], simulate_exits(again, logits)[0])
