"""Training strategies: losses equal their formulas, hooks do what the papers describe."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaptnn import create_model
from adaptnn.errors import ConfigError
from adaptnn.policies import simulate_exits
from adaptnn.runtime import InputSpec, StagedModel
from adaptnn.strategies import (
    BoostLoss,
    GradientEquilibrium,
    JointLoss,
    L2WLoss,
    SelfDistillation,
    StepContext,
    available,
    boosted_logits,
    fit_heads_cached,
    get,
    resolved_options,
)
from adaptnn.strategies.l2w import allocate_exits
from adaptnn.training import TrainConfig, Trainer, build_strategy


def _mlp_model(num_exits=3, width=16, features=6, classes=4, bn=False):
    segs = [
        nn.Sequential(
            nn.Linear(features if i == 0 else width, width),
            *([nn.BatchNorm1d(width)] if bn else []),
            nn.Tanh(),
        )
        for i in range(num_exits)
    ]
    heads = [nn.Linear(width, classes) for _ in range(num_exits)]
    model = StagedModel(segs, heads, input_spec=InputSpec((features,)), num_classes=classes)
    model.model_spec = {"name": "test_mlp", "kwargs": {}}
    return model


def _toy_data(n=96, features=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x[:, :classes].argmax(1) + (x[:, -1] > 1.0).long()) % classes
    return torch.utils.data.TensorDataset(x, y)


def test_registry_and_errors():
    assert {"joint", "distill", "boost", "l2w", "imta", "frozen"} <= set(available())
    assert isinstance(get("boost", r=0.25), BoostLoss) and get("boost", r=0.25).r == 0.25
    with pytest.raises(ConfigError, match="did you mean boost"):
        get("bost")
    with pytest.raises(ConfigError, match="strategy 'joint'"):
        get("joint", nonsense=1)
    with pytest.raises(ConfigError):
        get("boost", r=2.0)
    cfg = TrainConfig(strategy="distill", exit_weights="linear", label_smoothing=0.1, strategy_options={"alpha": 0.3})
    built = build_strategy(cfg)
    assert (built.weights, built.label_smoothing, built.alpha) == ("linear", 0.1, 0.3)


def test_boost_loss_equals_formula():
    torch.manual_seed(1)
    f = [torch.randn(5, 3, dtype=torch.float64) for _ in range(3)]
    y = torch.tensor([0, 2, 1, 1, 0])
    r = 0.5
    # by hand: A_0 = f_0; E_0 = r f_0; A_1 = f_1 + E_0; E_1 = r (f_1 + E_0); A_2 = f_2 + E_1
    e0 = r * f[0]
    a1 = f[1] + e0
    e1 = r * a1
    a2 = f[2] + e1
    expected = F.cross_entropy(f[0], y) + F.cross_entropy(a1, y) + F.cross_entropy(a2, y)
    loss = BoostLoss(r=r)([t.float() for t in f], y)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(boosted_logits(f, r), [f[0], a1, a2], strict=True):
        torch.testing.assert_close(got, want)


def test_boost_stops_gradient_through_previous_ensemble():
    f = [torch.randn(4, 3, requires_grad=True) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 0])
    BoostLoss(r=0.5)(f, y).backward()
    # exit 0's logits only receive the gradient of their own cross-entropy
    own = torch.autograd.grad(F.cross_entropy(f[0], y), f[0])[0]
    torch.testing.assert_close(f[0].grad, own)


def test_boost_policy_in_run_dynamic_matches_simulation():
    torch.manual_seed(0)
    model = create_model("mecnn_digits", widths=[8, 8, 16, 16]).eval()
    x = torch.randn(64, 1, 8, 8)
    strategy = get("boost", r=0.5)
    with torch.no_grad():
        raw = model.forward_all(x)
    ensembles = torch.stack(strategy.predictions(raw))
    conf = ensembles.softmax(-1).amax(-1)
    thresholds = [float(conf[k].median()) for k in range(3)]  # about half the samples stop at each exit
    policy = strategy.policy(thresholds)
    sim_exit, sim_pred = simulate_exits(policy, raw)
    out = model.run_dynamic(x, strategy.policy(thresholds))
    assert torch.equal(out.exit_index, sim_exit)
    assert len(set(out.exit_index.tolist())) > 1  # the test exercises early exits
    torch.testing.assert_close(out.logits, sim_pred)
    # the prediction of a sample is the additive ensemble at the exit it took
    torch.testing.assert_close(out.logits, ensembles[out.exit_index, torch.arange(64)])


def test_policy_spec_names_the_matching_policy():
    assert get("joint").policy_spec() == ("confidence", {})
    assert get("boost", r=0.25).policy_spec() == ("boosted", {"r": 0.25})
    policy = get("boost", r=0.25).policy([0.5, None])
    assert policy.to_dict() == {"name": "boosted", "thresholds": [0.5, float("inf")], "temperatures": None, "r": 0.25}
    assert get("distill").policy([0.7]).to_dict()["name"] == "confidence"


def test_gradient_equilibrium_rescales_trunk_gradients():
    torch.manual_seed(0)
    model = _mlp_model(num_exits=3)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    joint, ge = JointLoss(), GradientEquilibrium()
    joint(model.forward_all(x), y).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = ge.forward(model, x)
    for a, b in zip(logits, model.forward_all(x), strict=True):
        torch.testing.assert_close(a, b)  # the forward pass is unchanged
    ge(logits, y).backward()
    # the first segment feeds all 3 exits, each path scaled by 1/(K-k) * prod_{j<k} (K-j-1)/(K-j) = 1/K;
    # the last segment feeds only the last exit (factor 1); the heads' own parameters are not rescaled
    torch.testing.assert_close(model.segments[0][0].weight.grad, plain["segments.0.0.weight"] / 3)
    torch.testing.assert_close(model.segments[2][0].weight.grad, plain["segments.2.0.weight"])
    torch.testing.assert_close(model.heads[0].weight.grad, plain["heads.0.weight"])
    # the second segment feeds exit 1 (factor 1/2) and exit 2 (factor 1/2): half of the plain gradient
    torch.testing.assert_close(model.segments[1][0].weight.grad, plain["segments.1.0.weight"] / 2)


class _TwoScale(nn.Module):
    """Segment 0 of a two-tensor state [fine, coarse]; the heads read only ``coarse`` (like MSDNet's classifiers)."""

    def __init__(self) -> None:
        super().__init__()
        self.fine, self.coarse = nn.Linear(6, 8), nn.Linear(6, 8)

    def forward(self, x):
        return [torch.tanh(self.fine(x)), torch.tanh(self.coarse(x))]


class _Mix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.from_fine, self.from_coarse = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, state):
        fine, coarse = state
        return [fine, torch.tanh(self.from_fine(fine) + self.from_coarse(coarse))]


class _ReadCoarse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(8), nn.Linear(8, 4)

    def forward(self, state):
        return self.fc(self.bn(state[1]))


@pytest.mark.parametrize("scope", ["state", "head_inputs"])
def test_rescale_scope_decides_which_state_tensors_carry_the_scaled_trunk_gradient(scope):
    torch.manual_seed(0)
    model = StagedModel([_TwoScale(), _Mix()], [_ReadCoarse(), _ReadCoarse()])
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    JointLoss()(model.forward_all(x), y).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference = copy.deepcopy(model)
    strategy = GradientEquilibrium(rescale_scope=scope)
    logits = strategy.forward(model, x)
    strategy(logits, y).backward()
    # K = 2: head 0 gets 1/2 of its gradient, the trunk after exit 0 carries 1/2 of exit 1's gradient
    fine_factor = 0.5 if scope == "state" else 1.0  # exit 1's gradient reaches `fine` only through the trunk
    torch.testing.assert_close(model.segments[0].fine.weight.grad, plain["segments.0.fine.weight"] * fine_factor)
    torch.testing.assert_close(model.segments[0].coarse.weight.grad, plain["segments.0.coarse.weight"] / 2)
    assert strategy._read_masks == ({0: [False, True]} if scope == "head_inputs" else {})
    # the probe ran the head in eval mode: the running statistics saw exactly one training forward
    reference.forward_all(x)
    torch.testing.assert_close(model.heads[0].bn.running_mean, reference.heads[0].bn.running_mean)
    torch.testing.assert_close(model.heads[0].bn.running_var, reference.heads[0].bn.running_var)
    assert model.heads[0].training


class _ScaleBackward(torch.autograd.Function):
    """Identity forward, gradient times ``scale`` (written here independently of adaptnn.strategies.gradient)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _boostnet_by_hand(model, x, y, r):
    """BoostNet on MSDNet as the paper defines it: after block i the coarsest map (the one classifier i reads) passes
    the classifier's gradient scaled by 1/(K-i) and the later blocks' by (K-i-1)/(K-i); the finer maps are untouched;
    loss sum_i CE(f_i + stopgrad(E_{i-1}), y) with E_i = r * (f_i + E_{i-1})."""
    num_exits, state, losses, carried = model.num_exits, x, [], None
    exit_after = {j: k for j, k in enumerate(model._head_at) if k >= 0}
    for j, segment in enumerate(model.segments):
        state = list(segment(state))
        if j not in exit_after:
            continue
        i = exit_after[j]
        coarse = _ScaleBackward.apply(state[-1], 1.0 / (num_exits - i))
        logits = model.heads[i]([*state[:-1], coarse])
        total = logits if carried is None else logits + carried.detach()
        losses.append(F.cross_entropy(total, y))
        carried = r * total
        state[-1] = _ScaleBackward.apply(coarse, float(num_exits - i - 1))
    return sum(losses)


def test_boost_head_inputs_rescaling_on_msdnet_equals_the_papers_definition_by_hand():
    # issue 12: the strategy's trunk gradients on a nested multi-scale state are the papers' BoostNet, bit for bit
    # up to float summation order
    torch.manual_seed(0)
    model = create_model("msdnet_cifar10", n_blocks=3, step=1, base=2, step_mode="even", growth_rate=4, n_channels=8)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    by_hand = copy.deepcopy(model)
    strategy = get("boost", r=0.5, gradient_rescaling=True, rescale_scope="head_inputs")
    strategy(strategy.forward(model, x), y).backward()
    _boostnet_by_hand(by_hand, x, y, r=0.5).backward()
    got = dict(model.named_parameters())
    for name, param in by_hand.named_parameters():
        torch.testing.assert_close(got[name].grad, param.grad, rtol=1e-4, atol=1e-6, msg=name)
    # and the rescaling is not a no-op: plain boost differs on the first block
    plain = copy.deepcopy(by_hand)
    plain.zero_grad()
    get("boost", r=0.5)(plain.forward_all(x), y).backward()
    first = next(n for n, _ in plain.named_parameters() if n.startswith("segments.0."))
    assert not torch.allclose(dict(plain.named_parameters())[first].grad, got[first].grad)


def test_boost_and_imta_default_to_the_papers_head_inputs_rescaling():
    # issue 12: the defaults are the options that won the controlled runs (and what the papers' code does)
    torch.manual_seed(0)
    model = create_model("msdnet_cifar10", n_blocks=3, step=1, base=2, step_mode="even", growth_rate=4, n_channels=8)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    grads = []
    for strategy in (get("boost"), get("boost", r=0.5, gradient_rescaling=True, rescale_scope="head_inputs")):
        model.zero_grad()
        strategy(strategy.forward(model, x), y).backward()
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
    for by_default, explicit in zip(*grads, strict=True):
        torch.testing.assert_close(by_default, explicit, rtol=0, atol=0)
    expected = {"r": 0.5, "gradient_rescaling": True, "rescale_scope": "head_inputs", "weights": "uniform"}
    assert resolved_options("boost") == dict(expected, label_smoothing=0.0)
    assert resolved_options("imta")["rescale_scope"] == "head_inputs"
    assert resolved_options("joint", weights=[1.0, 2.0])["weights"] == [1.0, 2.0]
    with pytest.raises(ConfigError, match="strategy 'boost'.*unexpected keyword argument 'nope'"):
        resolved_options("boost", nope=1)


def test_rescale_scope_is_checked():
    with pytest.raises(ConfigError, match="rescale_scope must be one of head_inputs, state, got 'coarse'"):
        get("boost", gradient_rescaling=True, rescale_scope="coarse")


def test_distill_reduces_to_joint_and_teacher_is_detached():
    torch.manual_seed(0)
    f = [torch.randn(6, 5, requires_grad=True) for _ in range(3)]
    y = torch.randint(0, 5, (6,))
    torch.testing.assert_close(SelfDistillation(alpha=0.0)(f, y), JointLoss()(f, y))
    SelfDistillation(alpha=0.7, temperature=2.0)(f, y).backward()
    own = torch.autograd.grad(F.cross_entropy(f[2], y), f[2])[0]
    torch.testing.assert_close(f[2].grad, own)  # the last exit only learns from the labels
    # ensemble teacher of exit 0 = mean of the softened distributions of exits 1 and 2
    t = 2.0
    s = SelfDistillation(alpha=1.0, temperature=t, teacher="ensemble")
    teacher0 = ((f[1] / t).softmax(-1) + (f[2] / t).softmax(-1)) / 2
    kd0 = F.kl_div(F.log_softmax(f[0] / t, -1), teacher0, reduction="batchmean") * t * t
    kd1 = F.kl_div(F.log_softmax(f[1] / t, -1), (f[2] / t).softmax(-1), reduction="batchmean") * t * t
    torch.testing.assert_close(s(f, y), kd0 + kd1 + F.cross_entropy(f[2], y))


def test_allocate_exits_follows_budgeted_quotas():
    conf = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.5, 0.3], [0.0, 0.9, 0.1, 0.8, 0.2, 0.7], [0.5] * 6])
    exits = allocate_exits(conf, [1 / 3, 1 / 3, 1 / 3])
    assert exits.tolist() == [0, 1, 0, 1, 2, 2]


def test_l2w_meta_step_and_backbone_step_without_model_copies(monkeypatch):
    torch.manual_seed(0)
    model = _mlp_model(num_exits=3, bn=True).train()
    strategy = L2WLoss(eps=0.5, meta_lr=1e-2)
    strategy.setup(model)
    x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))

    def no_copies(*args, **kwargs):
        raise AssertionError("l2w must not copy the model")

    monkeypatch.setattr(copy, "deepcopy", no_copies)
    wnet_before = [p.detach().clone() for p in strategy.weight_net.parameters()]
    model_before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = strategy.meta_step(model, lr=0.1, x=x, y=y)
    assert meta > 0
    changed = [not torch.equal(a, b) for a, b in zip(wnet_before, strategy.weight_net.parameters(), strict=True)]
    assert all(changed)  # every layer of the weight network got a meta gradient
    for k, v in model.state_dict().items():  # the look-ahead touched neither weights nor running statistics
        assert torch.equal(v, model_before[k]), k

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = StepContext(model=model, forward=model.forward_all, lr=0.1, step=0, epoch=0)
    out = strategy.training_step(ctx, x, y)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    assert not torch.equal(model.heads[0].weight, model_before["heads.0.weight"])
    weights = strategy.sample_weights(torch.rand(32, 3)).detach()
    torch.testing.assert_close(weights.mean(0), torch.ones(3))  # centred: each exit's mean weight is 1
    assert float(weights.min()) >= 0.0 and float(weights.std()) > 0
    assert set(out.metrics) == {"l2w_meta_loss", "l2w_weight_std"} | {f"l2w_weight_loss_corr_{k}" for k in range(3)}


def test_l2w_weight_loss_correlation_tells_which_samples_an_exit_weights_more():
    """+1 where an exit's weights rise with its losses (hard samples count more), -1 where they fall, 0 if flat."""
    from adaptnn.strategies.l2w import weight_loss_correlation

    losses = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [4.0, 4.0, 4.0]])
    weights = torch.stack([1 + 0.1 * losses[:, 0], 1 - 0.05 * losses[:, 1], torch.ones(4)], dim=1)
    torch.testing.assert_close(weight_loss_correlation(weights, losses), torch.tensor([1.0, -1.0, 0.0]))
    noisy = torch.tensor([[0.9], [1.3], [0.8], [1.0]])  # rank order of losses 0,1,2,3 vs weights: 2,0,3,1
    expected = torch.corrcoef(torch.stack([noisy[:, 0], losses[:, 0]]))[0, 1]
    torch.testing.assert_close(weight_loss_correlation(noisy, losses[:, :1]), expected.reshape(1))


def test_l2w_centre_all_keeps_only_the_overall_mean_weight_at_one():
    torch.manual_seed(0)
    losses = torch.rand(16, 3) * 4
    by_exit, over_all = L2WLoss(centre="exit"), L2WLoss(centre="all")
    for strategy in (by_exit, over_all):
        strategy.setup(_mlp_model(num_exits=3))
    over_all.weight_net.load_state_dict(by_exit.weight_net.state_dict())
    w_exit, w_all = by_exit.sample_weights(losses).detach(), over_all.sample_weights(losses).detach()
    torch.testing.assert_close(w_exit.mean(0), torch.ones(3))
    torch.testing.assert_close(w_all.mean(), torch.tensor(1.0))
    assert not torch.allclose(w_all.mean(0), torch.ones(3))  # the balance between exits moved
    torch.testing.assert_close(w_all - w_all.mean(0), w_exit - w_exit.mean(0))  # same spread within each exit
    assert float(w_all.min()) >= 0.0


def test_l2w_meta_lr_follows_the_backbone_schedule_when_asked():
    torch.manual_seed(0)
    model = _mlp_model(num_exits=3).train()
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    for schedule, moves in (("follow", False), ("constant", True)):
        strategy = L2WLoss(meta_lr=1e-2, meta_lr_schedule=schedule)
        strategy.setup(model)
        before = [p.detach().clone() for p in strategy.weight_net.parameters()]
        strategy.meta_step(model, lr=0.1, x=x, y=y, lr_factor=0.0)  # the end of a cosine schedule
        after = list(strategy.weight_net.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)) == moves, schedule
    with pytest.raises(ConfigError, match="meta_lr_schedule must be 'constant' or 'follow', got 'cosine'"):
        L2WLoss(meta_lr_schedule="cosine")


def test_l2w_meta_reduction_exit_sums_each_exits_mean():
    torch.manual_seed(0)
    logits = [torch.randn(12, 4) for _ in range(3)]
    y = torch.randint(0, 4, (12,))
    probs = torch.stack([lg.softmax(-1) for lg in logits])
    exits = allocate_exits(probs.amax(-1), [1 / 3, 1 / 3, 1 / 3])
    per_sample = torch.stack([F.cross_entropy(logits[int(k)][i : i + 1], y[i : i + 1]) for i, k in enumerate(exits)])
    by_exit = sum(per_sample[exits == k].mean() for k in range(3) if bool((exits == k).any()))
    torch.testing.assert_close(L2WLoss(meta_reduction="exit").meta_loss(logits, y), by_exit)
    torch.testing.assert_close(L2WLoss().meta_loss(logits, y), per_sample.mean())
    with pytest.raises(ConfigError, match="centre must be 'exit' or 'all'.*got 'rows'"):
        L2WLoss(centre="rows")
    with pytest.raises(ConfigError, match="meta_reduction 'sample' or 'exit'; got 'exit', 'sum'"):
        L2WLoss(meta_reduction="sum")


@pytest.mark.parametrize("name", ["joint", "distill", "boost", "imta", "l2w", "frozen"])
def test_every_strategy_trains_through_the_trainer(tmp_path, name):
    torch.manual_seed(0)
    model = _mlp_model(num_exits=3)
    data = _toy_data()
    segments_before = copy.deepcopy(model.segments.state_dict())
    heads_before = copy.deepcopy(model.heads.state_dict())
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, device="cpu", progress=False, strategy=name, warmup_epochs=0.0)
    history = Trainer(model, data, cfg, tmp_path, val_set=data).fit()
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in history)
    assert len(history[-1]["val_exit_accuracy"]) == 3
    seg_same = all(torch.equal(v, model.segments.state_dict()[k]) for k, v in segments_before.items())
    heads_same = all(torch.equal(v, model.heads.state_dict()[k]) for k, v in heads_before.items())
    assert not heads_same
    assert seg_same == (name == "frozen")
    meta = json.loads((tmp_path / "checkpoints" / "last.json").read_text())
    assert meta["train_config"]["strategy"] == name
    assert bool(meta["strategy_state"]) == (name == "l2w")  # the weight network is checkpointed


def test_l2w_resume_equals_uninterrupted(tmp_path):
    data = _toy_data()
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, device="cpu", progress=False, strategy="l2w", seed=1)

    def fresh():
        torch.manual_seed(0)
        return _mlp_model(num_exits=3)

    model_a = fresh()
    trainer_a = Trainer(model_a, data, cfg, tmp_path / "a")
    trainer_a.fit()
    model_b = fresh()
    Trainer(model_b, data, TrainConfig(**dict(cfg.__dict__, epochs=1)), tmp_path / "b").fit()
    trainer_c = Trainer(fresh(), data, cfg, tmp_path / "b")
    trainer_c.fit(resume=True)
    for (name, a), b in zip(model_a.state_dict().items(), trainer_c.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    wnet_a, wnet_c = trainer_a.strategy.weight_net, trainer_c.strategy.weight_net
    for a, b in zip(wnet_a.parameters(), wnet_c.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fit_heads_cached_trains_heads_only():
    torch.manual_seed(0)
    model = _mlp_model(num_exits=3)
    data = _toy_data(n=256)
    segments_before = copy.deepcopy(model.segments.state_dict())
    history = fit_heads_cached(model, data, epochs=15, batch_size=32, lr=0.02)
    assert all(torch.equal(v, model.segments.state_dict()[k]) for k, v in segments_before.items())
    first, last = history[0]["train_exit_accuracy"], history[-1]["train_exit_accuracy"]
    assert all(b > a for a, b in zip(first, last, strict=True)), (first, last)
    with pytest.raises(ConfigError, match="max_cache_bytes"):
        fit_heads_cached(model, data, epochs=1, max_cache_bytes=1000)


def test_msdnet_heads_read_only_the_coarsest_scale():
    from adaptnn.strategies.gradient import head_read_mask

    model = create_model("msdnet_cifar10", n_blocks=3, step=2, base=4, step_mode="even")
    masks: list[list[bool]] = []
    model.walk(torch.randn(2, 3, 32, 32), head=lambda k, head, state: masks.append(head_read_mask(head, state)))
    assert all(mask[-1] and not any(mask[:-1]) for mask in masks)
    assert any(len(mask) > 1 for mask in masks)  # nested states: the finer maps are not read
