"""Head factory: per-family defaults, head MACs by hand, and the head budget on ResNet-50."""

import pytest
import torch

from adaptnn import ConfigError, create_model
from adaptnn.layers.heads import (
    ConvPoolHead,
    MSDNetConvHead,
    PoolLinearHead,
    TokenHead,
    default_head_kind,
    make_head,
)
from adaptnn.runtime.cost import count_macs, heads_share


def test_family_defaults():
    assert isinstance(make_head("cnn", 32, 10), PoolLinearHead)
    assert isinstance(make_head("msdnet", 32, 10), MSDNetConvHead)
    vit = make_head("vit", 48, 10)
    assert isinstance(vit, TokenHead) and isinstance(vit.norm, torch.nn.LayerNorm) and vit.pool == "cls"
    enc = make_head("encoder", 48, 10)
    assert isinstance(enc, TokenHead) and isinstance(enc.hidden, torch.nn.Sequential)  # BERT-pooler style
    assert make_head("encoder", 48, 10, hidden=False).hidden.__class__ is torch.nn.Identity  # options override
    assert default_head_kind("cnn") == "pool_linear"
    with pytest.raises(ConfigError, match="unknown head kind"):
        make_head("mystery", 8, 2)
    with pytest.raises(ConfigError, match="head 'pool_linear'"):
        make_head("pool_linear", 8, 2, width=3)
    with pytest.raises(ConfigError, match="unknown backbone family"):
        default_head_kind("rnn")


def test_head_macs_by_hand():
    assert count_macs(make_head("pool_linear", 64, 10), (64, 8, 8)) == 64 * 10
    assert count_macs(ConvPoolHead(64, 10, width=16), (64, 8, 8)) == 8 * 8 * 64 * 16 + 16 * 10
    # MSDNet head: 3x3 s2 convs 8x8 -> 4x4 -> 2x2 with 128 channels, then linear
    assert count_macs(MSDNetConvHead(32, 10), (32, 8, 8)) == 4 * 4 * 128 * 32 * 9 + 2 * 2 * 128 * 128 * 9 + 128 * 10
    assert count_macs(make_head("vit", 48, 10), (5, 48)) == 48 * 10
    assert count_macs(make_head("encoder", 48, 10), (5, 48)) == 48 * 48 + 48 * 10


def test_heads_read_their_state_layouts():
    maps = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    assert MSDNetConvHead(16, 3)(maps).shape == (2, 3)  # reads the coarsest scale of a list state
    tokens = torch.randn(2, 5, 6)
    head = TokenHead(6, 3, pool="mean", num_prefix_tokens=1, norm=False)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = head({"hidden": tokens, "mask": mask})
    want = head.fc(torch.stack([tokens[0, 1:3].mean(0), tokens[1, 1:].mean(0)]))  # padding excluded
    torch.testing.assert_close(got, want)
    cls = TokenHead(6, 3, pool="cls", norm=False)
    torch.testing.assert_close(cls(tokens), cls.fc(tokens[:, 0]))


def test_default_heads_stay_under_5_percent_of_resnet50():
    model = create_model("torchvision_staged", arch="resnet50", verify=False)
    share = heads_share(model, (3, 224, 224))
    assert share["head_macs"] == [256 * 1000, 512 * 1000, 1024 * 1000, 2048 * 1000]
    assert share["share"] < 0.05
    assert share["added_share"] < share["share"]
    assert 4.0e9 < share["backbone_macs"] < 4.2e9  # ResNet-50: 4.1 GMACs
