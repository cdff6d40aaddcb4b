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


# --- recipe switches (issue 12): Nesterov vs plain momentum, decay on norms/biases, multistep schedule ---


def _groups_by_decay(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    """Each parameter's id -> the weight decay of its group."""
    return {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("norm_bias", [True, False])
def test_optimizer_follows_recipe_switches(nesterov, norm_bias):
    from adaptnn.training.schedule import build_optimizer

    model = create_model("mecnn_digits", widths=[8, 8, 16, 16])
    cfg = TrainConfig(weight_decay=1e-4, nesterov=nesterov, weight_decay_norm_bias=norm_bias, device="cpu")
    cfg.validate()
    opt = build_optimizer(model, cfg)
    assert all(g["nesterov"] is nesterov and g["momentum"] == 0.9 for g in opt.param_groups)
    decay = _groups_by_decay(opt)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(decay) == len(params)  # every trainable parameter exactly once
    assert any(p.dim() <= 1 for p in params) and any(p.dim() > 1 for p in params)
    for p in params:
        expected = 1e-4 if (p.dim() > 1 or norm_bias) else 0.0
        assert decay[id(p)] == expected


def test_recipe_switch_defaults_are_the_old_behaviour():
    """Nesterov on and no decay on norms/biases stay the defaults; zero momentum never asks for Nesterov."""
    from adaptnn.training.schedule import build_optimizer

    cfg = TrainConfig()
    assert cfg.nesterov is True and cfg.weight_decay_norm_bias is False and cfg.lr_schedule == "cosine"
    model = create_model("mecnn_digits", widths=[8, 8, 16, 16])
    opt = build_optimizer(model, TrainConfig(momentum=0.0))
    assert all(g["nesterov"] is False for g in opt.param_groups)


def test_multistep_schedule():
    from adaptnn.training.schedule import lr_factor, multistep_warmup_factor

    assert multistep_warmup_factor(0, 10, [50, 75], 0.1) == 0.1  # warm-up
    assert multistep_warmup_factor(49, 10, [50, 75], 0.1) == 1.0
    assert multistep_warmup_factor(50, 10, [50, 75], 0.1) == pytest.approx(0.1)
    assert multistep_warmup_factor(99, 10, [50, 75], 0.1) == pytest.approx(0.01)
    # the published MSDNet CIFAR recipe: 300 epochs, /10 at 150 and 225; milestones are epochs
    cfg = TrainConfig(epochs=300, warmup_epochs=0, lr_schedule="multistep", lr_milestones=[150, 225])
    cfg.validate()
    per_epoch = 10
    total = 300 * per_epoch
    assert lr_factor(cfg, 150 * per_epoch - 1, total, 0) == 1.0
    assert lr_factor(cfg, 150 * per_epoch, total, 0) == pytest.approx(0.1)
    assert lr_factor(cfg, 225 * per_epoch, total, 0) == pytest.approx(0.01)
    assert lr_factor(TrainConfig(epochs=3), 0, 30, 0) == 1.0  # cosine default


@pytest.mark.parametrize(
    "field,value,fragment",
    [
        ("nesterov", "yes", "train.nesterov must be true or false"),
        ("weight_decay_norm_bias", 1, "train.weight_decay_norm_bias must be true or false"),
        ("lr_schedule", "step", "train.lr_schedule must be one of"),
        ("lr_milestones", [5, 3], "strictly increasing"),
        ("lr_milestones", [40], "train.lr_milestones[0] must be in (0, 30)"),
        ("lr_milestones", 5, "must be a list of epochs"),
        ("lr_gamma", 0.0, "train.lr_gamma must be in (0, 1]"),
    ],
)
def test_recipe_switches_are_validated(field, value, fragment):
    from adaptnn.errors import ConfigError

    cfg = TrainConfig(epochs=30, **{field: value})
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert fragment in str(err.value)
    with pytest.raises(ConfigError, match="needs train.lr_milestones"):
        TrainConfig(lr_schedule="multistep").validate()


def test_recipe_switches_round_trip_yaml(tmp_path):
    from adaptnn.errors import ConfigError
    from adaptnn.runs.config import RunConfig, load_config, save_config

    cfg = RunConfig()
    cfg.train.nesterov = False
    cfg.train.weight_decay_norm_bias = True
    cfg.train.lr_schedule = "multistep"
    cfg.train.lr_milestones = [10.0, 20.0]
    cfg.train.lr_gamma = 0.2
    save_config(cfg, tmp_path / "c.yaml")
    back = load_config(tmp_path / "c.yaml")
    assert back.train == cfg.train
    text = (tmp_path / "c.yaml").read_text().replace("nesterov: false", "nesterof: false")
    (tmp_path / "d.yaml").write_text(text)
    with pytest.raises(ConfigError, match="nesterof"):
        load_config(tmp_path / "d.yaml")


@pytest.mark.integration
def test_multistep_lr_is_logged(tmp_path):
    """The Trainer applies the multistep schedule: the lr logged per epoch drops at the milestone."""
    model, splits = _tiny_setup()
    cfg = TrainConfig(
        epochs=2, batch_size=256, lr=0.1, warmup_epochs=0, lr_schedule="multistep", lr_milestones=[1],
        device="cpu", progress=False,
    )  # fmt: skip
    history = Trainer(model, splits.train, cfg, tmp_path / "r").fit()
    assert history[0]["lr"] == pytest.approx(0.1) and history[1]["lr"] == pytest.approx(0.01)
