"""MAC counting against hand-computed values."""

import itertools

import pytest
import torch
from torch import nn

from adaptnn import StagedModel, create_model
from adaptnn.layers.heads import PoolLinearHead
from adaptnn.runtime import InputSpec
from adaptnn.runtime.cost import cost_breakdown, count_macs, exit_macs


def test_conv_and_linear_macs_by_hand():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=True)
    assert count_macs(conv, (3, 10, 10)) == 10 * 10 * 8 * 3 * 3 * 3  # out pixels * Cout * Cin * k * k
    strided = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, groups=2)
    assert count_macs(strided, (4, 8, 8)) == 4 * 4 * 6 * (4 // 2) * 9
    assert count_macs(nn.Linear(20, 7), (20,)) == 20 * 7
    # normalisation, activation and pooling are not counted
    assert count_macs(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1)), (3, 5, 5)) == 0


def test_exit_macs_are_cumulative_with_heads():
    segments = [
        nn.Conv2d(1, 4, 3, padding=1),  # 8*8*4*1*9 = 2304
        nn.Conv2d(4, 8, 3, stride=2, padding=1),  # 4*4*8*4*9 = 4608
    ]
    heads = [PoolLinearHead(4, 3), PoolLinearHead(8, 3)]  # 12 and 24
    model = StagedModel(segments, heads, input_spec=InputSpec((1, 8, 8)))
    breakdown = cost_breakdown(model, (1, 8, 8))
    assert breakdown.segment_macs == [2304, 4608]
    assert breakdown.head_macs == [12, 24]
    assert exit_macs(model, (1, 8, 8)) == [2304 + 12, 2304 + 4608 + 12 + 24]
    assert breakdown.exit_params[0] == sum(p.numel() for p in segments[0].parameters()) + sum(
        p.numel() for p in heads[0].parameters()
    )


def test_counting_does_not_touch_real_weights_and_any_size_is_cheap():
    model = create_model("mecnn_cifar", input_size=(224, 224))
    before = [p.clone() for p in model.parameters()]
    macs = exit_macs(model, (3, 224, 224))
    assert all(b > a for a, b in itertools.pairwise(macs))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert next(model.parameters()).device.type == "cpu"


def test_input_size_without_batch_dim_is_required():
    model = create_model("mecnn_digits")
    with pytest.raises(ValueError, match="no batch dim"):
        exit_macs(model, (1, 1, 8, 8))
