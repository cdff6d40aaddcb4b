"""The model's own past as teacher: EMA, snapshots and earlier checkpoints load (safetensors only) and distil."""

import pytest
import torch
import torch.nn.functional as F

from adaptnn import create_model
from adaptnn.errors import CheckpointError, ConfigError
from adaptnn.io import load_checkpoint
from adaptnn.strategies import get
from adaptnn.training import TrainConfig, Trainer
from adaptnn.training.config import TeacherConfig
from adaptnn.training.teachers import ema_update, load_teacher
from adaptnn.training.trainer import commit_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two on a loaded box


def _model(seed=0):
    torch.manual_seed(seed)
    return create_model("mecnn_cifar", num_classes=4, input_size=[8, 8], widths=[4, 8, 8], strides=[1, 2, 2], depth=1)


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long() + 2 * (x[:, 1].mean(dim=(1, 2)) > 0).long()
    return torch.utils.data.TensorDataset(x, y)


def _config(teacher, **kw):
    base = dict(epochs=3, batch_size=16, lr=0.05, device="cpu", progress=False, seed=1, strategy="distill")
    options = {"teacher": "model", "alpha": kw.pop("alpha", 0.5)}
    return TrainConfig(**dict(base, strategy_options=options, teacher=teacher, **kw))


def test_ema_update_and_teacher_config_checks():
    a, b = _model(0), _model(1)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    ema_update(a, b, 0.75)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, 0.75 * before[name] + 0.25 * q)
    for x, y in zip(a.buffers(), b.buffers(), strict=True):
        assert torch.equal(x, y)
    with pytest.raises(ConfigError, match="nothing uses it"):
        TrainConfig(teacher=TeacherConfig(ema_decay=0.9)).validate()
    with pytest.raises(ConfigError, match="ema_decay"):
        _config(TeacherConfig(ema_decay=1.0)).validate()
    with pytest.raises(ConfigError, match="snapshot_epochs"):
        _config(TeacherConfig(snapshot_epochs=[0])).validate()


def test_checkpoint_teacher_loads_safetensors_only(tmp_path):
    source = _model(3)
    commit_checkpoint(tmp_path / "t.safetensors", source, {"model_spec": {"name": "x", "kwargs": {}}})
    teacher = load_teacher(_model(0), tmp_path / "t.safetensors")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for a, b in zip(teacher.state_dict().values(), source.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_teacher(_model(0), tmp_path / "missing.safetensors")
    torch.save(source.state_dict(), tmp_path / "pickled.safetensors")  # a pickle is refused, never unpickled
    with pytest.raises(CheckpointError):
        load_teacher(_model(0), tmp_path / "pickled.safetensors")
    other = create_model("mecnn_cifar", num_classes=4, input_size=[8, 8], widths=[4, 4, 8], strides=[1, 2, 2], depth=1)
    commit_checkpoint(tmp_path / "o.safetensors", other, {"model_spec": {"name": "x", "kwargs": {}}})
    with pytest.raises(CheckpointError, match="does not match"):
        load_teacher(_model(0), tmp_path / "o.safetensors")


def _kl_to(student, teacher, x):
    with torch.no_grad():
        t = F.softmax(teacher(x) / 3.0, -1)
        return [F.kl_div(F.log_softmax(lg / 3.0, -1), t, reduction="batchmean").item() for lg in student.forward_all(x)]


def test_checkpoint_teacher_distils_and_stays_frozen(tmp_path):
    teacher = _model(7)  # an "earlier checkpoint": some other weights of the same model
    teacher.eval()
    commit_checkpoint(tmp_path / "teacher.safetensors", teacher, {"model_spec": {"name": "x", "kwargs": {}}})
    frozen_before = {k: v.clone() for k, v in load_checkpoint(tmp_path / "teacher.safetensors").model_state.items()}
    student, data = _model(0), _data()
    x = data.tensors[0]
    student.eval()
    kl_before = _kl_to(student, teacher, x)
    cfg = _config(TeacherConfig(checkpoints=[str(tmp_path / "teacher.safetensors")]), alpha=1.0, epochs=4)
    trainer = Trainer(student, data, cfg, tmp_path / "run")
    history = trainer.fit()
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    kl_after = _kl_to(student, teacher, x)
    assert all(a < 0.5 * b for a, b in zip(kl_after, kl_before, strict=True)), (kl_before, kl_after)
    member = trainer.teacher.members[0]
    for k, v in member.state_dict().items():
        assert torch.equal(v, frozen_before[k]), k  # the teacher never moved


def test_ema_and_snapshot_teacher_resume_exactly(tmp_path):
    cfg = _config(TeacherConfig(ema_decay=0.9, snapshot_epochs=[1]))
    full_model = _model(0)
    full = Trainer(full_model, _data(), cfg, tmp_path / "a")
    full.fit()
    assert (tmp_path / "a" / "checkpoints" / "epoch1.safetensors").is_file()
    assert len(full.teacher.members) == 2  # EMA + the epoch-1 snapshot
    ema = full.teacher.ema.state_dict()
    stored = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.safetensors")
    assert stored.meta["teacher_state"] == {"snapshots": [1]}
    for k, v in ema.items():
        assert torch.equal(stored.extra["teacher"][k], v)
        if v.is_floating_point() and "running" not in k and "num_batches" not in k:
            assert not torch.equal(v, full_model.state_dict()[k]), k  # an average, not a copy

    part = Trainer(_model(0), _data(), cfg, tmp_path / "b")
    original_save, calls = part._save, {"n": 0}

    def save_then_stop(optimizer, epoch, step, record=None):
        original_save(optimizer, epoch, step, record)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    part._save = save_then_stop
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    resumed_model = _model(0)
    resumed = Trainer(resumed_model, _data(), cfg, tmp_path / "b")
    resumed.fit(resume=True)
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    for k, v in resumed.teacher.ema.state_dict().items():
        torch.testing.assert_close(v, ema[k], rtol=0, atol=0, msg=k)


def test_model_teacher_strategy_needs_a_teacher():
    strategy = get("distill", teacher="model")
    logits = [torch.randn(4, 3), torch.randn(4, 3)]
    y = torch.tensor([0, 1, 2, 0])
    ce = sum(F.cross_entropy(lg, y) for lg in logits)
    torch.testing.assert_close(strategy(logits, y), ce)  # no teacher in a plain call: cross-entropy alone
    t = [torch.randn(4, 3)]
    loss = strategy.loss_from_teacher(logits, y, t)
    assert loss > 0 and not torch.allclose(loss, ce)
