"""Matryoshka nested-embedding head: truncations share one embedding, only trained truncations are valid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaptnn.errors import ConfigError
from adaptnn.layers.elastic import MatryoshkaHead, matryoshka_loss


def test_truncations_are_prefixes_of_one_embedding():
    torch.manual_seed(0)
    head = MatryoshkaHead(8, 3, embed_dim=16, dims=[2, 4, 8])
    assert head.dims == (2, 4, 8, 16)
    x = torch.randn(5, 8, 3, 3)
    full = head.embed(x)
    nested = head.forward_nested(x)
    for m, logits in zip(head.dims, nested, strict=True):
        head.set_dim(m)
        assert torch.equal(head.embed(x), full[:, :m])
        torch.testing.assert_close(head(x), logits)
        torch.testing.assert_close(logits, full[:, :m] @ head.fc.weight[:, :m].T + head.fc.bias)
    with pytest.raises(ConfigError, match="truncation 3 was not trained; valid truncations: 2, 4, 8, 16"):
        head.set_dim(3)


def test_matryoshka_loss_and_training_makes_small_truncations_useful():
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    head = MatryoshkaHead(6, 4, embed_dim=32, dims=[2, 8])
    logits = head.forward_nested(x)
    expected = sum(w * F.cross_entropy(lg, y) for w, lg in zip([1.0, 0.5, 2.0], logits, strict=True))
    torch.testing.assert_close(matryoshka_loss(logits, y, [1.0, 0.5, 2.0]), expected)
    with pytest.raises(ConfigError, match="2 weights for 3"):
        matryoshka_loss(logits, y, [1.0, 1.0])
    opt = torch.optim.Adam(head.parameters(), lr=0.1)
    for _ in range(60):
        opt.zero_grad()
        matryoshka_loss(head.forward_nested(x), y).backward()
        opt.step()
    with torch.no_grad():
        accs = [(lg.argmax(-1) == y).float().mean().item() for lg in head.forward_nested(x)]
    assert min(accs) > 0.9  # even the 2-dim prefix classifies (4 quadrant classes of 2 features)
