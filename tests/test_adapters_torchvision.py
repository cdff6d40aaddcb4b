"""torchvision adapter: explicit segment lists, lossless last exit, stage exits, checkpoints."""

import pytest
import torch
import torchvision

from adaptnn import ConfidencePolicy, ConfigError, create_model
from adaptnn.adapters import from_torchvision
from adaptnn.io import save_checkpoint
from adaptnn.layers.heads import PoolLinearHead
from adaptnn.models import load_model
from adaptnn.policies import simulate_exits


def _randomise_bn(model):
    gen = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


@pytest.mark.parametrize(
    "arch, stage_chs",
    [("resnet18", [64, 128, 256]), ("mobilenet_v3_small", [16, 24, 48]), ("mobilenet_v2", [24, 32, 96])],
)
def test_last_exit_is_the_original_model(arch, stage_chs):
    original = torchvision.models.get_model(arch, num_classes=9)
    _randomise_bn(original)
    original.eval()
    staged = from_torchvision(original, input_size=(3, 64, 64)).eval()
    # one exit per resolution at strides 4, 8, 16, then the original classifier at stride 32
    assert staged.num_exits == 4
    assert all(isinstance(h, PoolLinearHead) for h in staged.heads[:-1])
    assert [h.fc.in_features for h in staged.heads[:-1]] == stage_chs
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = original(x)
        outs = staged.forward_all(x)
        assert torch.equal(outs[-1], ref)
        assert torch.equal(staged(x), ref)


def test_dynamic_equals_simulated_and_checkpoint_round_trip(tmp_path):
    model = create_model("torchvision_staged", arch="resnet18", num_classes=5, input_size=(3, 32, 32)).eval()
    x = torch.randn(20, 3, 32, 32)
    with torch.no_grad():
        logits = torch.stack(model.forward_all(x))
    thresholds = [float(lg.softmax(-1).amax(-1).median()) + 1e-6 for lg in logits[:-1]]
    policy = ConfidencePolicy(thresholds)
    exit_sim, _ = simulate_exits(policy, logits)
    assert torch.equal(model.run_dynamic(x, policy).exit_index, exit_sim)
    path = save_checkpoint(tmp_path / "tv.safetensors", model, {"model_spec": model.model_spec})
    loaded = load_model(path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_exit_selection_and_unsupported_models():
    two = from_torchvision("resnet18", exits=[-1], num_classes=3, input_size=(3, 32, 32))
    assert two.num_exits == 2 and two.heads[0].fc.in_features == 256
    with pytest.raises(ConfigError, match="supports ResNet"):
        from_torchvision(torchvision.models.squeezenet1_1(num_classes=3))
    with pytest.raises(ConfigError, match="no classification model"):
        from_torchvision("resnet_nope")
