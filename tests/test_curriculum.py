"""Curriculum (EfficientTrain): the low-pass transform, the stage plan, LR continuity and exact resume mid-stage."""

import json
import math

import pytest
import torch
import yaml

import adaptnn.training.curriculum as curriculum_mod
import adaptnn.training.trainer as trainer_mod
from adaptnn import create_model
from adaptnn.data.transforms import jitter_batch, lowpass_crop, resize_down
from adaptnn.errors import ConfigError
from adaptnn.runs.config import RunConfig
from adaptnn.strategies import JointLoss, StepOutput
from adaptnn.training import TrainConfig, Trainer, cosine_warmup_factor
from adaptnn.training.config import CurriculumConfig
from adaptnn.training.curriculum import CurriculumPlan, apply_stage, measure_step_ms, plan_steps, stages_of

# ---- transforms ------------------------------------------------------------------------------------


def test_lowpass_full_window_is_identity_and_keeps_low_frequencies():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 12, generator=g)
    torch.testing.assert_close(lowpass_crop(x, (16, 12)), x, rtol=0, atol=0)
    y = lowpass_crop(x, (8, 6))
    assert y.shape == (2, 3, 8, 6)
    torch.testing.assert_close(y.mean(dim=(-1, -2)), x.mean(dim=(-1, -2)), rtol=0, atol=1e-6)  # DC kept
    # a cosine below the new grid's Nyquist keeps its amplitude; one above it is removed
    i = torch.arange(16.0)
    low = torch.cos(2 * math.pi * 2 * i / 16)[:, None].expand(16, 12)
    out = lowpass_crop(low[None], (8, 12))[0]
    expected = torch.cos(2 * math.pi * 2 * torch.arange(8.0) / 8)[:, None].expand(8, 12)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    high = torch.cos(2 * math.pi * 6 * i / 16)[:, None].expand(16, 12)
    assert lowpass_crop(high[None], (8, 12)).abs().max() < 1e-5
    # the window of a window is the smaller window (projection onto nested frequency sets)
    torch.testing.assert_close(
        lowpass_crop(lowpass_crop(x, (11, 9)), (6, 5)), lowpass_crop(x, (6, 5)), atol=1e-5, rtol=0
    )
    with pytest.raises(ValueError):
        lowpass_crop(x, (17, 12))


def test_resize_and_jitter():
    x = torch.randn(3, 2, 10, 10)
    torch.testing.assert_close(resize_down(x, (10, 10)), x, rtol=0, atol=0)
    assert resize_down(x, (5, 4)).shape == (3, 2, 5, 4)
    state = torch.get_rng_state()
    assert jitter_batch(x, 0.0) is x  # magnitude 0: unchanged, no random numbers drawn
    assert torch.equal(torch.get_rng_state(), state)
    a = jitter_batch(x, 1.0, torch.Generator().manual_seed(1))
    b = jitter_batch(x, 1.0, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)


# ---- the plan ----------------------------------------------------------------------------------------


def test_plan_balances_measured_time():
    # a stage twice as slow per step gets half the steps: equal time per stage
    assert plan_steps([1, 1, 1], 70, [10.0, 20.0, 40.0]) == [40, 20, 10]
    assert plan_steps([1, 2], 30, None) == [10, 20]  # balance by steps
    counts = plan_steps([1, 1, 1], 10, [1.0, 1.0, 1000.0])
    assert sum(counts) == 10 and min(counts) >= 1  # every stage keeps a step
    cfg = CurriculumConfig(stages=[{"size": 8, "magnitude": 0.0}, {"size": 12}, {"magnitude": 1.0}])
    plan = CurriculumPlan.build(cfg, 70, [10.0, 20.0, 40.0])
    assert plan.ends == (40, 60, 70)
    assert [plan.stage_index(s) for s in (0, 39, 40, 59, 60, 69, 500)] == [0, 0, 1, 1, 2, 2, 2]
    assert plan.stage_at(0).input_size((16, 16)) == (8, 8) and plan.stage_at(69).input_size((16, 16)) == (16, 16)
    assert "40 steps" in plan.describe(10)
    # the stored plan replays as is; a longer run is re-planned from the stored step times
    again = curriculum_mod.resume_plan(cfg, 70, json.loads(json.dumps(plan.to_json())))
    assert again == plan
    assert curriculum_mod.resume_plan(cfg, 140, plan.to_json()).ends == (80, 120, 140)


def test_config_round_trips_through_yaml_and_checks_stages():
    config = RunConfig()
    config.train.curriculum = CurriculumConfig(stages=[{"size": 4, "magnitude": 0.2}, {"size": None, "share": 2.0}])
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    back = RunConfig.from_dict(yaml.safe_load(text)).validate()
    assert back.to_dict() == config.to_dict()
    assert stages_of(back.train.curriculum)[0].size == (4, 4)
    for bad in ([{"sise": 4}], [{"size": 0}], [{"magnitude": 2}], "x"):
        with pytest.raises(ConfigError, match="curriculum"):
            TrainConfig(curriculum=CurriculumConfig(stages=bad)).validate()
    with pytest.raises(ConfigError, match="step_ms"):
        TrainConfig(curriculum=CurriculumConfig(stages=[{}], step_ms=[1.0, 2.0])).validate()


# ---- training with a curriculum --------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two on a loaded box


def _model():
    torch.manual_seed(0)
    return create_model("mecnn_cifar", num_classes=4, input_size=[16, 16], widths=[4, 8, 8, 8], depth=1)


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long() + 2 * (x[:, 1].mean(dim=(1, 2)) > 0).long()
    return torch.utils.data.TensorDataset(x, y)


def _config(**kw):
    stages = [{"size": 8, "magnitude": 0.0}, {"size": 12, "magnitude": 0.5}, {"size": None, "magnitude": 1.0}]
    curriculum = CurriculumConfig(stages=stages, step_ms=[1.0, 2.0, 4.0])
    base = dict(epochs=4, batch_size=16, lr=0.05, device="cpu", progress=False, seed=2, curriculum=curriculum)
    return TrainConfig(**dict(base, **kw))


class _Recorder(JointLoss):
    """Joint loss that records every step's lr and input size."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, float, int]] = []

    def training_step(self, ctx, x, y):
        self.seen.append((ctx.step, ctx.lr, x.shape[-1]))
        return StepOutput(self(ctx.forward(x), y))


def test_lr_is_continuous_across_stage_switches(tmp_path):
    cfg = _config(warmup_epochs=0.5)
    recorder = _Recorder()
    trainer = Trainer(_model(), _data(), cfg, tmp_path, loss_fn=recorder)
    history = trainer.fit()
    plan = trainer.curriculum
    total = 4 * 4
    assert plan.ends == (9, 14, 16)  # 16 steps split 4 : 2 : 1 by the given step times
    steps = [s for s, _, _ in recorder.seen]
    assert steps == list(range(total))
    for step, lr, size in recorder.seen:  # one schedule over the whole run; the stage only changes the input
        assert lr == pytest.approx(cfg.lr * cosine_warmup_factor(step, total, 2))
        assert size == (8 if step < 9 else 12 if step < 14 else 16)
    assert [h["curriculum_stage"] for h in history] == [0, 0, 1, 2]
    assert history[-1]["input_size"] == [16, 16]
    assert trainer.model.input_spec.shape == (3, 16, 16)  # the size check is back after training
    meta = json.loads((tmp_path / "checkpoints" / "last.json").read_text())
    assert meta["curriculum"]["ends"] == [9, 14, 16]


def _interrupted_after(trainer, n_saves):
    original_save, calls = trainer._save, {"n": 0}

    def save_then_stop(optimizer, epoch, step, record=None):
        original_save(optimizer, epoch, step, record)
        calls["n"] += 1
        if calls["n"] == n_saves:
            raise KeyboardInterrupt

    trainer._save = save_then_stop
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()


def test_resume_mid_stage_is_bit_exact_with_measured_plan(tmp_path, monkeypatch):
    # measured step times (faked): the third measurement differs, and a resumed run must not use it
    times = iter([[1.0, 2.0, 4.0], [1.0, 2.0, 4.0], [4.0, 2.0, 1.0]])
    monkeypatch.setattr(trainer_mod, "measure_step_ms", lambda *a, **k: next(times))
    cfg = _config(curriculum=CurriculumConfig(stages=_config().curriculum.stages))  # balance by measured time
    full = Trainer(_model(), _data(), cfg, tmp_path / "a")
    full.fit()
    assert full.curriculum.ends == (9, 14, 16)
    part = Trainer(_model(), _data(), cfg, tmp_path / "b")
    _interrupted_after(part, 3)  # after epoch 3 (step 12): in the middle of the second stage (steps 9..13)
    resumed_model = _model()
    resumed = Trainer(resumed_model, _data(), cfg, tmp_path / "b")
    history = resumed.fit(resume=True)
    assert resumed.curriculum.ends == (9, 14, 16)  # the checkpoint's plan, not a new measurement
    assert [h["epoch"] for h in history] == [4]
    assert next(times) == [4.0, 2.0, 1.0]  # never measured on resume
    for (name, a), b in zip(full.model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_measuring_changes_nothing():
    model, data = _model(), _data(16)
    x, y = data.tensors
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    stages = stages_of(_config().curriculum)
    ms = measure_step_ms(model, JointLoss(), (x, y), stages, "lowpass", rounds=1, warmup_s=0.0)
    assert len(ms) == 3 and all(t > 0 for t in ms)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("strategy", ["joint", "distill", "boost", "l2w", "imta", "frozen"])  # exit strategies
def test_every_strategy_trains_under_a_curriculum(tmp_path, strategy):
    cfg = _config(epochs=1, strategy=strategy, curriculum=CurriculumConfig(stages=_config().curriculum.stages,
                  balance="steps", mode="resize"))  # fmt: skip
    history = Trainer(_model(), _data(48), cfg, tmp_path).fit()
    assert math.isfinite(history[0]["train_loss"])
    assert history[0]["input_size"] == [16, 16]


def test_stage_transform_on_a_batch():
    stage = stages_of(CurriculumConfig(stages=[{"size": 5}]))[0]
    x = torch.randn(2, 3, 9, 9)
    assert apply_stage(x, stage, "lowpass").shape == (2, 3, 5, 5)
    with pytest.raises(ConfigError, match="image batches"):
        apply_stage(torch.randn(2, 9), stage, "lowpass")
