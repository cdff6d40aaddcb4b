"""A curriculum under torchrun: rank 0 measures, every process follows its plan, the weights equal one process's.

Run as a script (``torchrun --nproc_per_node 2 tests/test_curriculum_ddp.py OUT``) this file is the DDP worker.
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

from adaptnn.layers.heads import PoolLinearHead
from adaptnn.runtime import InputSpec, StagedModel
from adaptnn.training import TrainConfig, Trainer
from adaptnn.training.config import CurriculumConfig

STAGES = [{"size": 6, "magnitude": 0.0}, {"size": None, "magnitude": 0.0}]  # no jitter: per-process random streams


def _model():
    torch.manual_seed(0)  # no batch norm: per-process statistics would differ from one process's
    segs = [nn.Sequential(nn.Conv2d(2 if i == 0 else 6, 6, 3, padding=1), nn.Tanh()) for i in range(2)]
    model = StagedModel(
        segs, [PoolLinearHead(6, 3) for _ in range(2)], input_spec=InputSpec((2, 12, 12)), num_classes=3
    )
    model.model_spec = {"name": "test_conv", "kwargs": {}}
    return model


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 12, 12, generator=g)
    return torch.utils.data.TensorDataset(x, (x.mean(dim=(1, 2, 3)) * 30).long().clamp(-1, 1) + 1)


def _config(step_ms=None):
    curriculum = CurriculumConfig(stages=STAGES, step_ms=step_ms)
    return TrainConfig(epochs=2, batch_size=16, lr=0.1, device="cpu", progress=False, seed=5, curriculum=curriculum)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_curriculum_under_torchrun_equals_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), __file__, str(tmp_path / "ddp"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((tmp_path / "ddp" / "checkpoints" / "last.json").read_text())["curriculum"]
    assert len(plan["step_ms"]) == 2 and plan["ends"][-1] == 8  # measured by rank 0, followed by both
    # one process given rank 0's measured times follows the same plan and reaches the same weights
    Trainer(_model(), _data(), _config(plan["step_ms"]), tmp_path / "single").fit()
    single = load_file(tmp_path / "single" / "checkpoints" / "last.safetensors")
    ddp = load_file(tmp_path / "ddp" / "checkpoints" / "last.safetensors")
    assert (
        json.loads((tmp_path / "single" / "checkpoints" / "last.json").read_text())["curriculum"]["ends"]
        == plan["ends"]
    )
    weights = [k for k in single if k.startswith("model.")]
    for key in weights:
        torch.testing.assert_close(single[key], ddp[key], rtol=1e-5, atol=1e-6, msg=key)


if __name__ == "__main__":  # DDP worker, launched by torchrun
    torch.set_num_threads(1)
    trainer = Trainer(_model(), _data(), _config(), Path(sys.argv[1]))
    assert trainer.world_size == 2
    trainer.fit()
