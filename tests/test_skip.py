"""Per-sample layer skipping: realised (gather/scatter) == simulated (dense) decisions and outputs; gate training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptnn.errors import ConfigError
from adaptnn.layers.skip import (
    GatedBlock,
    ResidualBlock,
    gated_blocks,
    record_gates,
    set_skip_mode,
    skip_cost_penalty,
)


def _body(seed: int, channels: int = 4, blocks: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)
    body = nn.Sequential(*[GatedBlock(ResidualBlock(channels), channels) for _ in range(blocks)]).double()
    for block in gated_blocks(body):  # random gates: about half the samples run each block
        nn.init.normal_(block.gate.fc.weight, std=3.0)
        nn.init.normal_(block.gate.fc.bias, std=0.5)
    for m in body.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return body.eval()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("channels_last", [False, True])
def test_realised_equals_simulated_for_random_gates_and_batch_sizes(seed, channels_last):
    body = _body(seed)
    some_skipped = False
    for batch in (1, 2, 5, 16):
        x = torch.randn(batch, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + batch))
        if channels_last:
            body = body.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        outs, decisions = {}, {}
        for mode in ("gather", "dense"):
            set_skip_mode(body, mode)
            with torch.no_grad(), record_gates(body) as records:
                outs[mode] = body(x)
            decisions[mode] = torch.stack(records)  # [blocks, batch]
        assert torch.equal(decisions["gather"], decisions["dense"])
        torch.testing.assert_close(outs["gather"], outs["dense"], rtol=0, atol=1e-12)
        if channels_last and batch > 1:
            assert outs["gather"].is_contiguous(memory_format=torch.channels_last)
        some_skipped |= bool((~decisions["gather"]).any()) and bool(decisions["gather"].any())
    assert some_skipped  # the check covered partial batches, not only all-or-nothing


def test_all_or_nothing_gates():
    body = _body(0)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    for block in gated_blocks(body):
        block.threshold = float("inf")
    assert torch.equal(body(x), x)  # every block skipped: the identity
    for block in gated_blocks(body):
        block.threshold = float("-inf")
    plain = nn.Sequential(*[b.block for b in gated_blocks(body)])
    assert torch.equal(body(x), plain(x))  # every block run: the plain network


def test_gumbel_gates_with_cost_penalty_learn_the_target_keep_rate():
    torch.manual_seed(0)
    body = nn.Sequential(*[GatedBlock(ResidualBlock(4), 4, tau=0.5) for _ in range(3)]).train()
    opt = torch.optim.SGD([p for b in gated_blocks(body) for p in b.gate.parameters()], lr=4.0)
    x = torch.randn(16, 4, 3, 3)
    for _ in range(25):
        with record_gates(body) as probs:
            out = body(x)
        loss = skip_cost_penalty(probs, target=0.5) + 0.0 * out.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad(), record_gates(body) as probs:
        body(x)
    assert abs(torch.stack(probs).mean().item() - 0.5) < 0.05
    body.eval()
    with torch.no_grad(), record_gates(body) as decisions:
        body(x)
    assert 0.2 < torch.stack(decisions).float().mean().item() < 0.8


def test_penalty_and_mode_errors():
    with pytest.raises(ConfigError, match="no gate"):
        skip_cost_penalty([], 0.5)
    with pytest.raises(ConfigError, match="target"):
        skip_cost_penalty([torch.ones(2)], 1.5)
    with pytest.raises(ConfigError, match="gather"):
        set_skip_mode(nn.Sequential(), "sparse")
    penalty = skip_cost_penalty([torch.ones(4), torch.zeros(4)], 0.25, block_costs=[3.0, 1.0])
    assert penalty.item() == pytest.approx((0.75 - 0.25) ** 2)
