"""Inline subnetwork collaboration (IMTA stage two): exits read the previous prediction; early exit stays real."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from adaptnn.errors import CheckpointError, ConfigError
from adaptnn.io.checkpoint import save_checkpoint
from adaptnn.layers.collaboration import PredictExit, inline_collaboration
from adaptnn.models import create_model, load_model
from adaptnn.policies import ConfidencePolicy
from adaptnn.runs import RunConfig, load_config, train_run
from adaptnn.runs.train import initialise_from
from adaptnn.runtime import InputSpec, StagedModel
from adaptnn.strategies import get
from adaptnn.training import TrainConfig, Trainer
from helpers import assert_realised_equals_simulated, between_middle_values, randomise_stats


class _LinearHead(nn.Module):
    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(x)


def _mlp(num_exits=3, width=8, features=5, classes=4, head=_LinearHead):
    segments = [nn.Sequential(nn.Linear(features if i == 0 else width, width), nn.Tanh()) for i in range(num_exits)]
    return StagedModel(segments, [head(width, classes) for _ in range(num_exits)], input_spec=InputSpec((features,)))


def _randomise_isc(model: StagedModel, seed: int = 0) -> StagedModel:
    """Random ISC weights and running statistics: every later exit now depends on the previous prediction."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, PredictExit) and module.isc is not None:
            with torch.no_grad():
                for p in [*module.isc.parameters(), module.classifier.weight]:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
                module.isc[1].running_mean.copy_(torch.randn(module.isc[1].running_mean.shape, generator=gen))
    return model


def test_starts_from_stage_one_predictions_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = randomise_stats(create_model("msdnet_test_tiny").double().eval())
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    collab = inline_collaboration(model).eval()
    with torch.no_grad():
        for ours, theirs in zip(collab.forward_all(x), model.forward_all(x), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    assert all(isinstance(head.fc, nn.Linear) for head in model.heads)  # the source model still has its heads
    assert all(p.requires_grad for p in model.parameters())


def test_each_exit_reads_the_previous_exits_prediction():
    torch.manual_seed(0)
    model = _mlp()
    collab = _randomise_isc(inline_collaboration(model)).eval()
    x = torch.randn(7, 5)
    with torch.no_grad():
        expected, state, previous = [], x, None
        for k, segment in enumerate(model.segments):
            state = segment(state)
            end = collab.segments[k]
            features = state if previous is None else torch.cat([state, end.isc(previous)], dim=1)
            previous = end.classifier(features)
            expected.append(previous)
        got = collab.forward_all(x)
    for k in range(3):
        torch.testing.assert_close(got[k], expected[k])
    assert not torch.allclose(got[1], model.heads[1](model.segments[1](model.segments[0](x))))


def test_realised_early_exit_equals_simulated():
    torch.manual_seed(0)
    model = randomise_stats(create_model("msdnet_test_tiny").double().eval())
    collab = _randomise_isc(inline_collaboration(model)).double().eval()
    x = torch.randn(11, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        cached = collab.forward_all(x)
    confidence = torch.stack([lg.softmax(-1).amax(-1) for lg in cached])
    policy = ConfidencePolicy([float(confidence[0].median()), float(confidence[1].median())])
    exits = assert_realised_equals_simulated(collab, x, policy, cached, batch_sizes=[1, 4, 11])
    assert len(set(exits.tolist())) > 1  # samples left at more than one exit
    costs, base = collab.exit_costs(x), model.exit_costs(x)
    assert costs[0] == base[0] and bool((costs[1:] > base[1:]).all())  # ISC costs from exit 1 on


def test_only_the_new_classifiers_and_isc_modules_train():
    torch.manual_seed(0)
    collab = inline_collaboration(_mlp()).train()
    trainable = {name for name, p in collab.named_parameters() if p.requires_grad}
    assert trainable and all(".classifier." in name or ".isc." in name for name in trainable)
    before = {name: p.detach().clone() for name, p in collab.named_parameters()}
    optimizer = torch.optim.SGD([p for p in collab.parameters() if p.requires_grad], lr=0.5)
    x, y = torch.randn(16, 5), torch.randint(0, 4, (16,))
    for _ in range(2):  # the ISC modules get gradients once the classifiers' ISC weights left zero (step 2)
        optimizer.zero_grad()
        sum(nn.functional.cross_entropy(lg, y) for lg in collab.forward_all(x)).backward()
        optimizer.step()
    for name, p in collab.named_parameters():
        assert torch.equal(p, before[name]) != (name in trainable), name
    unfrozen = inline_collaboration(_mlp(), freeze=False)
    assert all(p.requires_grad for p in unfrozen.parameters())


def test_heads_without_a_final_linear_layer_are_refused():
    with pytest.raises(ConfigError, match="heads ending in a linear layer named 'fc'; head 0 \\(Linear\\) has none"):
        inline_collaboration(_mlp(head=nn.Linear))


def test_imta_isc_trains_only_the_collaboration_and_checkpoints_round_trip(tmp_path):
    torch.manual_seed(0)
    stage_one = create_model("msdnet_test_tiny")
    model = inline_collaboration(stage_one)
    model.model_spec = {"name": "msdnet_test_tiny", "kwargs": {"collaboration": "inline"}}
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, stage_one.num_classes, (48,), generator=gen)
    data = TensorDataset(torch.randn(48, 3, 16, 16, generator=gen), labels)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.1, device="cpu", progress=False, strategy="imta_isc")
    Trainer(model, data, cfg, tmp_path).fit()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(".classifier." in name or ".isc." in name for name in changed)
    assert any(".isc." in name for name in changed)
    reloaded = load_model(tmp_path / "checkpoints" / "last.safetensors").eval()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        for ours, theirs in zip(model.eval().forward_all(x), reloaded.forward_all(x), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_imta_isc_refuses_a_model_without_collaborative_exits():
    with pytest.raises(ConfigError, match="imta_isc trains IMTA's stage-two model.*this model has none"):
        get("imta_isc").setup(_mlp())
    with pytest.raises(ConfigError, match="collaboration must be 'none' or 'inline', got 'yes'"):
        create_model("msdnet_test_tiny", collaboration="yes")


def test_a_collaborative_msdnet_exports_stage_by_stage(tmp_path):
    """The carried ``(state, logits)`` pair is a nested state like any other: export_stages verifies the ONNX stages
    against run_dynamic before writing them."""
    from adaptnn.export import StagesRunner, export_stages

    torch.manual_seed(0)
    model = _randomise_isc(randomise_stats(create_model("msdnet_test_tiny", collaboration="inline"))).eval()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        confidence = torch.stack([lg.softmax(-1).amax(-1) for lg in model.forward_all(x)])
    # not at the median: the median sample's exit flipped by onnxruntime-vs-PyTorch float noise on an AVX-512 Xeon
    policy = ConfidencePolicy([between_middle_values(confidence[0]), between_middle_values(confidence[1])])
    out = export_stages(model, policy, x, tmp_path / "onnx", exporter="torchscript")
    ours = model.run_dynamic(x, policy)
    logits, exits, _ = StagesRunner(out).run(x)
    assert torch.equal(torch.as_tensor(exits), ours.exit_index)
    assert 0 < int((ours.exit_index == 0).sum()) < len(x)  # a mix of exits: the carried prediction is compacted
    torch.testing.assert_close(torch.as_tensor(logits), ours.logits, atol=1e-4, rtol=1e-4)


def test_init_from_starts_a_collaborative_model_from_a_plain_checkpoint(tmp_path):
    torch.manual_seed(0)
    plain = randomise_stats(create_model("msdnet_test_tiny")).eval()
    path = save_checkpoint(tmp_path / "stage_one.safetensors", plain, {"model_spec": plain.model_spec})
    collab = create_model("msdnet_test_tiny", collaboration="inline")
    initialise_from(collab, path)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        for ours, theirs in zip(collab.eval().forward_all(x), plain.forward_all(x), strict=True):
            torch.testing.assert_close(ours, theirs)
    same = create_model("msdnet_test_tiny")
    initialise_from(same, path)  # a plain checkpoint into its own architecture: fine-tuning
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), plain.state_dict().values(), strict=True))
    with pytest.raises(CheckpointError, match="model.init_from"):
        initialise_from(create_model("mecnn_digits"), path)


def test_a_run_with_init_from_starts_from_those_weights(tmp_path, caplog):
    config = {
        "data": {"name": "digits", "val_size": 100, "augment": False},
        "model": {"name": "mecnn_digits", "kwargs": {"widths": [4, 4, 4, 4]}},
        "train": {"epochs": 1, "batch_size": 256, "lr": 0.05, "device": "cpu", "progress": False},
    }
    first = train_run(RunConfig.from_dict(config), tmp_path / "first")
    config["model"]["init_from"] = str(first)
    with caplog.at_level("INFO", logger="adaptnn.runs.train"):
        train_run(RunConfig.from_dict(config), tmp_path / "second")
    assert f"initialised the weights from {first}" in caplog.text
    assert load_config(tmp_path / "second" / "config.yaml").model.init_from == str(first)  # round-trips
    with pytest.raises(ConfigError, match="model.init_from must be the path of a .safetensors checkpoint, got ''"):
        RunConfig.from_dict(dict(config, model=dict(config["model"], init_from=""))).validate()
