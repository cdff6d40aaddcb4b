"""Trainer: learns, checkpoints every epoch, and resuming reaches the same weights as one run."""

import json

import pytest
import torch

from adaptnn import create_model
from adaptnn.data import DataConfig, build_datasets
from adaptnn.training import TrainConfig, Trainer, cosine_warmup_factor


def _tiny_setup():
    torch.manual_seed(0)  # same initial weights every time
    splits = build_datasets(DataConfig(name="digits", val_size=200))
    model = create_model("mecnn_digits", widths=[8, 8, 16, 16])
    return model, splits


def test_cosine_warmup_schedule():
    assert cosine_warmup_factor(0, 100, 10) == 0.1
    assert cosine_warmup_factor(9, 100, 10) == 1.0
    assert abs(cosine_warmup_factor(55, 100, 10) - 0.5) < 1e-9
    assert cosine_warmup_factor(100, 100, 10, min_ratio=0.1) == 0.1


@pytest.mark.integration
def test_resume_equals_uninterrupted(tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=128, lr=0.05, device="cpu", progress=False, seed=3)
    model_a, splits = _tiny_setup()
    Trainer(model_a, splits.train, cfg, tmp_path / "a").fit()

    # interrupted right after the checkpoint of epoch 2, then resumed with a freshly built model
    model_b, _ = _tiny_setup()
    cfg_2 = TrainConfig(**cfg.__dict__)
    trainer = Trainer(model_b, splits.train, cfg_2, tmp_path / "b")
    calls = {"n": 0}
    original_save = trainer._save

    def save_then_stop(optimizer, epoch, step, record=None):
        original_save(optimizer, epoch, step, record)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    trainer._save = save_then_stop
    try:
        trainer.fit()
    except KeyboardInterrupt:
        pass
    model_c, _ = _tiny_setup()
    history = Trainer(model_c, splits.train, cfg_2, tmp_path / "b").fit(resume=True)
    assert [h["epoch"] for h in history] == [3]
    for (name, a), b in zip(model_a.state_dict().items(), model_c.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # the stop came between epoch 2's commit and its metrics line: resuming restored the line, once
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


@pytest.mark.integration
def test_training_improves_every_exit(tmp_path):
    _, splits = _tiny_setup()
    model = create_model("mecnn_digits")
    cfg = TrainConfig(epochs=5, batch_size=64, lr=0.003, device="cpu", progress=False, optimizer="adamw")
    trainer = Trainer(model, splits.train, cfg, tmp_path, val_set=splits.val)
    history = trainer.fit()
    accs = history[-1]["val_exit_accuracy"]
    assert len(accs) == 4 and min(accs) > 0.2 and accs[-1] > 0.8  # chance is 0.1
    assert (tmp_path / "checkpoints" / "last.safetensors").exists()
