"""SN-Net stitching of two members of one elastic family with a least-squares-initialised stitching layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adaptnn
from adaptnn.errors import ConfigError
from adaptnn.layers.elastic import least_squares_stitch, stitch


@pytest.fixture(scope="module")
def members():
    torch.manual_seed(0)
    model = adaptnn.create_model("elastic_cnn_digits", width_mults=[0.5, 1.0], depths=[2]).eval()
    return model.materialise(model.smallest).eval(), model.materialise(model.largest).eval()


def test_stitching_a_member_to_itself_reproduces_it(members):
    small, _ = members
    x = torch.randn(32, 1, 8, 8)
    stitched = stitch(small, small, after=1, sample=x).eval()
    with torch.no_grad():
        for a, b in zip(small.forward_all(x), stitched.forward_all(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_small_to_large_stitch_is_the_least_squares_map(members):
    small, large = members
    x = torch.randn(48, 1, 8, 8)
    stitched = stitch(small, large, after=1, sample=x).eval()
    assert stitched.heads[0] is small.heads[0] and stitched.heads[3] is large.heads[3]
    with torch.no_grad():
        f = small.segments[1](small.segments[0](x))  # [b, 16, h, w]
        g = large.segments[1](large.segments[0](x))  # [b, 32, h, w]
        layer = stitched.segments[2][0]
        fitted = (layer(f) - g).pow(2).sum()
        padded = (F.pad(f, (0, 0, 0, 0, 0, g.shape[1] - f.shape[1])) - g).pow(2).sum()  # a feasible map: [I, 0]
        assert fitted <= padded + 1e-3
        out = stitched.forward_all(x)
    assert len(out) == 4 and all(o.shape == (48, 10) for o in out)


def test_stitch_errors(members):
    small, large = members
    with pytest.raises(ConfigError, match="after segment 3"):
        stitch(small, large, after=3, sample=torch.randn(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="cannot stitch"):
        least_squares_stitch(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2))
    lin = least_squares_stitch(torch.randn(64, 5), torch.randn(64, 7))
    assert tuple(lin.weight.shape) == (7, 5)
