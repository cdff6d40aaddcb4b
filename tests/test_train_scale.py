"""Trainer scaling features: DDP through torchrun, gradient accumulation, channels_last, bf16, TensorBoard.

Run as a script (``torchrun --nproc_per_node 2 tests/test_train_scale.py OUT``) this file is also the DDP
worker of :func:`test_ddp_two_processes_equal_one_process`.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from adaptnn.errors import AdaptnnError, ConfigError, DivergedLossError
from adaptnn.runtime import InputSpec, StagedModel
from adaptnn.strategies import JointLoss, StepOutput
from adaptnn.training import TrainConfig, Trainer, micro_batch_indices


def _model():
    torch.manual_seed(0)
    segs = [nn.Sequential(nn.Linear(6 if i == 0 else 16, 16), nn.Tanh()) for i in range(3)]
    model = StagedModel(segs, [nn.Linear(16, 4) for _ in range(3)], input_spec=InputSpec((6,)), num_classes=4)
    model.model_spec = {"name": "test_mlp", "kwargs": {}}
    return model


def _data(n=128):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return torch.utils.data.TensorDataset(x, x[:, :4].argmax(1))


def _config(**kw):
    base = dict(epochs=2, batch_size=32, lr=0.1, device="cpu", progress=False, seed=5, weight_decay=1e-3)
    return TrainConfig(**dict(base, **kw))


def test_micro_batches_partition_the_global_batches():
    one = micro_batch_indices(50, 16, seed=1, epoch=2)
    assert [len(b) for b in one] == [1, 1, 1] and all(len(b[0]) == 16 for b in one)
    ranks = [micro_batch_indices(50, 16, seed=1, epoch=2, world_size=2, rank=r, accum_steps=2) for r in range(2)]
    for b, batch in enumerate(one):
        parts = ranks[0][b] + ranks[1][b]
        assert [len(p) for p in parts] == [4, 4, 4, 4]
        assert sum(parts, []) == batch[0]  # same samples, same order, split contiguously
    assert micro_batch_indices(50, 16, seed=1, epoch=3) != one  # the order changes with the epoch


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    model_a, model_b = _model(), _model()
    Trainer(model_a, _data(), _config(), tmp_path / "a").fit()
    Trainer(model_b, _data(), _config(grad_accum_steps=4), tmp_path / "b").fit()
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_channels_last_bf16_and_option_errors(tmp_path):
    from adaptnn import create_model

    torch.manual_seed(0)
    model = create_model("mecnn_digits", widths=[4, 4, 8, 8])
    x = torch.randn(40, 1, 8, 8)
    data = torch.utils.data.TensorDataset(x, torch.randint(0, 10, (40,)))
    cfg = _config(epochs=1, batch_size=20, channels_last=True, precision="bf16", optimizer="adamw", lr=1e-3)
    history = Trainer(model, data, cfg, tmp_path, val_set=data).fit()
    assert torch.isfinite(torch.tensor(history[0]["train_loss"]))
    assert model.segments[0][0][0].weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ConfigError, match="precision"):
        Trainer(_model(), _data(), _config(precision="fp16"), tmp_path)
    with pytest.raises(ConfigError, match="global batch"):
        Trainer(_model(), _data(), _config(batch_size=2, grad_accum_steps=4), tmp_path)


def test_diverged_loss_is_its_own_error(tmp_path):
    def nan_loss(exit_logits, targets):
        return sum(lg.sum() for lg in exit_logits) * float("nan")

    with pytest.raises(DivergedLossError, match="lower train.lr") as info:
        Trainer(_model(), _data(), _config(epochs=1), tmp_path, loss_fn=nan_loss).fit()
    assert isinstance(info.value, AdaptnnError)  # the CLI prints it as one line


class _CountingLoss(JointLoss):
    """Joint loss reporting the micro-batch size (a tensor) and the step (a float), the latter on odd steps."""

    def training_step(self, ctx, x, y):
        metrics = {"batch": torch.tensor(float(len(y)))}
        if ctx.step % 2:
            metrics["odd_step"] = float(ctx.step)
        return StepOutput(super().training_step(ctx, x, y).loss, metrics)


def test_trainer_averages_the_strategies_step_metrics(tmp_path):
    cfg = _config(epochs=2, grad_accum_steps=2)  # 4 steps of 2 micro-batches (16 samples) per epoch
    history = Trainer(_model(), _data(), cfg, tmp_path, loss_fn=_CountingLoss()).fit()
    assert [(h["batch"], h["odd_step"]) for h in history] == [(16.0, 2.0), (16.0, 6.0)]  # mean of 1, 3 and 5, 7
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["odd_step"] for line in lines] == [2.0, 6.0]


def test_tensorboard_scalars_or_clear_error(tmp_path):
    trainer = Trainer(_model(), _data(), _config(epochs=1, tensorboard=True), tmp_path)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            trainer.fit()
        return
    trainer.fit()
    assert any((tmp_path / "tensorboard").iterdir())


def test_strategy_is_part_of_the_run_config():
    from adaptnn.runs.config import RunConfig

    config = RunConfig.from_dict({"train": {"strategy": "boost", "strategy_options": {"r": 0.25}}})
    assert RunConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="train.strategy must be one of"):
        TrainConfig(strategy="bost").validate()


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    model_a, model_b = _model(), _model()
    Trainer(model_a, _data(), _config(epochs=1), tmp_path / "a").fit()
    Trainer(model_b, _data(), _config(epochs=1, compile=True), tmp_path / "b").fit()
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy", ["joint", "imta"])  # imta: a custom training forward under DDP
def test_ddp_two_processes_equal_one_process(tmp_path, strategy):
    Trainer(_model(), _data(), _config(strategy=strategy), tmp_path / "single").fit()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), __file__, str(tmp_path / "ddp"), strategy,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = load_file(tmp_path / "single" / "checkpoints" / "last.safetensors")
    ddp = load_file(tmp_path / "ddp" / "checkpoints" / "last.safetensors")
    weights = [k for k in single if k.startswith("model.")]
    assert weights
    for key in weights:
        torch.testing.assert_close(single[key], ddp[key], rtol=1e-5, atol=1e-6, msg=key)
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]  # rank 0 alone writes the log


if __name__ == "__main__":  # DDP worker, launched by torchrun
    torch.set_num_threads(1)
    out, strategy_name = Path(sys.argv[1]), sys.argv[2]
    trainer = Trainer(_model(), _data(), _config(strategy=strategy_name), out)
    assert trainer.world_size == 2
    trainer.fit()
